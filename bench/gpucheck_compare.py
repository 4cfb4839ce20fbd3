"""What a `gqa train` run left in its output folder, and two runs' results compared: per-step losses, and
final weights tensor by tensor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def output_state(out: Path) -> dict[str, Any]:
    """What a `gqa train` invocation left in its output dir: status, steps, metrics rows, checkpoints."""
    info = run_file(out)
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []
    newest = out / "checkpoints" / checkpoints[-1] if checkpoints else None
    return {"status": info.get("status"), "steps": info.get("steps"), "metrics_rows": len(metrics_rows(out)),
            "checkpoints": checkpoints, "checkpoint_files": sorted(p.name for p in newest.iterdir()) if newest else [],
            "final_model": (out / "config.json").is_file()}


def run_file(out: Path) -> dict[str, Any]:
    path = out / "gqa_run.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def metrics_rows(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def losses_by_step(out: Path) -> dict[int, float]:
    return {int(r["step"]): r["loss"] for r in metrics_rows(out) if "loss" in r}


def compare_losses(a_dir: Path, b_dir: Path, steps: int) -> dict[str, Any]:
    """Both runs' losses of every step 1..steps, identical or how far apart."""
    a, b = losses_by_step(a_dir), losses_by_step(b_dir)
    common = sorted(set(a) & set(b))
    largest = max((abs(a[s] - b[s]) for s in common), default=float("nan"))
    return {"losses_identical": common == list(range(1, steps + 1)) and largest == 0.0, "loss_max_abs_diff": largest}


def load_weights(model_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def compare_weights(a_dir: Path, b_dir: Path) -> dict[str, Any]:
    """Tensor by tensor: the same names and shapes, how many differ, the largest absolute difference."""
    import torch

    a, b = load_weights(a_dir), load_weights(b_dir)
    same_tensors = bool(a) and set(a) == set(b) and all(a[k].shape == b[k].shape for k in a)
    if not same_tensors:
        return {"same_tensors": False, "bit_identical": False, "max_abs_diff": None, "tensors": len(b),
                "tensors_differing": None, "missing": sorted(set(a) - set(b))[:10], "extra": sorted(set(b) - set(a))[:10]}
    differing, largest = 0, 0.0
    for name, x in a.items():
        y = b[name]
        if x.dtype != y.dtype or not torch.equal(x, y):
            differing += 1
            largest = max(largest, (x.double() - y.double()).abs().max().item())
    return {"same_tensors": True, "bit_identical": differing == 0, "max_abs_diff": largest, "tensors": len(a),
            "tensors_differing": differing}


def resume_matches(resume: dict[str, Any], repeat: dict[str, Any] | None) -> bool:
    """Bit for bit; or, where two uninterrupted runs already differ (a GPU's non-deterministic kernels),
    no further apart than four times their difference."""
    if resume["bit_identical"]:
        return True
    if repeat is None or repeat["bit_identical"] or not repeat["same_tensors"] or resume["max_abs_diff"] is None:
        return False
    return resume["max_abs_diff"] <= 4 * repeat["max_abs_diff"]
