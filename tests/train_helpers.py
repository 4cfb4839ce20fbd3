"""Shared pieces for the uptraining tests: a tiny converted model with a tokenizer, real text, recipes."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import datasets

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from gqa.convert.corpus import module_docstrings
from tiny import save_tiny_llama

# Real English technical text, small enough to tokenise in a blink: a few modules' docstrings.
TRAIN_MODULES = ("argparse", "textwrap", "shutil", "pathlib", "subprocess", "tempfile", "functools")
EVAL_MODULES = ("json", "csv")
REPO = Path(__file__).resolve().parent.parent


def docs_text(modules: tuple[str, ...]) -> str:
    return "\n\n".join(doc for name in modules for doc in module_docstrings(name)) + "\n"


def save_tokenizer(model_dir: Path, text: str, vocab_size: int = 128) -> None:
    """A small BPE tokenizer trained on the test text (the tiny model embeds 128 tokens)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.BPEDecoder()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<eos>"], limit_alphabet=80)
    tokenizer.train_from_iterator(text.split("\n\n"), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>")
    wrapped.save_pretrained(model_dir)


def make_model(root: Path, name: str = "converted", kv_heads: int = 2, seed: int = 0, provenance: bool = True) -> Path:
    """A tiny Llama as `gqa convert` would leave it: weights, config, tokenizer, provenance."""
    model_dir = save_tiny_llama(root / name, seed=seed, num_key_value_heads=kv_heads)
    save_tokenizer(model_dir, docs_text(TRAIN_MODULES))
    if provenance:
        (model_dir / "gqa_provenance.json").write_text(json.dumps({
            "gqa_version": "test",
            "created": "2025-01-01T00:00:00+00:00",
            "source": {"id": "tiny-mha", "kind": "local", "model_type": "llama",
                       "num_attention_heads": 8, "num_key_value_heads": 8},
            "conversion": {"method": "mean", "kv_heads": kv_heads, "groups": [[0, 1, 2, 3], [4, 5, 6, 7]]},
            "training": None,
            "eval": None,
        }))
    return model_dir


def write_texts(root: Path) -> tuple[Path, Path]:
    train, held = root / "train.txt", root / "eval.txt"
    if not train.exists():
        train.write_text(docs_text(TRAIN_MODULES))
        held.write_text(docs_text(EVAL_MODULES))
    return train, held


def tiny_overrides(model_dir: Path, train_file: Path, eval_file: Path, output_dir: Path, cache_dir: Path, **extra) -> list[str]:
    """Overrides that point recipes/tiny-cpu.yaml at test files, fp32 and quiet."""
    values = {
        "model.path": model_dir,
        "data.train": train_file,
        "data.eval": eval_file,
        "data.cache_dir": cache_dir,
        "output.dir": output_dir,
        "precision": "fp32",
        "logging.trackers": "[]",
        "logging.every": 1,
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


def free_port() -> int:
    """A port nothing listens on, so concurrent runs never share a rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(nproc: int = 2) -> list[str]:
    """The start of a torchrun command on a free port, with this interpreter (so any venv works)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]


def write_shards(root: Path, shards: tuple[tuple[str, ...], ...]) -> tuple[Path, Path]:
    """A folder of parquet shards, one a group of modules' docstrings (one document a row), and held-out text."""
    folder = root / "shards"
    folder.mkdir()
    for i, modules in enumerate(shards):
        documents = docs_text(modules).strip().split("\n\n")
        datasets.Dataset.from_dict({"text": documents}).to_parquet(str(folder / f"train-{i:05d}.parquet"))
    held = root / "heldout.txt"
    held.write_text(docs_text(EVAL_MODULES))
    return folder, held


def training_workspace(root: Path) -> SimpleNamespace:
    """A converted tiny model, an 8-KV-head teacher, training and held-out text, a data cache."""
    train_file, eval_file = write_texts(root)
    return SimpleNamespace(
        root=root, model=make_model(root), teacher=make_model(root, "teacher", kv_heads=8, seed=1),
        train=train_file, eval=eval_file, cache=root / "cache",
    )
