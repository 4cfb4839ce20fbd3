"""How far each merge method starts from the original, and where the same uptraining takes it.

SmolLM2-135M-Instruct (the embedded default), 3 KV heads -> 1. Perplexity on held-out real text
that neither calibration nor training sees: docstrings of the standard-library packages in
gqa.convert.corpus.HELDOUT_PACKAGES (calibration uses a few other modules, training the rest).

    .venv/bin/python bench/bench_merge_quality.py                       # 0 steps, every method
    .venv/bin/python bench/bench_merge_quality.py --train mean aligned aligned+distill
    .venv/bin/python bench/bench_merge_quality.py --methods refined --train refined refined+distill

`--train original` trains the unconverted model the same way: the control that shows how much of
the gain is the training text's domain rather than recovery.
`refined` is `--method aligned --refine-steps N --refine-lr LR` (--refine-steps, default 400;
--refine-lr, the converter's default); both aligned methods calibrate on --calibration-sequences
sequences of the converter's --calibration-length (defaults: the converter's, 128 x 512). A `+distill` run
trains with loss.kind=distill (loss.distill_weight=1, temperature 1) from the original.

Prints a table and writes it as JSON (--json). On 2 CPU cores, mean takes seconds and refined about
22 minutes at the default calibration; each uptraining run is the shipped CPU recipe (about 120K
tokens, 7 minutes). Where torch sees a GPU, the conversions' calibration pass and the uptraining run
on it (perplexity is still scored on the CPU), which makes the heavier refinement practical:

    python bench/bench_merge_quality.py --methods refined --train refined --calibration stdlib-docs:train \
        --calibration-sequences 512 --refine-steps 1600 --refine-batch 32      # about 5 minutes on an H200
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gqa.convert.convert import ConvertOptions, convert
from gqa.train.api import run_recipe
from gqa.convert.corpus import corpus_text
from gqa.convert.text import leading_bos, text_documents, token_stream
from gqa.train.demo import fetch_default_model
from gqa.train.heldout import HeldOut, score_windows, windows_of


# The converter's own defaults (ConvertOptions is a pydantic model: defaults live on its fields).
DEFAULTS = {name: field.default for name, field in ConvertOptions.model_fields.items()}


def perplexity(model_dir: Path, windows: HeldOut) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return score_windows(model, windows, torch.device("cpu"), batch_size=4, progress=False)["model"]["perplexity"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["mean", "first", "random", "aligned"])
    parser.add_argument("--train", nargs="*", default=[], help="METHOD or METHOD+distill runs to uptrain")
    parser.add_argument("--windows", type=int, default=32, help="held-out windows of --seq-len tokens")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--refine-steps", type=int, default=400, help="--refine-steps of the 'refined' method")
    parser.add_argument("--refine-lr", type=float, default=DEFAULTS["refine_lr"], help="--refine-lr of 'refined'")
    parser.add_argument("--calibration-sequences", type=int, default=DEFAULTS["calibration_sequences"],
                        help="--calibration-sequences of 'aligned' and 'refined' (default: the converter's)")
    parser.add_argument("--calibration-length", type=int, default=DEFAULTS["calibration_length"],
                        help="--calibration-length of 'aligned' and 'refined' (default: the converter's)")
    parser.add_argument("--refine-batch", type=int, default=DEFAULTS["refine_batch"], help="--refine-batch of 'refined'")
    parser.add_argument("--calibration", default=None,
                        help="--calibration of 'aligned' and 'refined': a text file or stdlib-docs:train (default: the converter's)")
    parser.add_argument("--work", default="runs/bench-quality")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    source = fetch_default_model()
    work = Path(args.work)
    tokenizer = AutoTokenizer.from_pretrained(source)
    # The held-out split as training and `gqa eval` read its file: paragraphs, EOS after each.
    documents = text_documents(corpus_text("heldout"))
    stream = token_stream(tokenizer, documents, max_tokens=args.windows * args.seq_len)
    windows = windows_of(stream, args.seq_len, leading_bos(tokenizer))
    windows.windows = windows.windows[: args.windows]
    rows = []

    def record(name: str, model_dir: Path, seconds: float, steps: int = 0) -> None:
        ppl = perplexity(model_dir, windows)
        rows.append({"model": name, "steps": steps, "perplexity": ppl, "ratio": ppl / rows[0]["perplexity"] if rows else 1.0,
                     "seconds": round(seconds, 1)})  # fmt: skip
        print(f"{name:<28} steps {steps:>4}  ppl {ppl:>12.2f}  x{rows[-1]['ratio']:>10.2f}  ({seconds:.0f} s)", flush=True)

    record("original (3 KV heads)", source, 0.0)
    trained = {run.split("+")[0] for run in args.train} - {"original"}
    methods = [m for m in args.methods if m != "original"] + sorted(trained - set(args.methods))
    for method in methods:
        started = time.perf_counter()
        calibration = {"calibration": args.calibration, "calibration_sequences": args.calibration_sequences,
                       "calibration_length": args.calibration_length}
        if method == "refined":
            options = ConvertOptions(kv_heads=1, method="aligned", refine_steps=args.refine_steps, refine_lr=args.refine_lr,
                                     refine_batch=args.refine_batch, force=True, **calibration)
        else:
            options = ConvertOptions(kv_heads=1, method=method, force=True, **calibration)
        out = convert(str(source), work / method, options)
        record(f"{method} (1 KV head)", out.out_dir, time.perf_counter() - started)
    for run in args.train:
        method, _, distill = run.partition("+")
        # `original`: the unconverted model under the same training, the control for what the
        # training text alone does to held-out perplexity (the same domain as the held-out text).
        model_path = source if method == "original" else work / method
        overrides = [f"model.path={model_path}", f"output.dir={work / (run + '-trained')}", "resume=never"]
        if distill:
            overrides += [f"model.teacher={source}", "loss.kind=distill", "loss.distill_weight=1.0", "loss.temperature=1.0"]
        started = time.perf_counter()
        result = run_recipe("smollm2-135m-mqa", overrides)
        record(f"{run} + uptraining", Path(result.output_dir), time.perf_counter() - started, result.steps)

    print(f"\nheld-out: {len(windows)} windows x {args.seq_len} tokens of stdlib-docs:heldout")
    if args.json:
        Path(args.json).write_text(json.dumps({"windows": len(windows), "seq_len": args.seq_len, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
