"""A streamed run killed with SIGKILL, from outside, at a random step and then in the middle of a checkpoint
write, and started again each time with the same command, ends bit-identical to an uninterrupted run: with
one process and with two (torchrun, gloo DDP).

The data is real text (the docstrings of a few standard-library modules) in four parquet shards. Each launch
runs train_kill_worker.py: two runs in turn in the same processes, the interrupted one (output dir `killed`)
and then an uninterrupted one (`whole`) to compare with, so the launch that finishes the interrupted run also
makes the reference. The kills land before the reference starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from gqa.train import rundir
from train_helpers import REPO, TRAIN_MODULES, make_model, tiny_overrides, torchrun, write_shards

RECIPE = REPO / "recipes" / "tiny-cpu.yaml"
TESTS = Path(__file__).resolve().parent
SHARDS = (TRAIN_MODULES[:2], TRAIN_MODULES[2:3], TRAIN_MODULES[3:5], TRAIN_MODULES[5:])
STEPS = 8  # checkpoints at 2, 4, 6, 8


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("train-kill")
    shards, held = write_shards(root, SHARDS)
    return SimpleNamespace(model=make_model(root), shards=shards, held=held, cache=root / "cache")


def command(ws, root: Path, processes: int) -> list[str]:
    """One launch: the interrupted run (resumed if it has checkpoints), then the uninterrupted one."""
    values = {"data.streaming": "true", "data.eval": "null", "data.eval_blocks": 8, "data.shuffle_buffer": 32,
              "eval.max_blocks": 8, "eval.every": 0, "budget.steps": STEPS, "checkpoint.every": 2,
              "batch.global_sequences": 8, "batch.micro": 2, "data.reader_timeout": 20}  # fmt: skip
    overrides = tiny_overrides(ws.model, ws.shards, ws.held, root / "unused", ws.cache, **values)
    launcher = torchrun(2) if processes == 2 else [sys.executable]
    return [*launcher, str(TESTS / "train_kill_worker.py"), str(RECIPE), str(root / "dump"), *overrides,
            "@killed", f"output.dir={root / 'killed'}", "@whole", f"output.dir={root / 'whole'}"]  # fmt: skip


def launch(cmd: list[str], log: Path, **hooks: str) -> subprocess.Popen:
    # PYTHONFAULTHANDLER: a process sent SIGABRT writes every thread's stack to the log (see wait_for)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", **hooks)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with open(log, "a") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill(process: subprocess.Popen, stacks: bool = False) -> None:
    """SIGKILL to the launch's process group and to each worker's: torchrun starts every worker in a session
    of its own, so a kill of torchrun's group alone would leave its workers training. With `stacks`, every
    process first writes its threads' stacks to the log (SIGABRT under PYTHONFAULTHANDLER), to show where a
    run that stalled was waiting."""
    found = descendants(process.pid)
    groups = {process.pid} | {os.getpgid(pid) for pid in found}
    if stacks:
        everyone = [*reversed(found), process.pid]  # readers, workers, then the launcher
        for pid in everyone:  # stopped first, so that no launcher reacts to a worker's end by ending the rest
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        for pid in everyone:  # then one at a time, since they share the log
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGABRT)
                os.kill(pid, signal.SIGCONT)
            time.sleep(0.5)
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    process.wait()


def descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in map(int, (task / "children").read_text().split()):
                found += [child, *descendants(child)]
    return found


def wait_for(condition, process: subprocess.Popen, log: Path, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit {process.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            stalled(process, log, f"no {what} within {timeout} s")
        time.sleep(0.02)


def wait_done(process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Wait for a launch to end with exit 0; one still running after `timeout` s fails with its stacks."""
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stalled(process, log, f"the run did not end within {timeout} s")
    assert code == 0, log.read_text()[-4000:]


def stalled(process: subprocess.Popen, log: Path, what: str) -> None:
    kill(process, stacks=True)
    lines = [line for line in log.read_text().splitlines() if not line.startswith("Extension modules:")]
    pytest.fail(f"{what}; the log, with each process's stacks:\n" + "\n".join(lines)[-20000:])


def steps_logged(out: Path) -> list[int]:
    """The training steps in metrics.jsonl, in the order the launches logged them."""
    metrics = out / "metrics.jsonl"
    rows = []
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError):  # a line still being written
            rows.append(json.loads(line))
    return [row["step"] for row in rows if "loss" in row]


def latest_checkpoint(out: Path) -> int:
    found = rundir.complete_checkpoints(out)
    return found[-1].step if found else 0


