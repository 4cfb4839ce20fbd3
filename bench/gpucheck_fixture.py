"""What the GPU check's parts build and run, per mode: the sizes, the fixture (corpus files, a tokenizer, a source
Llama and its conversion) and the recipe overrides every `gqa train` run of the check starts from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchlib import train_tokenizer
from gpucheck_commands import fresh


@dataclass(frozen=True)
class Sizes:
    """Everything the parts build and run, per mode."""

    # the train/eval fixture: a Llama with `heads` KV heads (the source), converted to `kv_heads`
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int  # the tokenizer's, and the fixture models'
    max_positions: int
    corpus_chars: int | None  # keep the first N characters of each corpus split (None: all)
    # train parts: `steps` in all, the split run stopped at `stop_at` and resumed
    train_processes: int
    steps: int
    stop_at: int
    block: int
    global_batch: int
    micro: int
    repeat_reference: bool  # a second uninterrupted run: the run-to-run difference resume is judged against
    # eval
    eval_seq_len: int
    eval_contexts: tuple[int, ...]
    eval_new_tokens: int
    eval_max_tokens: int
    eval_dtype: str
    # throughput: (hidden, layers, heads, kv heads, intermediate, vocab) of the model, batch, steps
    tp_shape: tuple[int, int, int, int, int, int]
    tp_block: int
    tp_global: int
    tp_micro: int
    tp_steps: int
    tp_warmup: int  # first steps left out of the medians
    tp_precision: str


CUDA_SIZES = Sizes(
    hidden=256, layers=4, heads=8, kv_heads=2, intermediate=688, vocab=4096, max_positions=4096, corpus_chars=None,
    train_processes=1, steps=6, stop_at=3, block=256, global_batch=16, micro=8, repeat_reference=True,
    eval_seq_len=1024, eval_contexts=(512, 2048), eval_new_tokens=32, eval_max_tokens=32768, eval_dtype="bfloat16",
    tp_shape=(2048, 22, 32, 4, 5632, 32000), tp_block=2048, tp_global=8, tp_micro=4, tp_steps=12, tp_warmup=3,
    tp_precision="bf16",
)
CPU_SIZES = Sizes(
    hidden=64, layers=2, heads=8, kv_heads=2, intermediate=128, vocab=512, max_positions=256, corpus_chars=150_000,
    train_processes=2, steps=4, stop_at=2, block=64, global_batch=8, micro=2, repeat_reference=False,
    eval_seq_len=64, eval_contexts=(32, 64), eval_new_tokens=4, eval_max_tokens=2048, eval_dtype="float32",
    tp_shape=(128, 2, 4, 2, 352, 512), tp_block=128, tp_global=8, tp_micro=8, tp_steps=6, tp_warmup=2,
    tp_precision="fp32",
)


def build_fixture(root: Path, sizes: Sizes) -> dict[str, Path]:
    """Corpus files, a tokenizer, a random-weight source Llama (MHA) and its conversion to sizes.kv_heads."""
    import torch
    from transformers import AutoModelForCausalLM

    from gqa.convert.convert import convert
    from gqa.convert.options import ConvertOptions

    fresh(root)
    train, heldout = write_text_files(root, sizes)
    tokenizer = train_tokenizer(train.read_text().split("\n\n"), sizes.vocab)
    torch.manual_seed(0)
    config = llama_config(sizes.hidden, sizes.layers, sizes.heads, sizes.heads, sizes.intermediate,
                          max(sizes.vocab, len(tokenizer)), sizes.max_positions)
    source = root / "source-mha"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(source)
    tokenizer.save_pretrained(source)
    converted = root / f"converted-gqa{sizes.kv_heads}"
    convert(str(source), converted, ConvertOptions(kv_heads=sizes.kv_heads))
    return {"train": train, "heldout": heldout, "source": source, "converted": converted}


def write_text_files(root: Path, sizes: Sizes) -> tuple[Path, Path]:
    from gqa.convert.corpus import corpus_documents

    files = []
    for split, name in (("train", "train.txt"), ("heldout", "heldout.txt")):
        documents, kept, chars = corpus_documents(split), [], 0
        limit = sizes.corpus_chars if split == "train" or sizes.corpus_chars is None else sizes.corpus_chars // 3
        for doc in documents:
            if limit is not None and chars >= limit:
                break
            kept.append(doc)
            chars += len(doc) + 2
        path = root / name
        path.write_text("\n\n".join(kept) + "\n")
        files.append(path)
    return files[0], files[1]


def llama_config(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int, max_positions: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=max_positions,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=1, pad_token_id=None,
    )


def train_overrides(*, model: Path, train: Path, heldout: Path, cache_dir: Path, block: int, steps: int,
                    global_batch: int, micro: int, precision: str, eval_blocks: int, out: Path) -> list[str]:
    """The `KEY=VALUE` overrides of the tiny-cpu recipe for a short run: no evaluation, checkpoint or tracker
    on the way, a loss logged every step, and a one-step warmup."""
    return [
        f"model.path={model}", f"data.train={train}", f"data.eval={heldout}", f"data.cache_dir={cache_dir}",
        f"data.block_size={block}", f"budget.steps={steps}", f"batch.global_sequences={global_batch}",
        f"batch.micro={micro}", "eval.every=0", f"eval.max_blocks={eval_blocks}", "checkpoint.every=0",
        f"precision={precision}", "logging.every=1", "logging.trackers=[]", "schedule.warmup_steps=1",
        f"output.dir={out}",
    ]
