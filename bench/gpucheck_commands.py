"""How the GPU check runs what it runs: commands in process groups with a timeout and a log, or the same
work called in the check's own process; and the outcomes a part can end in besides `ok`."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
ENTRY_SCRIPT = Path(__file__).resolve().parent / "gpu_check.py"  # what `--worker KIND SPEC RESULT` runs
RESERVE_S = 3  # kept back from the budget to write the JSON


class Skip(Exception):
    """The part cannot run here; the message says why."""


class CheckFailed(Exception):
    """A part ran, but what it saw is wrong; the measurements go into the record with the error."""

    def __init__(self, message: str, result: dict[str, Any]):
        super().__init__(message)
        self.result = result


class CommandFailed(Exception):
    def __init__(self, message: str, command: list[str], output: str):
        super().__init__(message)
        self.command = command
        self.output = output


def judged(result: dict[str, Any], checks: dict[str, bool]) -> dict[str, Any]:
    """`result` with its checks, or CheckFailed naming the checks that did not hold."""
    result["checks"] = checks
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise CheckFailed(f"checks failed: {', '.join(bad)}", result)
    return result


class Commands:
    """Runs the parts' commands within the check's deadline, each with its output in workdir/logs.

    isolation "separate": every command in processes of its own, as a user runs it; "shared": what can run
    in the check's process does (a start costs seconds of imports on a small CPU machine)."""

    def __init__(self, mode: str, isolation: str, workdir: Path, deadline: float):
        self.mode = mode
        self.isolation = isolation
        self.workdir = workdir
        self.deadline = deadline
        self.part_timeout = 0.0  # the running part's share of the budget; set before each part
        (workdir / "logs").mkdir(exist_ok=True)

    def remaining(self) -> float:
        return self.deadline - time.monotonic() - RESERVE_S

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        })
        if self.mode == "cuda":
            env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS workspaces
        else:
            env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
            env["CUDA_VISIBLE_DEVICES"] = ""  # --device cpu on a GPU machine: the children see none either
        return env

    def log(self, name: str) -> Path:
        return self.workdir / "logs" / f"{name}.log"

    def run(self, cmd: list[str], log_name: str) -> tuple[float, str]:
        """Run a command in its own process group, output to a log; (seconds, output). Raises CommandFailed."""
        timeout = min(self.part_timeout, max(self.remaining(), 1))
        log = self.log(log_name)
        started = time.monotonic()
        with open(log, "w") as sink:
            proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO, env=self.env(),
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_group(proc)
                raise CommandFailed(f"timed out after {timeout:.0f} s", cmd, log.read_text(errors="replace")) from None
        output = log.read_text(errors="replace")
        if rc != 0:
            raise CommandFailed(f"exit status {rc}", cmd, output)
        return time.monotonic() - started, output

    def run_in_process(self, cmd: list[str], log_name: str, call: Callable[[], int | None]) -> None:
        """What `cmd` would run, called in this process instead, its output to a log. Raises CommandFailed.
        (No timeout: used in shared isolation, on CPU, with small sizes.)"""
        captured = io.StringIO()
        root = logging.getLogger()
        level, handlers = root.level, root.handlers[:]
        root.handlers, root.level = [logging.StreamHandler(captured)], logging.INFO  # as the command's own logging
        try:
            with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
                status = call()
        except Exception as err:
            captured.write(traceback.format_exc())
            raise CommandFailed(f"{type(err).__name__}: {err} (in this process)", cmd, captured.getvalue()) from err
        finally:
            root.handlers, root.level = handlers, level
            self.log(log_name).write_text(captured.getvalue())
        if status:
            raise CommandFailed(f"exit status {status} (in this process)", cmd, captured.getvalue())

    def run_isolated(self, cmd: list[str], log_name: str, call: Callable[[], int | None]) -> None:
        """`cmd` as --isolation asks: in a process of its own, or as `call` (which does what `cmd` does) here."""
        if self.isolation == "separate":
            self.run(cmd, log_name)
        else:
            self.run_in_process(cmd, log_name, call)


def kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fresh(folder: Path) -> Path:
    """An empty folder (a --workdir used before keeps nothing of an earlier check)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def tail(text: str, chars: int = 3000) -> str:
    text = text.replace("\r", "\n")
    return text[-chars:]