@pytest.mark.parametrize("processes", [1, 2])
def test_a_run_killed_at_a_random_step_and_while_checkpointing_resumes_bit_for_bit(ws, tmp_path, processes):
    cmd, log = command(ws, tmp_path, processes), tmp_path / "log.txt"
    (tmp_path / "dump").mkdir()
    killed = tmp_path / "killed"

    # 1. Killed at a random step, once a checkpoint is complete; slowed so the kill lands there.
    target = random.randint(3, 5)
    run = launch(cmd, log, KILL_TEST_BATCH_SECONDS="0.15")
    wait_for(lambda: len(steps_logged(killed)) >= target and latest_checkpoint(killed) > 0, run, log, f"step {target}")
    kill(run)
    assert run.returncode == -signal.SIGKILL
    reached, resume_from = max(steps_logged(killed)), latest_checkpoint(killed)
    assert target <= reached < STEPS and resume_from in (2, 4, 6), f"aimed at step {target}, killed at {reached}"
    assert not (killed / "model.safetensors").exists() and not (tmp_path / "dump" / "killed-rank0.json").exists()

    # 2. The same command, killed in the middle of the next checkpoint write.
    logged = len(steps_logged(killed))
    holding = tmp_path / "holding"
    run = launch(cmd, log, KILL_TEST_HOLD_SAVE=str(holding))
    wait_for(holding.exists, run, log, "a checkpoint write")
    kill(run)
    assert steps_logged(killed)[logged] == resume_from + 1  # it resumed from the last complete checkpoint
    assert latest_checkpoint(killed) == resume_from  # the write cut short is not taken for a checkpoint
    cut_short = rundir.partial_path(killed, resume_from + 2)  # it was under way: the weights and optimizer written
    assert (cut_short / "model.safetensors").is_file() and (cut_short / "optimizer.bin").is_file()
    assert not (cut_short / rundir.CHECKPOINT_MARKER).exists()

    # 3. The same command finishes the interrupted run, then makes the uninterrupted one.
    logged = len(steps_logged(killed))
    run = launch(cmd, log)
    wait_done(run, log)
    assert steps_logged(killed)[logged:] == list(range(resume_from + 1, STEPS + 1))
    assert not cut_short.exists() and [c.step for c in rundir.complete_checkpoints(killed)] == [STEPS - 2, STEPS]

    def dumped(name: str, rank: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
        record = json.loads((tmp_path / "dump" / f"{name}-rank{rank}.json").read_text())
        return record, load_file(tmp_path / "dump" / f"{name}-rank{rank}.safetensors")

    (resumed, resumed_weights), (whole, whole_weights) = dumped("killed"), dumped("whole")
    assert whole["processes"] == processes and whole["finished"] and resumed["finished"]
    assert resumed["losses"] == {step: loss for step, loss in whole["losses"].items() if int(step) > resume_from}
    assert resumed["final_eval"] == whole["final_eval"]
    for name, tensor in whole_weights.items():
        assert torch.equal(tensor, resumed_weights[name]), name
    saved, reference = load_file(killed / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert saved.keys() == reference.keys() and all(torch.equal(saved[k], reference[k]) for k in saved)


def test_a_checkpoint_counts_once_renamed_and_what_a_killed_save_or_prune_left_is_cleared(tmp_path, monkeypatch):
    out = tmp_path / "run"
    written = rundir.partial_path(out, 4)
    written.mkdir(parents=True)
    (written / "model.safetensors").write_text("weights")
    assert rundir.complete_checkpoints(out) == []  # written but not renamed: not a checkpoint
    path = rundir.complete_checkpoint(written, 4, 1024)
    assert path == rundir.checkpoint_path(out, 4) and not written.exists()
    assert [(c.step, c.tokens_seen) for c in rundir.complete_checkpoints(out)] == [(4, 1024)]
    # Leftovers: a save cut short (partial), and a pruned checkpoint whose deletion stopped after its marker.
    rundir.partial_path(out, 6).mkdir()
    (rundir.checkpoint_path(out, 2) / "model.safetensors").parent.mkdir()
    (rundir.checkpoint_path(out, 2) / "model.safetensors").write_text("half deleted")
    rundir.clear_partial(out)
    assert sorted(p.name for p in rundir.checkpoints_dir(out).iterdir()) == ["step-00000004"]
    for step in (6, 8):
        rundir.partial_path(out, step).mkdir()
        rundir.complete_checkpoint(rundir.partial_path(out, step), step, step * 256)
    # Pruning takes the marker away first: a deletion that stops before it is done leaves no checkpoint.
    monkeypatch.setattr(rundir.shutil, "rmtree", lambda path, ignore_errors=False: None)
    rundir.prune_checkpoints(out, keep=2)
    assert [c.step for c in rundir.complete_checkpoints(out)] == [6, 8] and rundir.checkpoint_path(out, 4).exists()
