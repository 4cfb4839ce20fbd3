"""A full disk, on a real small file system (a size-limited tmpfs): a conversion that cannot fit is refused
before it writes, with the space it needs and the space free; a conversion, a checkpoint, the final model or
an eval report that runs out of space anyway stops with a message naming the path and saying to free space,
leaves nothing that looks complete, keeps the checkpoints before it whole, and the same command run again
once there is space carries on from the last checkpoint."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from tiny import save_tiny_llama
from transformers import AutoModelForCausalLM

from gqa.convert.convert import ConvertOptions, convert
from gqa.convert.errors import GQAError
from gqa.train import rundir
from gqa.train.api import run_recipe
from gqa.train.cli import main
from train_helpers import REPO, make_model, tiny_overrides, write_texts

RECIPE = REPO / "recipes" / "tiny-cpu.yaml"
# Six steps of the tiny recipe; checkpoints every two steps (budget.stop_at_step=2 stops after the first).
TRAIN = {"budget.steps": 6, "eval.max_blocks": 8, "checkpoint.every": 2, "checkpoint.keep": 2}

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> an empty tmpfs of that size under tmp_path, unmounted at the end of the test."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("a size-limited tmpfs needs root to mount (CI runs the tests as root)")
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(point)],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        if subprocess.run(["umount", str(point)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)  # still busy: detach it now


def free(path: Path) -> int:
    return shutil.disk_usage(path).free


def fill(disk: Path, leave: int) -> Path:
    """A ballast file taking all of `disk`'s free space but `leave` bytes."""
    ballast = disk / "ballast"
    size = free(disk) - leave
    with open(ballast, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, size)  # tmpfs allocates the pages at once
    assert leave - 8192 <= free(disk) <= leave + 8192
    return ballast


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def bytes_of(figure: str) -> float:
    """The bytes of a figure as the messages print it (human_bytes): '2.61 MiB'."""
    value, unit = figure.split()
    return float(value) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]


