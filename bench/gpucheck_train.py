"""The GPU check's train parts (train_ddp, train_fsdp2, train_zero3): under a launcher, `gqa train` run
uninterrupted, and run stopped at budget.stop_at_step then resumed in the same folder; the two compared."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from gpucheck_commands import ENTRY_SCRIPT, REPO, Commands, Skip, free_port, fresh, judged
from gpucheck_compare import (compare_losses, compare_weights, losses_by_step, metrics_rows, output_state,
                              resume_matches)
from gpucheck_fixture import Sizes, train_overrides

RUN_MARKER = "\n[gpu_check run] "  # printed before each run of a batched launch
ACCELERATE_CONFIGS = {"ddp": "ddp.yaml", "fsdp2": "fsdp.yaml", "zero3": "deepspeed-zero3.yaml"}


def train_part(commands: Commands, sizes: Sizes, fixture: dict[str, Path], config: str,
               uninterrupted: dict[str, Path]) -> dict[str, Any]:
    """Launch the runs, compare them, judge (where skip_unless_supported lets the part run). `uninterrupted`
    collects each config's uninterrupted run, so the FSDP2 and ZeRO-3 parts can report how far they are from DDP's."""
    root = fresh(commands.workdir / f"train-{config}")
    runs = planned_runs(sizes, fixture, commands.workdir / "data-cache", root)
    launch = launcher(commands.mode, config, sizes.train_processes)
    launched, done = run_trainings(commands, config, launch, runs)
    result: dict[str, Any] = {
        "launcher": shlex.join(launch),
        "commands": launched,
        "run_seconds": {name: run["seconds"] for name, run in done.items()},
        "processes": sizes.train_processes,
        "steps": sizes.steps,
        "stop_at_step": sizes.stop_at,
        **compare_runs(sizes, fixture["converted"], root, done),
    }
    uninterrupted[config] = root / "whole"
    if config != "ddp" and "ddp" in uninterrupted:
        result["vs_ddp_uninterrupted"] = compare_weights(uninterrupted["ddp"], root / "whole")
    return judged(result, train_checks(config, sizes, fixture["converted"], root, done, result))


def skip_unless_supported(config: str, mode: str) -> None:
    if config in ("fsdp2", "zero3") and mode != "cuda":
        what = "FSDP2" if config == "fsdp2" else "DeepSpeed ZeRO-3"
        raise Skip(f"no GPU: {what} needs CUDA (on CPU accelerate runs gloo as MULTI_CPU and does not engage "
                   f"its {'FSDP' if config == 'fsdp2' else 'DeepSpeed'} plugin)")
    if config == "zero3" and not module_available("deepspeed"):
        raise Skip("DeepSpeed is not installed (pip install deepspeed)")


def planned_runs(sizes: Sizes, fixture: dict[str, Path], cache_dir: Path, root: Path) -> list[dict[str, Any]]:
    """The runs, in order, as {name, out, argv}: `whole` uninterrupted; `stopped` at stop_at, then `resumed` in
    the same folder; with sizes.repeat_reference, `whole-again` for the run-to-run noise."""
    plan = [("whole", root / "whole", []), ("stopped", root / "split", [f"budget.stop_at_step={sizes.stop_at}"]),
            ("resumed", root / "split", [])]
    if sizes.repeat_reference:
        plan.append(("whole-again", root / "whole-again", []))
    runs = []
    for name, out, extra in plan:
        overrides = train_overrides(
            model=fixture["converted"], train=fixture["train"], heldout=fixture["heldout"], cache_dir=cache_dir,
            block=sizes.block, steps=sizes.steps, global_batch=sizes.global_batch, micro=sizes.micro,
            precision="bf16", eval_blocks=8, out=out)
        runs.append({"name": name, "out": str(out), "argv": ["tiny-cpu", *overrides, "optimizer.lr=1e-3", *extra]})
    return runs


def launcher(mode: str, config: str, processes: int) -> list[str]:
    """The launch command up to what it runs (`-m gqa.train` or a script)."""
    if mode == "cpu":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_port", str(free_port())]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "recipes" / "accelerate" / ACCELERATE_CONFIGS[config]), "--num_processes", "1",
            "--num_machines", "1", "--machine_rank", "0", "--main_process_port", str(free_port())]


def run_trainings(commands: Commands, config: str, launch: list[str],
                  runs: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    """Run `gqa train` once per run, in order: the commands, and per run {seconds, after: the output dir's
    state, resuming_logged}.

    separate isolation: one launch per run (`LAUNCHER -m gqa.train RECIPE KEY=VALUE...`), as a user runs them;
    shared: one launch whose processes run gqa.train's entry point once per run (train_worker), keeping the
    process group up between runs (a launch costs seconds of imports on a small CPU machine). Either way a
    run's state is taken by finished_run as soon as it ends, and its resume is read from its own output.
    """
    if commands.isolation == "separate":
        launched, recorded, outputs = [], {}, {}
        for run in runs:
            cmd = [*launch, "-m", "gqa.train", *run["argv"]]
            launched.append(shlex.join(cmd))
            seconds, outputs[run["name"]] = commands.run(cmd, f"train-{config}-{run['name']}")
            recorded[run["name"]] = finished_run(run, seconds)
    else:
        spec, result = commands.workdir / f"train-{config}-runs.json", commands.workdir / f"train-{config}-result.json"
        spec.write_text(json.dumps({"runs": runs}))
        cmd = [*launch, str(ENTRY_SCRIPT), "--worker", "train", str(spec), str(result)]
        launched = [shlex.join(cmd)]
        _, output = commands.run(cmd, f"train-{config}")
        recorded = json.loads(result.read_text())  # train_worker's finished_run of each run
        segments = output.split(RUN_MARKER)[1:]  # rank 0 prints the marker, then the run's name, before each run
        outputs = {run["name"]: segment for run, segment in zip(runs, segments)}
    done = {name: {**recorded[name], "resuming_logged": "resuming from" in text} for name, text in outputs.items()}
    return launched, done


def finished_run(run: dict[str, Any], seconds: float) -> dict[str, Any]:
    """A run's time and what it left; taken when it ends, before the resumed run goes on in the stopped one's folder."""
    return {"seconds": round(seconds, 1), "after": output_state(Path(run["out"]))}


def compare_runs(sizes: Sizes, initial: Path, root: Path, done: dict[str, Any]) -> dict[str, Any]:
    """The stopped-and-resumed run against the uninterrupted one, losses and weights; and a control: training
    changed the initial weights, so a weight comparison that finds no difference means something."""
    whole, split = root / "whole", root / "split"
    stopped, resumed = done["stopped"]["after"], done["resumed"]["after"]
    resumed_steps = [r["step"] for r in metrics_rows(split)[stopped["metrics_rows"]:] if "loss" in r]
    compared = {
        "stopped_run": stopped,
        "resumed_run": {**resumed, "resumed_from_checkpoint": done["resumed"]["resuming_logged"],
                        "steps_run": resumed_steps},
        "resume": {**compare_weights(whole, split), **compare_losses(whole, split, sizes.steps)},
        "losses": {"uninterrupted": losses_by_step(whole), "stopped_and_resumed": losses_by_step(split)},
        "control_vs_initial_weights": compare_weights(initial, whole),
    }
    if sizes.repeat_reference:
        compared["repeat_reference"] = compare_weights(whole, root / "whole-again")
    return compared


def train_checks(config: str, sizes: Sizes, initial: Path, root: Path, done: dict[str, Any],
                 result: dict[str, Any]) -> dict[str, bool]:
    stopped, resumed = result["stopped_run"], result["resumed_run"]
    control = result["control_vs_initial_weights"]
    checks = {
        "stopped_at_step": stopped["status"] == "stopped" and stopped["steps"] == sizes.stop_at
        and f"step-{sizes.stop_at:08d}" in stopped["checkpoints"],
        "resumed_from_checkpoint": resumed["resumed_from_checkpoint"]
        and resumed["steps_run"] == list(range(sizes.stop_at + 1, sizes.steps + 1)),
        "finished": resumed["status"] == "finished" and done["whole"]["after"]["status"] == "finished",
        "training_changed_weights": control["same_tensors"] and control["max_abs_diff"] > 0,
        "resume_matches_uninterrupted": resume_matches(result["resume"], result.get("repeat_reference")),
    }
    files = stopped["checkpoint_files"]
    if config == "fsdp2":  # sharded: accelerate writes a torch.distributed.checkpoint folder, not model weights
        checks["sharded_checkpoint"] = any(f.startswith("pytorch_model_fsdp") for f in files)
    if config == "zero3":
        checks["zero_checkpoint"] = any(f == "pytorch_model" or f.startswith("global_step") for f in files)
    if config in ("fsdp2", "zero3"):  # the final gather: every tensor of the model, whole, in the saved files
        checks["final_model_gathered"] = compare_weights(initial, root / "split")["same_tensors"]
    return checks


def train_worker(spec_file: Path, result_file: Path) -> None:
    """Under a launcher: gqa.train's entry point once per run, in order, in these processes."""
    import torch.distributed
    from accelerate import PartialState

    from gqa.train.commands import main as train_main

    # Each run ends with accelerator.end_training(), which takes the process group down; bringing it up again in
    # the same processes is not reliable, so keep it for the next run (accelerate reuses an initialised group).
    PartialState.destroy_process_group = lambda self, group=None: None
    rank0 = int(os.environ.get("RANK", "0")) == 0
    recorded = {}
    for run in json.loads(spec_file.read_text())["runs"]:
        if rank0:
            print(f"{RUN_MARKER}{run['name']}", flush=True)
        started = time.perf_counter()
        status = train_main(run["argv"])
        if status:
            raise SystemExit(f"gqa train exited with status {status} in run {run['name']}")
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        recorded[run["name"]] = finished_run(run, time.perf_counter() - started)
    if rank0:
        result_file.write_text(json.dumps(recorded))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def module_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
