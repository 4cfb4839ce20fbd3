"""What `gqa eval --tasks` costs next to a perplexity run on the CPU, and what each says, on SmolLM2-135M.

The original SmolLM2-135M-Instruct (3 KV heads) and its conversion to 1 KV head are scored together, in
rounds, three ways: perplexity under the stream convention, perplexity under the documents convention
(both on the same held-out tokens), and the two offline tasks (gqa_docstrings, gqa_pyref). Each timing is
one whole `evaluate()` call with both models (loading included, decode speed skipped); the ratio is to the
stream perplexity run of the same round.

    .venv/bin/python bench/bench_eval.py                        # mean conversion, 2 rounds
    .venv/bin/python bench/bench_eval.py --method aligned --rounds 1 --json /tmp/eval.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from gqa.convert.convert import ConvertOptions, convert
from gqa.train.api import write_corpus
from gqa.train.demo import fetch_default_model
from gqa.train.docs_tasks import write_tasks
from gqa.train.evaluate import evaluate
from gqa.train.tasks import TaskSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--method", default="mean", help="convert's --method for the 1-KV-head model (default mean)")
    parser.add_argument("--items", type=int, default=160, help="items of each task (default 160, all of them)")
    parser.add_argument("--eval-bytes", type=int, default=40_000,
                        help="score the held-out docstrings' first paragraphs up to this many bytes (default 40,000; "
                             "0: the whole split, about 250 KB)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--work", default=None, help="folder for the conversion, corpus and tasks (default: a temp dir)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="gqa-bench-eval-"))
    source = fetch_default_model()
    options = ConvertOptions(kv_heads=1, method=args.method, force=True, refine_steps=0)
    converted = convert(str(source), work / f"smollm2-mqa-{args.method}", options).out_dir
    heldout = write_corpus(work / "corpus")["heldout"]
    if args.eval_bytes:  # whole paragraphs, so that every byte scored is in the per-byte figures
        kept, size = [], 0
        for paragraph in heldout.read_text().split("\n\n"):
            size += len(paragraph.encode()) + 2
            if size > args.eval_bytes:
                break
            kept.append(paragraph)
        heldout = work / "heldout-part.txt"
        heldout.write_text("\n\n".join(kept) + "\n")
    tasks = TaskSettings(tuple(write_tasks(work / "tasks", items=args.items)), include_paths=(str(work / "tasks"),))
    runs = {
        "perplexity, stream": dict(data_files=[heldout], convention="stream"),
        "perplexity, documents": dict(data_files=[heldout], convention="documents"),
        "tasks": dict(tasks=tasks),
    }
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    results = {}
    for _ in range(args.rounds):
        for name, kwargs in runs.items():
            start = time.perf_counter()
            results[name] = evaluate(converted, source, seq_len=args.seq_len, contexts=(),
                                     update_card=False, progress=False, **kwargs)  # fmt: skip
            seconds[name].append(time.perf_counter() - start)

    base = statistics.median(seconds["perplexity, stream"])
    print(f"\n{converted.name} against {source.name}; {args.rounds} round(s), median seconds of one evaluate()")
    print("| run | seconds (each round) | x stream perplexity | what it scored | model | original |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name, times in seconds.items():
        out = results[name]
        median = statistics.median(times)
        each = ", ".join(f"{t:.1f}" for t in times)
        if name == "tasks":
            for r in out["tasks"]["rows"]:
                print(f"| {name} | {each} | {median / base:.2f} | {r['task']} {r['metric']}, {r['samples']} items | "
                      f"{r['model']:.3f} | {r['baseline']:.3f} |")
            rows.append({"run": name, "seconds": times, "rows": out["tasks"]["rows"]})
            continue
        model, original = out["models"]
        what = f"{out['data']['predicted_tokens']:,} tokens"
        print(f"| {name} | {each} | {median / base:.2f} | {what}, perplexity | {model['perplexity']:.2f} | "
              f"{original['perplexity']:.2f} |")
        if model.get("bits_per_byte") is not None:
            print(f"| {name} | | | bits per byte | {model['bits_per_byte']:.4f} | {original['bits_per_byte']:.4f} |")
        rows.append({"run": name, "seconds": times, "data": out["data"], "model": model["perplexity"],
                     "original": original["perplexity"], "model_bpb": model.get("bits_per_byte"),
                     "original_bpb": original.get("bits_per_byte")})  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
