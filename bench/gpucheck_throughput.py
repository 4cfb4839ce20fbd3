"""The GPU check's `throughput` part: tokens/s and model FLOPs utilisation of one random-weight Llama trained by
`gqa train` and by a bare PyTorch loop (same blocks in the same order, AdamW, autocast, clipping)."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import bare_step, bare_training
from gpucheck_commands import ENTRY_SCRIPT, Commands, fresh
from gpucheck_compare import metrics_rows
from gpucheck_fixture import Sizes, llama_config, train_overrides

# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s, by a substring of torch.cuda.get_device_name();
# the first match wins, so more specific names come first. --peak-tflops overrides it.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
)


def peak_tflops_for(device_name: str) -> float | None:
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in device_name), None)


def throughput_part(commands: Commands, sizes: Sizes, fixture: dict[str, Path], device: dict[str, Any],
                    peak_tflops: float | None) -> dict[str, Any]:
    spec = {
        "device": commands.mode,
        "shape": sizes.tp_shape,
        "block": sizes.tp_block,
        "global_batch": sizes.tp_global,
        "micro": sizes.tp_micro,
        "steps": sizes.tp_steps,
        "warmup": sizes.tp_warmup,
        "precision": sizes.tp_precision,
        "tokenizer": str(fixture["source"]),
        "train": str(fixture["train"]),
        "heldout": str(fixture["heldout"]),
        "root": str(fresh(commands.workdir / "throughput")),
    }
    spec_file = commands.workdir / "throughput-spec.json"
    result_file = commands.workdir / "throughput-result.json"
    spec_file.write_text(json.dumps(spec))
    cmd = [sys.executable, str(ENTRY_SCRIPT), "--worker", "throughput", str(spec_file), str(result_file)]
    commands.run_isolated(cmd, "throughput", lambda: throughput_worker(spec_file, result_file))
    result = json.loads(result_file.read_text())
    return {**result, **utilisation(result, commands.mode, device.get("name", ""), peak_tflops)}


def utilisation(result: dict[str, Any], mode: str, device_name: str, peak: float | None) -> dict[str, Any]:
    """Model FLOPs utilisation of both runs, and where the peak it is measured against came from."""
    peak_source = "--peak-tflops" if peak else None
    if peak is None and mode == "cuda":
        peak = peak_tflops_for(device_name)
        peak_source = f"table entry for {device_name}" if peak else None
    flops_per_token = 6 * result["parameters"]
    runs = {run: {**result[run], "mfu": flops_per_token * result[run]["tokens_per_s"] / (peak * 1e12) if peak else None}
            for run in ("gqa_train", "bare_loop")}
    return {
        **runs,
        "peak_tflops": peak,
        "peak_source": peak_source or ("none: no bf16 peak is known for a CPU; pass --peak-tflops" if mode == "cpu"
                                       else f"none: {device_name} is not in the table; pass --peak-tflops"),
        "ratio_gqa_to_bare": runs["gqa_train"]["tokens_per_s"] / runs["bare_loop"]["tokens_per_s"],
        "flops_per_token": flops_per_token,
        "mfu_formula": "6 x parameters (embeddings included) x tokens/s / peak dense bf16 FLOP/s",
    }


def throughput_worker(spec_file: Path, result_file: Path) -> None:
    """`gqa train` and a bare PyTorch loop, one after the other in this process, on one model and batch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gqa.train.commands import main as gqa_train

    spec = json.loads(spec_file.read_text())
    device = torch.device(spec["device"])
    root = Path(spec["root"])
    hidden, layers, heads, kv_heads, intermediate, vocab = spec["shape"]
    config = llama_config(hidden, layers, heads, kv_heads, intermediate, vocab, max(spec["block"], 2048))
    model_dir = root / "model"
    started = time.perf_counter()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    with torch.device(device):  # initialising 1B parameters is much faster on the GPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    parameters = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    model.save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(spec["tokenizer"]).save_pretrained(model_dir)
    del model
    build_s = time.perf_counter() - started
    release(device)

    overrides = train_overrides(
        model=model_dir, train=spec["train"], heldout=spec["heldout"], cache_dir=root / "cache", block=spec["block"],
        steps=spec["steps"], global_batch=spec["global_batch"], micro=spec["micro"], precision=spec["precision"],
        eval_blocks=spec["micro"], out=root / "gqa-train")

    def peak_memory() -> int | None:  # since the last release()
        return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    started = time.perf_counter()
    status = gqa_train(["tiny-cpu", *overrides])  # `gqa train tiny-cpu KEY=VALUE...`, in this process
    if status:
        raise RuntimeError(f"gqa train exited with status {status}")
    gqa_wall = time.perf_counter() - started
    gqa_peak = peak_memory()
    release(device)
    gqa_steps = [r["tokens_per_second"] for r in metrics_rows(root / "gqa-train") if "tokens_per_second" in r]
    bare_steps = bare_loop(spec, model_dir, overrides, device)
    bare_peak = peak_memory()

    def summary(rates: list[float], peak: int | None) -> dict[str, Any]:
        timed = rates[spec["warmup"]:] or rates
        return {"tokens_per_s": statistics.median(timed), "steps_timed": len(timed),
                "per_step_tokens_per_s": [round(r, 1) for r in rates], "peak_memory_bytes": peak}

    result_file.write_text(json.dumps({
        "model": {"hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv_heads,
                  "intermediate": intermediate, "vocab": vocab},
        "parameters": parameters,
        "embedding_parameters": embedding,
        "precision": spec["precision"],
        "device": str(device),
        "tokens_per_step": spec["global_batch"] * spec["block"],
        "batch": {"global_sequences": spec["global_batch"], "micro": spec["micro"], "block": spec["block"]},
        "steps": spec["steps"],
        "timing": f"median tokens/s of steps {spec['warmup'] + 1}..{spec['steps']} (each step timed on its own)",
        "gqa_train": {**summary(gqa_steps, gqa_peak), "wall_s_with_setup_and_save": round(gqa_wall, 1)},
        "bare_loop": summary(bare_steps, bare_peak),
        "build_model_s": round(build_s, 1),
        "peak_memory_kind": "torch.cuda.max_memory_allocated during each run" if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
    }, indent=2))


def bare_loop(spec: dict[str, Any], model_dir: Path, overrides: list[str], device) -> list[float]:
    """What a hand-written loop does with the same blocks in the same order: tokens/s of each step."""
    from transformers import get_scheduler

    from gqa.train.api import load_recipe

    recipe = load_recipe("tiny-cpu", overrides)
    steps, micro, global_batch = spec["steps"], spec["micro"], spec["global_batch"]
    blocks, model, optimizer, accumulation = bare_training(recipe, model_dir, steps, global_batch, micro, device)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=steps)
    rates = []
    for step in range(steps):
        start = time.perf_counter()
        loss = bare_step(model, optimizer, scheduler, blocks[step * accumulation:(step + 1) * accumulation], device,
                         spec["precision"] == "bf16", recipe.optimizer.max_grad_norm)
        loss.item()  # as gqa train does each step: the step is done when its loss is read
        rates.append(global_batch * spec["block"] / (time.perf_counter() - start))
    return rates


def release(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
