"""Resuming over a damaged checkpoint (files cut short as after a machine crash, tensors that do not load):
the run falls back to the previous whole checkpoint with a warning naming the file, and ends equal to an
uninterrupted run; with no whole checkpoint left it refuses, naming the file, and writes nothing."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from gqa.convert.errors import GQAError
from gqa.train import rundir
from gqa.train.api import run_recipe
from train_helpers import REPO, tiny_overrides, training_workspace

RECIPE = REPO / "recipes" / "tiny-cpu.yaml"
COMMON = {"budget.steps": 6, "eval.max_blocks": 8, "checkpoint.every": 2}

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> SimpleNamespace:
    ws = training_workspace(tmp_path_factory.mktemp("train-damaged"))
    ws.whole = ws.root / "whole"
    ws.whole_result = run(ws, ws.whole)
    return ws


def run(ws, out: Path, **extra):
    return run_recipe(RECIPE, tiny_overrides(ws.model, ws.train, ws.eval, out, ws.cache, **{**COMMON, **extra}))


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()


def cut_short(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def garble(path: Path) -> None:
    """A few bytes of the file overwritten, as a disk error would."""
    path.write_bytes(b"\x00\x17garbled" + path.read_bytes()[9:])


def wrong_shape(path: Path) -> None:
    """A whole safetensors file whose tensors do not fit the model: it passes the size checks, load_state fails."""
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name][:1].clone()
    save_file(tensors, path, metadata={"format": "pt"})


# damage -> (the file spoiled, how, what the message says, whether it names the file or only its checkpoint:
# a load that fails inside accelerate's load_state is known by its checkpoint and its error)
DAMAGE = {
    "model cut short": ("model.safetensors", cut_short, "is cut short", True),
    "optimizer cut short": ("optimizer.bin", cut_short, "optimizer.bin", True),
    "model of the wrong shape": ("model.safetensors", wrong_shape, "does not load (RuntimeError", False),
    "marker garbled": (rundir.CHECKPOINT_MARKER, garble, "does not read (JSONDecodeError", True),
}


def named(damaged: Path, names_file: bool) -> str:
    return str(damaged if names_file else damaged.parent)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_resumes_from_the_one_before_and_ends_as_an_uninterrupted_run(ws, tmp_path, caplog, damage):
    file, spoil, says, names_file = DAMAGE[damage]
    out = tmp_path / "run"
    run(ws, out, **{"budget.stop_at_step": 4})
    assert [c.step for c in rundir.complete_checkpoints(out)] == [2, 4]
    damaged = rundir.checkpoint_path(out, 4) / file
    spoil(damaged)

    with caplog.at_level(logging.WARNING):
        resumed = run(ws, out)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(named(damaged, names_file) in w and says in w for w in warnings), warnings
    assert resumed.finished and sorted(resumed.losses) == [3, 4, 5, 6]
    assert resumed.losses == {step: loss for step, loss in ws.whole_result.losses.items() if step > 2}
    expected, got = weights(ws.whole), weights(out)
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage", ["model cut short", "model of the wrong shape", "marker garbled"])
def test_a_run_whose_only_checkpoint_is_damaged_is_refused_and_nothing_is_written(ws, tmp_path, damage):
    file, spoil, says, names_file = DAMAGE[damage]
    out = tmp_path / "run"
    run(ws, out, **{"budget.stop_at_step": 2})
    damaged = rundir.checkpoint_path(out, 2) / file
    spoil(damaged)
    before = snapshot(out / "checkpoints")

    with pytest.raises(GQAError, match="holds no checkpoint that can be resumed") as refusal:
        run(ws, out)
    assert named(damaged, names_file) in str(refusal.value) and says in str(refusal.value)
    assert "Restore" in str(refusal.value) and "delete" in str(refusal.value)
    assert snapshot(out / "checkpoints") == before
    assert not (out / "model.safetensors").exists()
    # Named by resume=PATH, it is refused too: no other checkpoint stands in for the one asked for.
    with pytest.raises(GQAError, match=r"resume=.*(is damaged|does not load)"):
        run(ws, tmp_path / "elsewhere", resume=str(damaged.parent))
    assert snapshot(out / "checkpoints") == before
    if names_file:  # refused by the checks before training starts: no output dir is left behind
        assert not (tmp_path / "elsewhere").exists()


def test_checkpoint_damage_names_the_file_and_what_is_wrong(tmp_path):
    checkpoint = tmp_path / "step-00000002"
    checkpoint.mkdir()
    save_file({"w": torch.ones(4, 4)}, checkpoint / "model.safetensors")
    torch.save({"state": {0: {"exp_avg": torch.ones(4, 4)}}}, checkpoint / "optimizer.bin")
    torch.save({"step": 2}, checkpoint / "custom_checkpoint_0.pkl")
    (checkpoint / rundir.CHECKPOINT_MARKER).write_text('{"step": 2, "tokens_seen": 64}')
    assert rundir.checkpoint_damage(checkpoint) is None

    for name in (rundir.CHECKPOINT_MARKER, "model.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl"):
        good = (checkpoint / name).read_bytes()
        for length in (0, 5, len(good) - 1):
            (checkpoint / name).write_bytes(good[:length])
            problem = rundir.checkpoint_damage(checkpoint)
            assert problem is not None and problem.startswith(str(checkpoint / name)), (name, length, problem)
        (checkpoint / name).write_bytes(good)
    (checkpoint / "optimizer.bin").write_bytes(bytes(len((checkpoint / "optimizer.bin").read_bytes())))  # zeroed
    assert "optimizer.bin does not load" in rundir.checkpoint_damage(checkpoint)


def test_a_garbled_run_file_is_refused_naming_it(ws, tmp_path):
    out = tmp_path / "run"
    run(ws, out, **{"budget.stop_at_step": 2})
    garble(out / rundir.RUN_FILE)
    before = snapshot(out)
    with pytest.raises(GQAError, match=rf"{re.escape(str(out / rundir.RUN_FILE))} does not read .*restore it"):
        run(ws, out)
    unchanged = {name: data for name, data in snapshot(out).items() if name != rundir.LOCK_FILE}
    assert unchanged == {name: data for name, data in before.items() if name != rundir.LOCK_FILE}
