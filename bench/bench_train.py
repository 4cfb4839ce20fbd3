"""Training throughput of `gqa train` against a bare PyTorch loop: same model, batch, data and precision.

Both run in this one process, one after the other and alternating, on the same packed blocks in the
same order, with the same AdamW, schedule, accumulation and clipping. Reported: tokens per second
of the training steps of each (setup, final evaluation and saving are outside both clocks) and their
ratio, the median over the repeats. The target is a ratio of at least 0.97.

    .venv/bin/python bench/bench_train.py                    # a 30M-parameter Llama, CPU
    .venv/bin/python bench/bench_train.py --size smollm2     # SmolLM2-135M's shape (3 -> 1 KV heads)
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, get_scheduler

from gqa.train import loop
from gqa.train.api import load_recipe, run_recipe, write_corpus

from benchlib import bare_step, bare_training, save_random_llama

SIZES = {
    # name: (hidden, layers, heads, kv heads, intermediate, vocab)
    "small": (512, 8, 8, 2, 1536, 8192),
    "smollm2": (576, 30, 9, 1, 1536, 49152),
}
RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "tiny-cpu.yaml"


@contextmanager
def cpu_time_of_steps():
    """This process's CPU seconds inside the loop's optimizer steps (a one-element list, filled as
    they run): steadier than wall time on a busy machine."""
    total = [0.0]
    step = loop._Run._step

    def timed(self, micro_batches):
        start = time.process_time()
        try:
            return step(self, micro_batches)
        finally:
            total[0] += time.process_time() - start

    loop._Run._step = timed
    try:
        yield total
    finally:
        loop._Run._step = step


def build_model(root: Path, size: str, corpus_text: str) -> Path:
    vocab = SIZES[size][-1]
    return save_random_llama(root / f"model-{size}", SIZES[size], corpus_text.split("\n\n"), min(vocab, 8192))


def bare_loop(overrides: list[str], model_dir: Path) -> tuple[float, float]:
    """What a hand-written loop does with the same recipe: tokens per wall second and per CPU second."""
    recipe = load_recipe(RECIPE, overrides)
    steps, micro, block = recipe.budget.steps, recipe.batch.micro, recipe.data.block_size
    global_batch = recipe.batch.global_sequences
    blocks, model, optimizer, accumulation = bare_training(recipe, model_dir, steps, global_batch, micro)
    warmup = recipe.schedule.warmup_steps if recipe.schedule.warmup_steps is not None else round(
        recipe.schedule.warmup_fraction * steps)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    start, cpu_start = time.perf_counter(), time.process_time()
    for step in range(steps):
        bare_step(model, optimizer, scheduler, blocks[step * accumulation:(step + 1) * accumulation], "cpu",
                  recipe.precision == "bf16", recipe.optimizer.max_grad_norm)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    tokens = steps * global_batch * block
    return tokens / seconds, tokens / cpu_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="gqa-bench-") as tmp:
        root = Path(tmp)
        corpus = write_corpus(root / "corpus")
        model_dir = build_model(root, args.size, corpus["train"].read_text())
        params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
        base = [
            f"model.path={model_dir}", f"data.train={corpus['train']}", f"data.eval={corpus['heldout']}",
            f"data.cache_dir={root / 'cache'}", f"data.block_size={args.block}", f"budget.steps={args.steps}",
            f"batch.global_sequences={args.global_batch}", f"batch.micro={args.micro}", "eval.every=0",
            "eval.max_blocks=8", "checkpoint.every=0", f"precision={args.precision}", "schedule.warmup_steps=1",
        ]
        wall = {"gqa": [], "bare": []}
        cpu = {"gqa": [], "bare": []}
        for repeat in range(args.repeats):  # alternate, so slow spells of a shared machine hit both
            with cpu_time_of_steps() as step_cpu_seconds:
                result = run_recipe(RECIPE, [*base, f"output.dir={root / f'out{repeat}'}"])  # tensorboard on, as by default
            wall["gqa"].append(result.tokens_per_second)
            cpu["gqa"].append(len(result.losses) * result.plan.tokens_per_step / step_cpu_seconds[0])
            bare_wall, bare_cpu = bare_loop([*base, f"output.dir={root / 'unused'}"], model_dir)
            wall["bare"].append(bare_wall)
            cpu["bare"].append(bare_cpu)
            print(f"repeat {repeat + 1}: tok/s gqa train {wall['gqa'][-1]:,.0f}, bare loop {bare_wall:,.0f}; "
                  f"tok per CPU-s gqa train {cpu['gqa'][-1]:,.0f}, bare loop {bare_cpu:,.0f}")
        median = {kind: {k: statistics.median(v) for k, v in rates.items()} for kind, rates in (("wall", wall), ("cpu", cpu))}
        pairs = sorted(g / b for g, b in zip(wall["gqa"], wall["bare"]))
        print(
            f"\nmodel: {args.size} ({params / 1e6:.1f}M parameters), {torch.get_num_threads()} CPU thread(s), {args.precision}\n"
            f"batch: {args.global_batch} x {args.block} tokens per step (micro {args.micro}), {args.steps} steps per run\n"
            f"wall clock: gqa train {median['wall']['gqa']:,.0f} tok/s, bare PyTorch loop {median['wall']['bare']:,.0f} tok/s "
            f"(medians of {args.repeats}); ratio {median['wall']['gqa'] / median['wall']['bare']:.3f} "
            f"(per-repeat ratios {pairs[0]:.2f} to {pairs[-1]:.2f})\n"
            f"CPU time:   gqa train {median['cpu']['gqa']:,.0f} tok/CPU-s, bare loop {median['cpu']['bare']:,.0f} tok/CPU-s; "
            f"ratio {median['cpu']['gqa'] / median['cpu']['bare']:.3f}\n"
            f"target: ratio >= 0.97"
        )

if __name__ == "__main__":
    main()