def cli(args, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


# --- convert ---------------------------------------------------------------------------------------------


@pytest.fixture
def source(tmp_path) -> Path:
    """A tiny MHA Llama of about 2.4 MB in float32 (a large vocabulary makes its embeddings most of it)."""
    return save_tiny_llama(tmp_path / "src", vocab_size=4096)


def test_a_conversion_that_cannot_fit_is_refused_before_anything_is_written(source, small_disk):
    disk = small_disk("1m")
    out = disk / "out"
    free_before = free(disk)
    with pytest.raises(GQAError) as caught:
        convert(str(source), out, ConvertOptions(kv_heads=2))
    message = str(caught.value)
    match = re.search(rf"the converted model {re.escape(str(out))} needs (\S+ \S+), (\S+ \S+) free on (\S+);", message)
    assert match, message
    needed, free_then = bytes_of(match.group(1)), bytes_of(match.group(2))
    assert match.group(3) == str(disk)
    assert free_before - 64 * 2**10 <= free_then <= free_before  # less the lock file and the empty staging folder
    weights = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    assert 0.8 * weights < needed < weights + 2**20  # the output: a little less than the source (fewer KV heads)
    assert files_under(disk) == []  # no staging directory, no lock file


def test_a_gpt2_conversion_that_cannot_fit_is_refused_before_anything_is_written(tmp_path, small_disk):
    """GPT-2 converts by a plan of its own (to gpt_bigcode); the same free-space check guards it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    source = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_head=4, n_layer=2, vocab_size=4096, n_positions=64)).save_pretrained(source)
    disk = small_disk("1m")
    with pytest.raises(GQAError, match=rf"the converted model {re.escape(str(disk / 'out'))} needs .* free on"):
        convert(str(source), disk / "out", ConvertOptions(kv_heads=1))
    assert files_under(disk) == []


def test_a_conversion_that_runs_out_of_space_while_writing_a_shard_stops_naming_out_and_leaves_nothing(source, small_disk, capsys):
    """--skip-space-check lets the conversion start on a disk too small for it, so the disk fills up while a
    shard is written (the second of five, 500 KB each), exactly as it would when something else takes the space."""
    disk = small_disk("1m")
    out = disk / "out"
    args = ["convert", source, out, "--kv-heads", "2", "--shard-size", "500KB"]
    code, err = cli([*args, "--skip-space-check"], capsys)
    assert code == 2
    assert f"no space left on the device while writing the converted model {out}" in err, err
    assert f"free on {disk}). Free some space there and run the same command again; nothing was left behind" in err
    assert "Traceback" not in err
    assert files_under(disk) == []
    # Space freed (the tmpfs made larger): the same command converts, checked as always.
    subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
    code, err = cli(args, capsys)
    assert code == 0, err
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    AutoModelForCausalLM.from_pretrained(out)


# --- training --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("full-disk")
    train, held = write_texts(root)
    return {"root": root, "model": make_model(root), "train": train, "eval": held, "cache": root / "cache"}


def overrides(ws, out: Path, **extra) -> list[str]:
    return tiny_overrides(ws["model"], ws["train"], ws["eval"], out, ws["cache"], **{**TRAIN, **extra})


def first_checkpoint(ws, out: Path, **extra) -> Path:
    """Run the recipe to its first checkpoint (step 2) and stop there."""
    result = run_recipe(RECIPE, overrides(ws, out, **{"budget.stop_at_step": 2, **extra}))
    assert not result.finished
    assert [c.step for c in rundir.complete_checkpoints(out)] == [2]
    return rundir.checkpoint_path(out, 2)


def test_a_checkpoint_that_runs_out_of_space_stops_the_run_keeps_the_one_before_and_the_run_resumes(ws, small_disk, capsys, caplog):
    disk = small_disk("8m")
    out = disk / "run"
    step2 = first_checkpoint(ws, out)
    before = hashes(step2)
    model_bytes = (step2 / "model.safetensors").stat().st_size
    # Room for the run's small files and the next checkpoint's weights, not for its optimizer state (twice the
    # weights): torch.save, which fails with no errno, is the write that runs out.
    ballast = fill(disk, leave=model_bytes + 128 * 2**10)
    code, err = cli(["train", RECIPE, *overrides(ws, out)], capsys)
    assert code == 2
    assert f"no space left on the device while writing checkpoint {rundir.checkpoint_path(out, 4)}" in err, err
    assert f"Free some space there and run the same command again; it resumes from {step2} (step 2), which is intact" in err
    assert "Traceback" not in err
    assert os.listdir(out / "checkpoints") == ["step-00000002"]  # no partial checkpoint, no step 4
    assert hashes(step2) == before and rundir.checkpoint_damage(step2) is None
    assert not (out / "config.json").exists()

    ballast.unlink()
    caplog.clear()
    with caplog.at_level("INFO"):
        result = run_recipe(RECIPE, overrides(ws, out))
    assert f"resuming from {step2} (step 2)" in caplog.text
    assert result.finished and result.steps == 6 and sorted(result.losses) == [3, 4, 5, 6]
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    for name, tensor in result.model.state_dict().items():
        assert torch.equal(saved[name], tensor), name


def test_a_final_model_that_runs_out_of_space_leaves_no_model_and_the_run_resumes(ws, small_disk, capsys):
    disk = small_disk("8m")
    out = disk / "run"
    # checkpoint.every=0: the only checkpoint is the one budget.stop_at_step writes; the final save is the
    # next write of any size.
    step2 = first_checkpoint(ws, out, **{"checkpoint.every": 0})
    before = hashes(step2)
    ballast = fill(disk, leave=128 * 2**10)  # less than the model's weights
    code, err = cli(["train", RECIPE, *overrides(ws, out, **{"checkpoint.every": 0})], capsys)
    assert code == 2
    assert f"no space left on the device while writing the trained model in {out}" in err, err
    assert f"it resumes from {step2} (step 2), which is intact" in err and "Traceback" not in err
    left = set(os.listdir(out))
    assert left <= {"checkpoints", "gqa_run.json", "metrics.jsonl"}, left  # no config, weights, card, staging folder
    assert hashes(step2) == before

    ballast.unlink()
    result = run_recipe(RECIPE, overrides(ws, out, **{"checkpoint.every": 0}))
    assert result.finished and sorted(result.losses) == [3, 4, 5, 6]
    assert {"config.json", "model.safetensors", "README.md", "gqa_provenance.json"} <= set(os.listdir(out))
    assert not rundir.final_staging_path(out).exists()
    AutoModelForCausalLM.from_pretrained(out)


# --- eval ------------------------------------------------------------------------------------------------


def test_an_eval_report_that_runs_out_of_space_names_the_report_and_keeps_the_scores(ws, small_disk, capsys):
    disk = small_disk("1m")
    report = disk / "report"
    fill(disk, leave=8 * 2**10)  # eval.md fits, the first plot does not
    code, err = cli(["eval", ws["model"], "--data", ws["eval"], "--seq-len", "64", "--contexts", "16",
                     "--new-tokens", "2", "--device", "cpu", "--no-update-card", "--report", report], capsys)  # fmt: skip
    assert code == 2
    assert f"no space left on the device while writing the eval report {report}" in err, err
    assert "nothing of the report was kept; the scores were:" in err and "perplexity" in err
    assert "Traceback" not in err
    assert not report.exists()
    assert files_under(disk) == ["ballast"]


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device", "/x/out/model.safetensors"),
                                   OSError(errno.EROFS, "Read-only file system", "/x/out")])
def test_the_launchers_entry_reports_a_system_error_as_gqa_does(error, monkeypatch, capsys):
    """torchrun and accelerate launch start `python -m gqa.train`: a system error there is one line, no traceback."""
    from gqa.train import commands

    def fail(args):
        raise error

    monkeypatch.setattr(commands, "run", fail)
    assert commands.main(["tiny-cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gqa train: error: ") and "Traceback" not in err, err
    assert ("no space left on the device writing /x/out/model.safetensors" in err) == (error.errno == errno.ENOSPC), err
    assert error.filename in err
