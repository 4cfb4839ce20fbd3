"""bench/gpu_check.py, run in its CPU mode: every part reported, the resumed DDP run checked bit for bit,
throughput measured, failures and the time budget reported instead of crashing the script."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.py"
PARTS = ("cuda_tests", "train_ddp", "train_fsdp2", "train_zero3", "eval", "throughput")


sys.path.insert(0, str(REPO / "bench"))  # the check's modules, found as the script finds them
import gpucheck_compare  # noqa: E402
import gpucheck_throughput  # noqa: E402


@pytest.fixture(autouse=True)
def restore_environment():
    """The check, run in this process, sets offline and thread variables for its in-process parts; no
    other test may inherit them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def run_check(tmp_path: Path, *args: str, name: str = "check") -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / f"{name}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    return done, json.loads(out.read_text())


def assert_well_formed(report: dict) -> None:
    assert list(report["parts"]) == list(PARTS)
    for name, part in report["parts"].items():
        assert part["status"] in ("ok", "skipped", "failed"), name
        assert part["seconds"] >= 0
        if part["status"] == "skipped":
            assert part["reason"], name
        if part["status"] == "failed":
            assert part["error"], name
    assert report["mode"] == "cpu" and report["seconds"] > 0 and report["finished"]


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    """One whole CPU-mode run (about 25 s on 2 cores), its work folder kept for a look of our own."""
    root = tmp_path_factory.mktemp("gpu-check")
    done, report = run_check(root, "--workdir", str(root / "work"), "--peak-tflops", "1")
    return done, report, root / "work"


def test_cpu_mode_reports_every_part(cpu_check):
    done, report, _ = cpu_check
    assert done.returncode == 0, json.dumps(report, indent=1)[-4000:]
    assert_well_formed(report)
    parts = report["parts"]
    assert report["status"] == "ok" and report["isolation"] == "shared"
    expected = "--device cpu: the GPU is not used" if torch.cuda.is_available() else "no GPU: torch sees no CUDA device"
    assert parts["cuda_tests"] == {"status": "skipped", "reason": expected, "seconds": parts["cuda_tests"]["seconds"]}
    for name in ("train_fsdp2", "train_zero3"):
        assert parts[name]["status"] == "skipped" and "needs CUDA" in parts[name]["reason"], parts[name]
    assert {parts[n]["status"] for n in ("train_ddp", "eval", "throughput")} == {"ok"}


def test_the_resumed_ddp_run_is_bit_identical_to_the_uninterrupted_one(cpu_check):
    _, report, work = cpu_check
    ddp = report["parts"]["train_ddp"]
    assert ddp["status"] == "ok", ddp
    assert ddp["processes"] == 2 and "torch.distributed.run --nproc_per_node 2" in ddp["launcher"]
    assert all(ddp["checks"].values()) and set(ddp["checks"]) >= {
        "stopped_at_step", "resumed_from_checkpoint", "finished", "training_changed_weights",
        "resume_matches_uninterrupted"}
    # stopped at step 2 with a checkpoint there, then the second invocation ran steps 3 and 4 only
    assert ddp["stopped_run"]["status"] == "stopped" and ddp["stopped_run"]["steps"] == 2
    assert ddp["stopped_run"]["checkpoints"] == ["step-00000002"] and not ddp["stopped_run"]["final_model"]
    assert ddp["resumed_run"]["resumed_from_checkpoint"] and ddp["resumed_run"]["steps_run"] == [3, 4]
    resume = ddp["resume"]
    assert resume["same_tensors"] and resume["bit_identical"] and resume["max_abs_diff"] == 0.0
    assert resume["tensors_differing"] == 0 and resume["tensors"] > 0
    assert resume["losses_identical"] and resume["loss_max_abs_diff"] == 0.0
    assert ddp["losses"]["uninterrupted"] == ddp["losses"]["stopped_and_resumed"]
    assert sorted(ddp["losses"]["uninterrupted"], key=int) == ["1", "2", "3", "4"]
    # the control: the comparison does see training's changes (so "identical" above means something)
    control = ddp["control_vs_initial_weights"]
    assert not control["bit_identical"] and control["max_abs_diff"] > 0
    assert control["tensors_differing"] == control["tensors"] == resume["tensors"]
    # and the files say what the report says
    whole, split = (load_file(work / "train-ddp" / run / "model.safetensors") for run in ("whole", "split"))
    assert set(whole) == set(split) and all(torch.equal(whole[k], split[k]) for k in whole)


def test_eval_reports_kv_cache_and_peak_memory(cpu_check):
    _, report, _ = cpu_check
    ev = report["parts"]["eval"]
    assert ev["status"] == "ok" and ev["device"] == "cpu" and all(ev["checks"].values())
    model, baseline = ev["models"]["model"], ev["models"]["baseline"]
    assert (baseline["kv_heads"], model["kv_heads"]) == (8, 2) and ev["kv_cache_ratio"] == 4.0
    assert model["kv_cache_bytes_per_token"] == model["kv_cache_measured_bytes_per_token"] > 0
    assert [d["context"] for d in model["decode"]] == [32, 64]
    assert all(d["peak_memory_bytes"] > 0 for m in (model, baseline) for d in m["decode"])


