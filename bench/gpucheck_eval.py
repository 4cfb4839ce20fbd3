"""The GPU check's `eval` part: `gqa eval` of the converted model against its source on the check's device:
KV-cache bytes per token (from the config and measured), peak memory and decode speed at each context."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

from gpucheck_commands import Commands, fresh, judged
from gpucheck_fixture import Sizes

DECODE_KEYS = ("context", "peak_memory_bytes", "kv_cache_bytes", "cached_tokens", "prefill_s", "decode_tokens_per_s")


def eval_part(commands: Commands, sizes: Sizes, fixture: dict[str, Path]) -> dict[str, Any]:
    report_dir = fresh(commands.workdir / "eval-report")
    argv = ["eval", str(fixture["converted"]), "--baseline", str(fixture["source"]), "--data", str(fixture["heldout"]),
            "--seq-len", str(sizes.eval_seq_len), "--report", str(report_dir),
            "--contexts", ",".join(map(str, sizes.eval_contexts)), "--new-tokens", str(sizes.eval_new_tokens),
            "--max-tokens", str(sizes.eval_max_tokens), "--device", commands.mode, "--dtype", sizes.eval_dtype,
            "--no-update-card"]
    cmd = [sys.executable, "-m", "gqa.train.cli", *argv]
    commands.run_isolated(cmd, "eval", lambda: gqa_main(argv))
    results = json.loads((report_dir / "eval.json").read_text())
    models = {entry["role"]: model_summary(entry) for entry in results["models"]}
    model, baseline = models["model"], models["baseline"]
    result = {
        "command": shlex.join(cmd),
        "device": results["device"],
        "dtype": results["dtype"],
        "peak_memory_kind": results["peak_memory_kind"],
        "agreement": results.get("agreement"),
        "kv_cache_ratio": baseline["kv_cache_bytes_per_token"] / model["kv_cache_bytes_per_token"],
        "models": models,
    }
    decodes = [d for m in models.values() for d in m["decode"]]
    return judged(result, {
        "ran_on_the_device": results["device"] == commands.mode,
        "kv_cache_matches_config": all(m["kv_cache_matches_config"] for m in models.values()),
        "kv_cache_ratio_is_heads_over_kv_heads": result["kv_cache_ratio"] == sizes.heads / sizes.kv_heads,
        "every_context_decoded": all(len(m["decode"]) == len(sizes.eval_contexts) for m in models.values()),
        "peak_memory_measured": bool(decodes) and all(d["peak_memory_bytes"] > 0 for d in decodes),
    })


def model_summary(entry: dict[str, Any]) -> dict[str, Any]:
    """One model's figures from eval.json, as the check reports them."""
    kv = entry["kv_cache"]
    return {
        "kv_heads": entry.get("kv_heads"),
        "perplexity": entry.get("perplexity"),
        "kv_cache_bytes_per_token": kv["bytes_per_token"],
        "kv_cache_measured_bytes_per_token": kv["measured_bytes_per_token"],
        "kv_cache_matches_config": kv["matches_config"],
        "kv_cache_bytes_at_context": kv["bytes_at_context"],
        "kv_context": kv["context"],
        "decode": [{k: d[k] for k in DECODE_KEYS} for d in entry["decode"]],
    }


def gqa_main(argv: list[str]) -> int:
    """The `gqa` console script's entry point, in this process."""
    from gqa.train.cli import main

    return main(argv)
