"""Training data: read documents, tokenise once, pack into fixed blocks, cache on disk.

The cache key covers everything that changes the blocks (the tokenizer files, each source's
path/size/mtime or hub id, text field, block size, packing, the eval split), so a second run
with the same data loads memory-mapped blocks at once and any change rebuilds them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from gqa.convert.errors import GQAError
from gqa.convert import corpus
from gqa.convert.modeldir import tokenizer_files
from gqa.convert.text import chunk_tokens, document_window, encode_documents, leading_bos
from gqa.train.recipe import DataSection

logger = logging.getLogger(__name__)

STDLIB_SOURCE = corpus.NAME
CACHE_FORMAT = 2  # bump when the layout of cached blocks changes
FILE_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Source:
    """One entry of data.train / data.eval, resolved."""

    kind: str  # stdlib | text | json | parquet | saved | hub
    location: str  # a path, a hub id, or a stdlib-docs split
    split: str  # split used for saved DatasetDicts and hub datasets


@dataclass(frozen=True)
class PreparedData:
    train: datasets.Dataset  # input_ids blocks (packed) or documents (not packed)
    eval: datasets.Dataset
    stats: dict[str, Any]  # documents, tokens and blocks per split; where the cache lives


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gqa" / "data"


def prepare_data(
    data: DataSection,
    tokenizer,
    tokenizer_dir: str | Path,
    seed: int,
    local_main_process_first: Callable[[], ContextManager] = contextlib.nullcontext,
) -> PreparedData:
    """Blocks for training and evaluation, from the cache or built by the first process of each machine."""
    cache_root = Path(data.cache_dir) if data.cache_dir else default_cache_root()
    train_sources = resolve_sources(data.train, "data.train", data.train_split, cache_root)
    eval_sources = resolve_sources(data.eval, "data.eval", data.eval_split, cache_root) if data.eval else []
    key = _cache_key(data, train_sources, eval_sources, tokenizer, tokenizer_dir, seed)
    cache_dir = cache_root / key
    with local_main_process_first():
        if not (cache_dir / "stats.json").is_file():
            _build(data, train_sources, eval_sources, tokenizer, seed, cache_dir)
        else:
            logger.info("data: using cached blocks in %s", cache_dir)
        stats = json.loads((cache_dir / "stats.json").read_text())
        train = datasets.load_from_disk(str(cache_dir / "train"))
        eval_ = datasets.load_from_disk(str(cache_dir / "eval"))
    return PreparedData(train=train, eval=eval_, stats=stats | {"cache_dir": str(cache_dir)})


def resolve_sources(spec: str | list[str], key: str, split: str, cache_root: Path) -> list[Source]:
    """What each entry of a data key is: a file, a saved dataset, the stdlib corpus, or a hub id."""
    entries = [spec] if isinstance(spec, str) else list(spec)
    if not entries:
        raise GQAError(f"{key} is an empty list; name at least one file, directory or dataset")
    sources = []
    for entry in entries:
        path = Path(entry).expanduser()
        if entry.startswith(f"{STDLIB_SOURCE}:"):
            corpus_split = entry.split(":", 1)[1]
            if corpus_split not in corpus.SPLITS:
                raise GQAError(f"{key}: {entry!r} names no corpus split; use stdlib-docs:train or stdlib-docs:heldout")
            sources.append(Source("stdlib", corpus_split, corpus_split))
        elif path.is_dir():
            if not ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
                raise GQAError(f"{key}: {path} is a directory but not one written by datasets' save_to_disk")
            sources.append(Source("saved", str(path.resolve()), split))
        elif path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                known = ", ".join(sorted(FILE_BUILDERS))
                raise GQAError(f"{key}: cannot read {path} (suffix {path.suffix or 'none'}); use one of {known}")
            sources.append(Source(builder, str(path.resolve()), split))
        elif path.suffix.lower() in FILE_BUILDERS or entry.startswith((".", "/", "~")):  # meant as a file
            raise GQAError(f"{key}: {entry} does not exist; check the path (relative paths start from {Path.cwd()})")
        else:
            sources.append(Source("hub", entry, split))  # e.g. HuggingFaceFW/fineweb-edu
    return sources


def training_order(num_blocks: int, num_sequences: int, seed: int) -> np.ndarray:
    """Block indices in the order a run consumes them: a fresh seeded permutation each epoch.

    Fixed by (num_blocks, num_sequences, seed) alone, so one process and many see the same
    global batches, and a resumed run sees what the interrupted one would have.
    """
    epochs = math.ceil(num_sequences / num_blocks)
    order = [np.random.default_rng([seed, epoch]).permutation(num_blocks) for epoch in range(epochs)]
    return np.concatenate(order)[:num_sequences]


def make_collate(block_size: int, pad_token_id: int) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """Collate blocks into tensors: packed blocks as they are, documents padded to block_size."""

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        rows = [np.asarray(example["input_ids"], dtype=np.int64) for example in examples]
        if all(len(row) == block_size for row in rows):
            input_ids = torch.from_numpy(np.stack(rows))
            return {"input_ids": input_ids, "labels": input_ids}
        input_ids = torch.full((len(rows), block_size), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), block_size), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.from_numpy(row)
            attention_mask[i, : len(row)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)  # padding is not predicted
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    return collate


# --- building ---------------------------------------------------------------------------------


def _build(data: DataSection, train_sources, eval_sources, tokenizer, seed: int, cache_dir: Path) -> None:
    logger.info("data: tokenising and packing into %s", cache_dir)
    train_docs = _load_documents(train_sources, data, "data.train", cache_dir.parent)
    if eval_sources:
        eval_docs = _load_documents(eval_sources, data, "data.eval", cache_dir.parent)
    else:
        if len(train_docs) < 2:
            raise GQAError("data.train holds one document, too few to hold some out; set data.eval to separate files")
        split = train_docs.train_test_split(test_size=data.eval_fraction, seed=seed, shuffle=True)
        train_docs, eval_docs = split["train"], split["test"]
    stats: dict[str, Any] = {"format": CACHE_FORMAT}
    tmp = cache_dir.with_name(f"{cache_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    built = {}
    bos = leading_bos(tokenizer)
    for name, docs in (("train", train_docs), ("eval", eval_docs)):
        tokens = _tokenise(docs, tokenizer, bos, data, name)
        stats[f"{name}_documents"] = len(docs)
        stats[f"{name}_tokens"] = _token_count(tokens)
        built[name] = _pack(tokens, data.block_size, bos, data.num_proc, name) if data.pack else tokens
        stats[f"{name}_blocks"] = len(built[name])
    _check_sizes(data, stats)  # before caching: an empty split is an error, never a cache entry
    for name, blocks in built.items():
        blocks.save_to_disk(str(tmp / name))
    (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
    try:
        os.replace(tmp, cache_dir)  # atomic: a reader sees all of it or none
    except OSError:  # another process finished the same cache first
        shutil.rmtree(tmp, ignore_errors=True)


def _load_documents(sources: list[Source], data: DataSection, key: str, cache_root: Path) -> datasets.Dataset:
    parts = []
    for source in sources:
        part = _load_source(source, data, key, cache_root)
        if data.text_field not in part.column_names:
            raise GQAError(
                f"data.text_field={data.text_field!r} is not a column of {source.location} "
                f"(columns: {', '.join(part.column_names)}); set data.text_field"
            )
        part = part.select_columns([data.text_field])
        if data.text_field != "text":
            part = part.rename_column(data.text_field, "text")
        parts.append(part)
    docs = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    docs = docs.filter(
        lambda batch: [isinstance(t, str) and bool(t.strip()) for t in batch["text"]], batched=True, desc="dropping empty"
    )
    if len(docs) == 0:
        where = ", ".join(s.location for s in sources)
        raise GQAError(f"{key} holds no text: {where} has no non-empty {data.text_field!r} field; point {key} at real data")
    return docs


def _load_source(source: Source, data: DataSection, key: str, cache_root: Path) -> datasets.Dataset:
    if source.kind == "stdlib":
        path = corpus.write_corpus(cache_root / corpus.corpus_tag())[source.location]
        return datasets.load_dataset("text", data_files=[str(path)], sample_by="paragraph", split="train")
    if source.kind == "text":  # a document is a block of lines between blank lines
        return datasets.load_dataset("text", data_files=[source.location], sample_by="paragraph", split="train")
    if source.kind in ("json", "parquet"):
        try:
            return datasets.load_dataset(source.kind, data_files=[source.location], split="train")
        except Exception as err:  # malformed files surface as assorted pyarrow/datasets errors
            raise GQAError(f"{key}: could not read {source.location}: {err}") from err
    if source.kind == "saved":
        loaded = datasets.load_from_disk(source.location)
        if isinstance(loaded, datasets.DatasetDict):
            split_key = "data.eval_split" if key == "data.eval" else "data.train_split"
            if source.split not in loaded:
                raise GQAError(f"{split_key}={source.split!r} is not a split of {source.location} ({', '.join(loaded)})")
            loaded = loaded[source.split]
        return loaded
    try:  # hub dataset
        return datasets.load_dataset(source.location, data.hub_config, split=source.split)
    except Exception as err:  # network, auth, missing config or split: all say the same to the user
        raise GQAError(
            f"{key}: {source.location!r} is not a local path and could not be loaded as a hub dataset "
            f"(config {data.hub_config}, split {source.split}): {err}"
        ) from err


def _tokenise(docs: datasets.Dataset, tokenizer, bos: int | None, data: DataSection, name: str) -> datasets.Dataset:
    """Each document's tokens (gqa.convert.text); unpacked, each document's one window."""
    if data.pack and tokenizer.eos_token_id is None:
        logger.warning("data: the tokenizer has no EOS token; packed documents run into each other")

    def tokenise(batch: dict[str, list]) -> dict[str, list]:
        if data.pack:
            return {"input_ids": encode_documents(tokenizer, batch["text"])}
        # One document per block, cut to the block (it ends where its padding begins, so it carries
        # no EOS); drop what leaves nothing to predict.
        encoded = encode_documents(tokenizer, batch["text"], eos=False)
        windows = (document_window(ids, data.block_size, bos) for ids in encoded)
        return {"input_ids": [ids for ids in windows if len(ids) >= 2]}

    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
    return docs.map(
        tokenise, batched=True, remove_columns=docs.column_names, features=features, num_proc=data.num_proc,
        desc=f"tokenising {name}",
    )


def _pack(tokens: datasets.Dataset, block_size: int, bos: int | None, num_proc: int, name: str) -> datasets.Dataset:
    """Concatenate documents and cut into full blocks (gqa.convert.text's windows).

    Training blocks are cut per map batch, each dropping its tail (< one block); large batches keep
    that to block_size - 1 tokens per 4,000 documents. The held-out split is cut as one stream, the
    way `gqa eval` cuts a text, so both score the same windows.
    """

    def pack(batch: pa.Table) -> dict[str, np.ndarray]:
        return {"input_ids": chunk_tokens(pc.list_flatten(batch.column("input_ids")).to_numpy(), block_size, bos)}

    whole = name == "eval"
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
    packed = tokens.with_format("arrow").map(
        pack, batched=True, batch_size=None if whole else 4000, features=features, num_proc=None if whole else num_proc,
        desc=f"packing {name}",
    )
    return packed.with_format(None)


def _token_count(tokens: datasets.Dataset) -> int:
    if len(tokens) == 0:
        return 0
    column = tokens.data.column("input_ids")
    return int(pc.sum(pc.list_value_length(column)).as_py() or 0)


def _check_sizes(data: DataSection, stats: dict[str, Any]) -> None:
    for name, key in (("train", "data.train"), ("eval", "data.eval" if data.eval else "data.eval_fraction")):
        if stats[f"{name}_blocks"] == 0 and not data.pack:
            raise GQAError(f"{key}: no {name} document is 2 tokens or longer; add data to {key}")
        if stats[f"{name}_blocks"] == 0:
            raise GQAError(
                f"data.block_size={data.block_size} is longer than the {name} data ({stats[f'{name}_tokens']:,} tokens "
                f"in {stats[f'{name}_documents']:,} documents, none long enough); lower data.block_size or add data to {key}"
            )


# --- cache key --------------------------------------------------------------------------------


def _cache_key(data: DataSection, train_sources, eval_sources, tokenizer, tokenizer_dir, seed: int) -> str:
    identity = {
        "format": CACHE_FORMAT,
        "tokenizer": _tokenizer_fingerprint(tokenizer, tokenizer_dir),
        "train": [_source_fingerprint(s) for s in train_sources],
        "eval": [_source_fingerprint(s) for s in eval_sources],
        # the held-out fraction is drawn with the seed only when there are no eval files
        "holdout": None if eval_sources else [data.eval_fraction, seed],
        "text_field": data.text_field,
        "hub_config": data.hub_config,
        "block_size": data.block_size,
        "pack": data.pack,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return f"blocks-{digest}"


def _tokenizer_fingerprint(tokenizer, tokenizer_dir) -> dict[str, Any]:
    local = Path(tokenizer_dir).is_dir()  # a hub id's files are pinned by the hub's own cache
    files = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in tokenizer_files(tokenizer_dir)} if local else {}
    return {"class": type(tokenizer).__name__, "files": files, "eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id}


def _source_fingerprint(source: Source) -> list:
    if source.kind == "stdlib":
        return [source.kind, source.location, corpus.corpus_tag()]
    if source.kind == "hub":
        return [source.kind, source.location, source.split]
    path = Path(source.location)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [source.kind, source.location, source.split, [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]]