def test_throughput_of_gqa_train_and_a_bare_loop(cpu_check):
    _, report, _ = cpu_check
    tp = report["parts"]["throughput"]
    assert tp["status"] == "ok" and tp["device"] == "cpu" and tp["precision"] == "fp32"
    for run in ("gqa_train", "bare_loop"):
        assert tp[run]["tokens_per_s"] > 0 and tp[run]["steps_timed"] == tp["steps"] - 2
        assert len(tp[run]["per_step_tokens_per_s"]) == tp["steps"]
        # --peak-tflops 1: utilisation is 6 x parameters x tokens/s over 1e12 FLOP/s
        assert tp[run]["mfu"] == pytest.approx(6 * tp["parameters"] * tp[run]["tokens_per_s"] / 1e12)
    assert tp["peak_source"] == "--peak-tflops" and tp["ratio_gqa_to_bare"] > 0
    assert tp["tokens_per_step"] == tp["batch"]["global_sequences"] * tp["batch"]["block"]


def test_a_failing_part_is_reported_and_the_script_goes_on(tmp_path):
    done, report = run_check(tmp_path, "--parts", "cuda_tests,train_fsdp2,train_zero3", "--inject-failure", "cuda_tests")
    assert done.returncode == 1 and report["status"] == "failed"
    assert_well_formed(report)
    failed = report["parts"]["cuda_tests"]
    assert failed["status"] == "failed" and "exit status 1" in failed["error"]
    assert "injected failure" in failed["output_tail"]
    # the parts after it still ran (here: found their reasons to skip on a CPU)
    assert "needs CUDA" in report["parts"]["train_fsdp2"]["reason"]
    assert "needs CUDA" in report["parts"]["train_zero3"]["reason"]
    assert report["parts"]["eval"]["reason"] == "not selected (--parts)"
    assert "Traceback" not in done.stderr


def test_parts_that_do_not_fit_the_budget_are_skipped_with_the_reason(tmp_path):
    done, report = run_check(tmp_path, "--budget-s", "0")
    assert done.returncode == 0
    assert_well_formed(report)
    assert all(p["status"] == "skipped" and p["reason"].startswith("time budget") for p in report["parts"].values())


def test_weight_comparison_sees_a_single_changed_value(tmp_path):
    torch.manual_seed(0)
    tensors = {"a.weight": torch.randn(4, 8), "b.bias": torch.randn(8)}
    for name, change in (("same", None), ("nudged", 1e-7), ("renamed", "rename")):
        folder = tmp_path / name
        folder.mkdir()
        state = {k: v.clone() for k, v in tensors.items()}
        if change == "rename":
            state["c.bias"] = state.pop("b.bias")
        elif change:
            state["b.bias"][3] += change
        save_file(state, str(folder / "model.safetensors"))
    (tmp_path / "base").mkdir()
    save_file(tensors, str(tmp_path / "base" / "model.safetensors"))

    same = gpucheck_compare.compare_weights(tmp_path / "base", tmp_path / "same")
    assert same == {"same_tensors": True, "bit_identical": True, "max_abs_diff": 0.0, "tensors": 2, "tensors_differing": 0}
    nudged = gpucheck_compare.compare_weights(tmp_path / "base", tmp_path / "nudged")
    assert not nudged["bit_identical"] and nudged["tensors_differing"] == 1
    assert nudged["max_abs_diff"] == pytest.approx(1e-7, rel=0.5)
    renamed = gpucheck_compare.compare_weights(tmp_path / "base", tmp_path / "renamed")
    assert not renamed["same_tensors"] and not renamed["bit_identical"]
    assert not gpucheck_compare.compare_weights(tmp_path / "base", tmp_path / "absent")["same_tensors"]


def test_resume_is_judged_bit_for_bit_unless_uninterrupted_runs_differ_too():
    def cmp(diff):
        return {"same_tensors": True, "bit_identical": diff == 0, "max_abs_diff": diff}

    assert gpucheck_compare.resume_matches(cmp(0.0), None)
    assert not gpucheck_compare.resume_matches(cmp(1e-9), None)
    assert not gpucheck_compare.resume_matches(cmp(1e-9), cmp(0.0))  # deterministic runs: any difference is a fault
    assert gpucheck_compare.resume_matches(cmp(3e-6), cmp(1e-6))  # non-deterministic kernels: within 4x of run-to-run
    assert not gpucheck_compare.resume_matches(cmp(1e-4), cmp(1e-6))


def test_peak_flops_table_matches_device_names():
    peak = gpucheck_throughput.peak_tflops_for
    assert peak("NVIDIA H200") == 989.0 and peak("NVIDIA H100 80GB HBM3") == 989.0
    assert peak("NVIDIA H100 PCIe") == 756.0 and peak("NVIDIA L40S") == 362.0 and peak("NVIDIA L4") == 121.0
    assert peak("NVIDIA A100-SXM4-80GB") == 312.0 and peak("Some New GPU") is None


def test_every_cuda_only_test_carries_the_gpu_marker(pytestconfig):
    """`pytest -m gpu` (and the GPU check) runs the CUDA-only tests: each must be marked."""
    assert any(m.startswith("gpu:") for m in pytestconfig.getini("markers"))
    marked, cuda_only = set(), set()
    for path in (REPO / "tests").glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef) or not node.name.startswith("test_"):
                continue
            for decorator in map(ast.unparse, node.decorator_list):
                if decorator == "pytest.mark.gpu":
                    marked.add(node.name)
                if "skipif(not torch.cuda.is_available()" in decorator:
                    cuda_only.add(node.name)
    assert cuda_only and cuda_only <= marked, cuda_only - marked
