"""One run per output: while a live process converts into OUT or trains into output.dir, a second one is refused
at once with the holder's pid and host; once the holder is SIGKILLed, the next run proceeds (and a training run
resumes from the holder's last checkpoint). Under torchrun the refusal reaches every process."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiny import build_family_model, save_model

from gqa.convert import outputlock
from gqa.convert.convert import convert, lock_path
from gqa.convert.errors import GQAError
from gqa.convert.options import ConvertOptions
from gqa.train import rundir
from gqa.train.api import run_recipe
from test_train_kill import RECIPE, SHARDS, TESTS, kill, latest_checkpoint, launch, steps_logged, wait_for
from train_helpers import REPO, make_model, tiny_overrides, torchrun, write_shards

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

STEPS = 8
STREAMED = {"data.streaming": "true", "data.eval": "null", "data.eval_blocks": 8, "data.shuffle_buffer": 32,
            "eval.max_blocks": 8, "eval.every": 0, "budget.steps": STEPS, "checkpoint.every": 2,
            "batch.global_sequences": 8, "batch.micro": 2, "data.reader_timeout": 20}  # fmt: skip


def refused_by(pid: int) -> str:
    return rf"being written by pid {pid} on {socket.gethostname()}"


@pytest.fixture(autouse=True)
def no_holder_outlives_its_test(monkeypatch):
    """Every process a test here launches is killed when the test ends, so a failing assertion does not leave
    a lock holder sleeping on after the suite."""
    started: list[subprocess.Popen] = []
    original = launch

    def tracked(*args, **kwargs) -> subprocess.Popen:
        started.append(original(*args, **kwargs))
        return started[-1]

    monkeypatch.setitem(globals(), "launch", tracked)
    yield
    for process in started:
        if process.poll() is None:
            kill(process)


# A conversion paused where it writes its tensors, until killed: the real convert() holding the real lock.
HELD_CONVERSION = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import gqa.convert.convert as c
    from gqa.convert.options import ConvertOptions

    source, out, flag = sys.argv[1:]
    def hold(*args, **kwargs):
        Path(flag).touch()
        time.sleep(600)
    c._convert_into = hold
    c.convert(source, out, ConvertOptions(kv_heads=2))
""")


def test_a_second_conversion_into_the_same_out_is_refused_until_the_first_is_killed(tmp_path):
    model = build_family_model("llama", kv=4)
    source = save_model(model.config, model.state_dict(), tmp_path / "src")
    out, flag, log = tmp_path / "out", tmp_path / "holding", tmp_path / "log.txt"
    holder = launch([sys.executable, "-c", HELD_CONVERSION, str(source), str(out), str(flag)], log)
    wait_for(flag.exists, holder, log, "the conversion's writing stage")

    with pytest.raises(GQAError, match=refused_by(holder.pid)):
        convert(str(source), out, ConvertOptions(kv_heads=2))
    assert holder.poll() is None and not out.exists()

    kill(holder)
    assert holder.returncode == -signal.SIGKILL and lock_path(out).exists()  # left behind, and free
    result = convert(str(source), out, ConvertOptions(kv_heads=2))
    assert result.out_dir == out and (out / "config.json").is_file()
    assert not lock_path(out).exists()  # let go on the way out


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("output-lock")
    shards, held = write_shards(root, SHARDS)
    return make_model(root), shards, held, root / "cache"


def train_overrides(ws, out: Path) -> list[str]:
    model, shards, held, cache = ws
    return tiny_overrides(model, shards, held, out, cache, **STREAMED)


def start_holder(ws, tmp_path: Path, out: Path, log: Path, batch_seconds: float, until) -> subprocess.Popen:
    """A training run of its own process, slowed down to `batch_seconds` a batch, once `until()` holds."""
    (tmp_path / "dump").mkdir(exist_ok=True)
    cmd = [sys.executable, str(TESTS / "train_kill_worker.py"), str(RECIPE), str(tmp_path / "dump"), *train_overrides(ws, out)]
    holder = launch(cmd, log, KILL_TEST_BATCH_SECONDS=str(batch_seconds))
    wait_for(until, holder, log, "the run under way")
    return holder


def test_a_second_training_run_into_a_live_output_dir_is_refused_and_resumes_once_the_holder_is_killed(ws, tmp_path):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    holder = start_holder(ws, tmp_path, out, log, 0.5, until=lambda: latest_checkpoint(out) > 0)
    with pytest.raises(GQAError, match=refused_by(holder.pid)):
        run_recipe(RECIPE, train_overrides(ws, out))
    assert holder.poll() is None  # still training: the refusal came while it held the directory
    kill(holder)
    resume_from = latest_checkpoint(out)
    logged = len(steps_logged(out))

    result = run_recipe(RECIPE, train_overrides(ws, out))
    assert result.finished and sorted(result.losses) == list(range(resume_from + 1, STEPS + 1))
    assert steps_logged(out)[logged:] == list(range(resume_from + 1, STEPS + 1))
    assert not rundir.lock_path(out).exists()


def test_under_torchrun_every_process_gets_the_refusal(ws, tmp_path):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    # slower: the launch of two processes takes a while on a small machine, and the holder must outlast it
    holder = start_holder(ws, tmp_path, out, log, 3.0, until=lambda: len(steps_logged(out)) > 0)
    try:
        cmd = [*torchrun(2), "-m", "gqa.train", str(RECIPE), *train_overrides(ws, out)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
        assert holder.poll() is None
    finally:
        kill(holder)
    output = second.stdout + second.stderr
    assert second.returncode != 0
    assert len([line for line in output.splitlines() if f"being written by pid {holder.pid}" in line]) == 2, output
    assert "GQAError" not in output, output  # the message, not a traceback (torchrun's own report follows it)


class _Writes:
    """A stderr that keeps each write apart, as the pipe torchrun's processes share receives them."""

    def __init__(self):
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return len(text)

    def flush(self):
        pass


def test_a_refusal_reaches_stderr_in_one_write_so_processes_sharing_it_never_run_their_lines_together(monkeypatch):
    from gqa.train.cli import run_reporting_errors

    def refused():
        raise GQAError("output.dir run is being written by pid 1 on vm")

    stderr = _Writes()
    monkeypatch.setattr(sys, "stderr", stderr)
    assert run_reporting_errors("train", False, refused) == 2
    assert stderr.writes == ["gqa train: error: output.dir run is being written by pid 1 on vm\n"]


FORKING_HOLDER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from gqa.convert.outputlock import acquire

    acquire(Path(sys.argv[1]), "the test output")
    child = os.fork()  # as a data loader's worker is forked
    if child == 0:
        time.sleep(600)
    Path(sys.argv[2]).write_text(str(child))
    time.sleep(600)
""")


def test_the_lock_dies_with_its_holder_even_when_the_holder_forked_a_child_that_lives_on(tmp_path):
    lock, flag, log = tmp_path / ".out.lock", tmp_path / "child", tmp_path / "log.txt"
    holder = launch([sys.executable, "-c", FORKING_HOLDER, str(lock), str(flag)], log)
    wait_for(flag.exists, holder, log, "the fork")
    child = int(flag.read_text())
    try:
        with pytest.raises(GQAError, match=refused_by(holder.pid)):
            outputlock.acquire(lock, "the test output")
        os.kill(holder.pid, signal.SIGKILL)  # the holder alone: its child lives on
        holder.wait()
        assert Path(f"/proc/{child}").exists()
        fd = outputlock.acquire(lock, "the test output")
        outputlock.release(lock, fd)
        assert not lock.exists()
    finally:
        kill(holder)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
