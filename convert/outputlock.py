"""One process per output: an advisory lock (flock) on a lock file, held while a command writes its output.

The kernel drops a flock when its holder dies, SIGKILL included, so a lock left by a killed process is free
again at once; the file itself only carries the holder's pid, host and command for the message a second
process gets. The holder removes the file when it lets go. A forked child (a data loader's worker) closes its
copy of the descriptor at once, so the lock lives exactly as long as its holder, not as long as its children.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from gqa.convert.errors import GQAError


_HELD: set[int] = set()  # this process's lock descriptors


def _close_inherited() -> None:
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited)


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        command = info["command"] if len(info["command"]) <= 160 else info["command"][:157] + "..."
        return f"pid {info['pid']} on {info['host']} ({command})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its pid yet)"


def acquire(path: Path, what: str) -> int:
    """Take the lock at `path` or raise GQAError naming its holder; returns the open descriptor to release."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise GQAError(
                f"{what} is being written by {_holder(path)}; wait for it to finish or stop it, "
                "or choose another output"
            ) from None
        # The file may have been removed by a holder letting go between our open and our flock: locked, but
        # no longer the file at `path`. Try again on the file that is there now.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv) or sys.executable}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    _HELD.add(fd)
    return fd


def release(path: Path, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # while still locked: no other process holds this file
    _HELD.discard(fd)
    os.close(fd)


@contextlib.contextmanager
def output_lock(path: Path, what: str) -> Iterator[None]:
    """Hold the lock at `path` for the block; `what` names the output in the refusal."""
    fd = acquire(path, what)
    try:
        yield
    finally:
        release(path, fd)
