"""Streamed training data against the map path: time to the first optimizer step and steady-state
tokens/s of `gqa train` on a local parquet corpus of gigabytes of real text.

One recipe (recipes/tiny-cpu.yaml with overrides, run through gqa.train.api.run_recipe) three ways,
one after the other in one process, round after round:

  stream  data.streaming=true: the corpus is tokenised and packed on the fly while training
  map     data.streaming=false, cold caches (gqa's and datasets'): the whole corpus is tokenised and
          packed before step 1; only in the first --cold-repeats rounds, as it is slow at full size
  blocks  the map path with its cache warm: training on the pre-tokenised blocks the map run left

Measured for each run: seconds (wall, and CPU of this process and its children) from calling
run_recipe to the end of optimizer step 1; the seconds it spent preparing data (plan.data_seconds);
tokens per second (wall and CPU) from the end of step --warmup to the end of the last step, so
reading the next batch counts, and the share of that time the training thread spent getting its
batches (data wait: what the data path adds to training, measured inside the run, so not moved by
the load of the machine as comparisons between runs are). Ratios are to the blocks run of the same round. Targets: the
stream's first step within 30 s, its steady-state tokens/s at least 0.97 of blocks'. On a shared
machine wall time follows the load; the CPU-time figures are the steadier ones.

Last, the stream's reader alone, with nothing training: the tokens/s one training process's reader
process hands over, the most that reader can feed, and the reader process's peak resident memory
(--reader-only measures just this).

The corpus: the training split of gqa's stdlib-docs corpus (Python's standard-library docstrings),
repeated, each copy in its own seeded document order, until --gigabytes of UTF-8 text fill --shards
parquet files (column "text"); the held-out split is one more parquet file, for data.eval. It is
written once into --corpus-dir and reused while its marker file matches.

    .venv/bin/python bench/bench_stream.py --quick                                # a smoke run, under a minute
    .venv/bin/python bench/bench_stream.py --json /tmp/gqa-bench/stream.json     # 2 GB, 3 rounds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import statistics
import tempfile
import threading
import time
from itertools import islice
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local corpus: never ask the hub

import datasets
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gqa.convert.corpus import corpus_documents, corpus_tag
from gqa.train import loop
from gqa.train.api import load_recipe, run_recipe
from gqa.train.dataset import make_collate, prepare_data
from gqa.train.stream import StreamLoader

from benchlib import save_random_llama

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "tiny-cpu.yaml"
CORPUS_FORMAT = 1  # bump when the corpus layout changes
ROW_GROUP = 10_000  # documents per parquet row group (about 2.5 MB of text)
SIZES = {
    # name: (hidden, layers, heads, kv heads, intermediate, vocab)
    "tiny": (64, 2, 4, 2, 192, 2048),
    "small": (128, 4, 4, 2, 384, 4096),
    "medium": (256, 4, 8, 2, 768, 8192),
}
KINDS = ("stream", "map", "blocks")


# --- corpus and model ------------------------------------------------------------------------


def build_corpus(root: Path, gigabytes: float, shards: int) -> Path:
    """root/train/train-0000i-of-0000n.parquet holding at least `gigabytes` of text, and root/heldout.parquet."""
    want = {"format": CORPUS_FORMAT, "corpus": corpus_tag(), "gigabytes": gigabytes, "shards": shards, "row_group": ROW_GROUP}
    marker = root / "corpus.json"
    if marker.is_file() and {k: v for k, v in json.loads(marker.read_text()).items() if k in want} == want:
        return root
    shutil.rmtree(root, ignore_errors=True)
    (root / "train").mkdir(parents=True)
    started = time.perf_counter()
    docs = corpus_documents("train")
    sizes = np.array([len(doc.encode()) for doc in docs])
    rng = np.random.default_rng(0)
    per_shard = int(gigabytes * 1e9 / shards) + 1
    total_bytes = total_docs = 0
    for shard in range(shards):
        rows: list[str] = []
        size = 0
        while size < per_shard:  # whole shuffled copies of the corpus, the last one cut where the shard is full
            order = rng.permutation(len(docs))
            ends = np.cumsum(sizes[order])
            take = min(len(order), int(np.searchsorted(ends, per_shard - size)) + 1)
            rows.extend(docs[i] for i in order[:take])
            size += int(ends[take - 1])
        path = root / "train" / f"train-{shard:05d}-of-{shards:05d}.parquet"
        # no dictionary encoding: it would store each repeated document once, which real corpora cannot
        pq.write_table(pa.table({"text": rows}), path, row_group_size=ROW_GROUP, use_dictionary=False)
        total_bytes, total_docs = total_bytes + size, total_docs + len(rows)
        print(f"corpus: wrote {path.name} ({size / 1e6:,.1f} MB of text, {len(rows):,} documents)", flush=True)
    pq.write_table(pa.table({"text": corpus_documents("heldout")}), root / "heldout.parquet")
    marker.write_text(json.dumps(want | {"text_bytes": total_bytes, "documents": total_docs,
                                         "seconds": round(time.perf_counter() - started, 1)}, indent=2))
    return root


def build_model(root: Path, size: str) -> Path:
    """A randomly initialised Llama (GQA) with a byte-level BPE tokenizer trained on the corpus text."""
    return save_random_llama(root / f"model-{size}", SIZES[size], corpus_documents("train"), SIZES[size][-1])


# --- one run ---------------------------------------------------------------------------------


def cpu_seconds() -> float:
    """CPU seconds of this process (all its threads) and of its child processes, finished or still running
    (datasets' map workers, data loader workers): unlike wall time, not stretched by other work on the machine."""
    own = os.times()
    total = own.user + own.system + own.children_user + own.children_system
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            times = child.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total


def timed_run(overrides: list[str], warmup: int, steps: int) -> dict:
    """run_recipe with the end of every optimizer step clocked; CPU time at steps 1, `warmup` and the last."""
    ends: list[float] = []
    tokens: list[int] = []
    cpu: dict[int, float] = {}
    waits: list[float] = []  # each optimizer step's seconds in the training thread getting its micro batches
    step, steps_of = loop._Run._step, loop._steps

    def timed_steps(loader, accumulation):
        batches = iter(loader)
        while True:
            started = time.perf_counter()
            micro = list(islice(batches, accumulation))
            if len(micro) < accumulation:
                return
            waits.append(time.perf_counter() - started)
            yield micro

    def clocked(self, micro_batches):
        result = step(self, micro_batches)
        ends.append(time.perf_counter())
        tokens.append(result[1])
        if len(ends) in (1, warmup, steps):
            cpu[len(ends)] = cpu_seconds()
        return result

    loop._Run._step, loop._steps = clocked, timed_steps
    load = os.getloadavg()[0]
    try:
        start, cpu[0] = time.perf_counter(), cpu_seconds()
        result = run_recipe(RECIPE, overrides)
    finally:
        loop._Run._step, loop._steps = step, steps_of
    if len(ends) != steps:
        raise SystemExit(f"the run made {len(ends)} optimizer steps, not {steps}")
    steady = sum(tokens[warmup:])
    return {
        "load_1min": load,  # at the start: other work on the machine slows the wall clock
        "first_step_s": ends[0] - start,
        "first_step_cpu_s": cpu[1] - cpu[0],
        "data_s": result.plan.data_seconds,
        "tokens_per_s": steady / (ends[-1] - (ends[warmup - 1] if warmup else start)),
        "tokens_per_cpu_s": steady / (cpu[steps] - cpu[warmup]),
        # the share of the steady steps' wall time the training thread spent getting batches
        "data_wait": sum(waits[warmup:]) / (ends[-1] - (ends[warmup - 1] if warmup else start)),
        "steady_steps": steps - warmup,
        "steady_tokens": steady,
        "step_seconds": [round(b - a, 4) for a, b in zip([start, *ends], ends)],
    }


def reader_alone(overrides: list[str], warmup: int, batches: int) -> dict:
    """The stream with nothing training: tokens/s one process's reader hands over (read, tokenised and packed
    in its reader process), the most a training process fed by it can reach; CPU-s counts both processes."""
    recipe = load_recipe(RECIPE, overrides)
    tokenizer_dir = recipe.model.tokenizer or recipe.model.path
    data = prepare_data(recipe.data, AutoTokenizer.from_pretrained(tokenizer_dir), tokenizer_dir, recipe.seed)
    loader = StreamLoader(data.train, recipe.batch.micro, make_collate(recipe.data.block_size, 0), "cpu")
    tokens, peak, done = 0, [0], threading.Event()

    def watch() -> None:  # the reader process's resident memory (pages it shares with this process count too)
        while not done.wait(0.2):
            for child in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    peak[0] = max(peak[0], child.memory_info().rss)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    for count, batch in enumerate(loader, start=1):
        if count == warmup:
            start, cpu = time.perf_counter(), cpu_seconds()
        elif count > warmup:
            tokens += batch["input_ids"].numel()
        if count == warmup + batches:
            break
    seconds, cpu_s = time.perf_counter() - start, cpu_seconds() - cpu
    done.set()
    watcher.join()
    return {"tokens_per_s": tokens / seconds, "tokens_per_cpu_s": tokens / cpu_s, "batches": batches, "tokens": tokens,
            "reader_peak_rss_mb": peak[0] / 2**20}


# --- the benchmark ---------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gigabytes", type=float, default=2.0, help="text in the corpus (default 2)")
    parser.add_argument("--map-gigabytes", type=float, default=None,
                        help="a smaller corpus for the map and blocks runs, when tokenising all of --gigabytes "
                             "takes too long (default: the same corpus as the stream)")
    parser.add_argument("--shards", type=int, default=16, help="parquet files in the corpus (default 16)")
    parser.add_argument("--corpus-dir", type=Path, default=None,
                        help="where the corpus is written once and reused (default ~/.cache/gqa/bench/stdlib-docs-<N>GB)")
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="model shape (default small)")
    parser.add_argument("--block", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the steady-state rate (default 10)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of stream and blocks (default 3)")
    parser.add_argument("--cold-repeats", type=int, default=1,
                        help="how many of the rounds, the first ones, also run the map path cold and rebuild the "
                             "blocks (default 1: at 2 GB each cold run tokenises all of it)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="another recipe override for every run, e.g. batch.micro=4 (repeatable)")
    parser.add_argument("--work-dir", type=Path, default=None, help="for model, caches and outputs (default: a temp dir)")
    parser.add_argument("--reader-batches", type=int, default=2000,
                        help="micro batches timed from the stream's reader with nothing training (default 2000)")
    parser.add_argument("--reader-only", action="store_true",
                        help="measure only the stream's reader alone (tokens/s and its memory), no training runs")
    parser.add_argument("--json", type=Path, default=None, help="write every measurement here")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 10 MB corpus, tiny model, 40 steps, 1 repeat (under a minute)")
    args = parser.parse_args()
    if args.quick:  # new defaults; options given on the command line still win
        parser.set_defaults(gigabytes=0.01, size="tiny", block=128, steps=40, warmup=5, repeats=1, reader_batches=200)
        args = parser.parse_args()
    if not 1 <= args.cold_repeats <= args.repeats:
        parser.error("--cold-repeats must be at least 1 and at most --repeats")
    if not 0 <= args.warmup < args.steps:
        parser.error("--warmup must be at least 0 and less than --steps")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    map_gigabytes = args.map_gigabytes or args.gigabytes
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gqa" / "bench"

    def corpus_at(gigabytes: float) -> Path:
        root = args.corpus_dir if args.corpus_dir and gigabytes == args.gigabytes else cache / f"stdlib-docs-{gigabytes:g}GB"
        return build_corpus(root, gigabytes, args.shards)

    corpora = {"stream": corpus_at(args.gigabytes)}
    corpora["map"] = corpora["blocks"] = corpus_at(map_gigabytes)

    with tempfile.TemporaryDirectory(prefix="gqa-bench-stream-", dir=args.work_dir) as tmp:
        root = Path(tmp)
        model_dir = build_model(root, args.size)
        params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())

        def overrides(kind: str, repeat: int, cache_dir: Path) -> list[str]:
            return [
                f"model.path={model_dir}", f"data.train={corpora[kind] / 'train'}",
                f"data.eval={corpora[kind] / 'heldout.parquet'}", f"data.cache_dir={cache_dir}",
                f"data.streaming={kind == 'stream'}", f"data.block_size={args.block}", f"budget.steps={args.steps}",
                "eval.every=0", "eval.max_blocks=8", "checkpoint.every=0", "logging.trackers=[]",
                f"output.dir={root / f'out-{kind}-{repeat}'}", "resume=never", *args.override,
            ]

        recipe = load_recipe(RECIPE, overrides("stream", 0, root / "unused"))  # checks the overrides before any run
        if args.reader_only:
            reader = reader_alone(overrides("stream", 0, root / "cache-reader"), 20, args.reader_batches)
            print(f"reader alone ({args.shards} files of {args.gigabytes:g} GB): {reader['tokens_per_s']:,.0f} tok/s, "
                  f"{reader['tokens_per_cpu_s']:,.0f} tok/CPU-s, reader process peak RSS {reader['reader_peak_rss_mb']:,.0f} MB")
            if args.json:
                args.json.write_text(json.dumps({"config": vars(args), "reader_alone": reader}, indent=2, default=str))
            return
        # A short untimed run of each path on the held-out file first, so that what a process pays once
        # (lazy imports, first kernels) falls on none of the timed runs.
        for kind in ("stream", "map"):
            datasets.config.HF_DATASETS_CACHE = root / "warm-up" / "hf-datasets"
            run_recipe(RECIPE, [*overrides(kind, 0, root / "warm-up" / kind), "budget.steps=2",
                                f"data.train={corpora[kind] / 'heldout.parquet'}", f"output.dir={root / 'warm-up' / 'out'}"])
            shutil.rmtree(root / "warm-up")
        runs: list[dict] = []
        map_cache = root / "cache-map"
        for repeat in range(args.repeats):
            cold = repeat < args.cold_repeats
            if cold:
                shutil.rmtree(map_cache, ignore_errors=True)
            for kind in KINDS if cold else ("stream", "blocks"):
                cache_dir = root / f"cache-stream-{repeat}" if kind == "stream" else map_cache
                # cold: datasets' own cache too (its arrow copy of the parquet files, and map results)
                datasets.config.HF_DATASETS_CACHE = root / f"hf-datasets-{kind}-{repeat}"
                run = {"kind": kind, "repeat": repeat, **timed_run(overrides(kind, repeat, cache_dir), args.warmup, args.steps)}
                runs.append(run)
                for name in (f"out-{kind}-{repeat}", f"hf-datasets-{kind}-{repeat}", f"cache-stream-{repeat}"):
                    shutil.rmtree(root / name, ignore_errors=True)
                print(f"round {repeat + 1} {kind:<6} (load {run['load_1min']:.1f}): first step {run['first_step_s']:7.1f} s "
                      f"({run['first_step_cpu_s']:7.1f} CPU-s; data ready {run['data_s']:6.1f} s), "
                      f"{run['tokens_per_s']:9,.0f} tok/s, {run['tokens_per_cpu_s']:9,.0f} tok/CPU-s, "
                      f"waiting for data {run['data_wait']:.2%}", flush=True)

        reader = reader_alone(overrides("stream", args.repeats, root / "cache-reader"), 20, args.reader_batches)

    summary = summarise(runs)
    corpus_info = {kind: json.loads((corpora[kind] / "corpus.json").read_text()) for kind in ("stream", "map")}
    print(
        f"\nmodel: {args.size} ({params / 1e6:.1f}M parameters), {torch.get_num_threads()} torch thread(s), "
        f"{recipe.precision}; {runs[0]['steady_tokens'] // runs[0]['steady_steps']:,} tokens a step ({args.block} a sequence)\n"
        f"runs: {args.steps} steps each, tokens/s over steps {args.warmup + 1}-{args.steps}; medians over "
        f"{args.repeats} round(s), the map path cold in {summary['map']['runs']}\n"
        f"corpus: stream {corpus_info['stream']['text_bytes'] / 1e9:.2f} GB, map and blocks "
        f"{corpus_info['map']['text_bytes'] / 1e9:.2f} GB of text in {args.shards} parquet files\n"
    )
    print(f"{'':<29} {'first step':>10} {'':>10} {'data ready':>10} {'tok/s':>9} {'x blocks':>8} {'tok/CPU-s':>10} "
          f"{'x blocks':>8} {'data wait':>9}")
    labels = {"stream": "stream (data.streaming=true)", "map": "map, cold cache", "blocks": "blocks (map, warm cache)"}
    for kind in KINDS:
        row = summary[kind]
        print(f"{labels[kind]:<29} {row['first_step_s']:>8.1f} s {row['first_step_cpu_s']:>6.1f} CPU-s "
              f"{row['data_s']:>8.1f} s {row['tokens_per_s']:>9,.0f} {row['ratio']:>8.3f} "
              f"{row['tokens_per_cpu_s']:>10,.0f} {row['cpu_ratio']:>8.3f} {row['data_wait']:>9.2%}")
    stream, blocks, cold = summary["stream"], summary["blocks"], summary["map"]
    gigabytes = corpus_info["map"]["text_bytes"] / 1e9
    print(
        f"\nstream / blocks tok/s by round: {', '.join(f'{r:.3f}' for r in stream['ratios'])} "
        f"(CPU time: {', '.join(f'{r:.3f}' for r in stream['cpu_ratios'])})\n"
        f"stream minus blocks, per million tokens: {1e6 / stream['tokens_per_s'] - 1e6 / blocks['tokens_per_s']:.2f} s, "
        f"{1e6 / stream['tokens_per_cpu_s'] - 1e6 / blocks['tokens_per_cpu_s']:.2f} CPU-s\n"
        f"map path: {gigabytes:.2f} GB prepared in {cold['data_s']:.0f} s ({cold['data_s'] / gigabytes:.0f} s per GB; "
        f"first step after {cold['first_step_cpu_s'] / gigabytes:.0f} CPU-s per GB)\n"
        f"reader alone (one process's stream, nothing training): {reader['tokens_per_s']:,.0f} tok/s "
        f"({reader['tokens_per_s'] / blocks['tokens_per_s']:.2f} x the blocks run), {reader['tokens_per_cpu_s']:,.0f} tok/CPU-s, "
        f"reader process peak RSS {reader['reader_peak_rss_mb']:,.0f} MB\n"
        f"targets: stream's first step within 30 s ({stream['first_step_s']:.1f} s); "
        f"stream / blocks tok/s at least 0.97 ({stream['ratio']:.3f}; the stream's data wait {stream['data_wait']:.2%}, "
        f"the blocks' {blocks['data_wait']:.2%})"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        config = vars(args) | {"parameters": params, "torch_threads": torch.get_num_threads(), "corpus": corpus_info}
        args.json.write_text(json.dumps({"config": config, "summary": summary, "reader_alone": reader, "runs": runs}, indent=2, default=str))
        print(f"wrote {args.json}")


def summarise(runs: list[dict]) -> dict:
    """Medians per kind over its runs, and each run's tok/s ratios to the blocks run of the same round."""
    blocks = {r["repeat"]: r for r in runs if r["kind"] == "blocks"}
    summary = {}
    for kind in KINDS:
        rows = [r for r in runs if r["kind"] == kind]
        keys = ("first_step_s", "first_step_cpu_s", "data_s", "tokens_per_s", "tokens_per_cpu_s", "data_wait")
        median = {key: statistics.median(r[key] for r in rows) for key in keys}
        ratios = [r["tokens_per_s"] / blocks[r["repeat"]]["tokens_per_s"] for r in rows]
        cpu_ratios = [r["tokens_per_cpu_s"] / blocks[r["repeat"]]["tokens_per_cpu_s"] for r in rows]
        summary[kind] = median | {"runs": len(rows), "ratios": ratios, "ratio": statistics.median(ratios),
                                  "cpu_ratios": cpu_ratios, "cpu_ratio": statistics.median(cpu_ratios)}
    return summary


if __name__ == "__main__":
    main()
