"""Disk space: refuse a write that cannot fit, and turn a disk that fills up anyway into a plain GQAError.

A full disk shows up in more than one shape: Python's own writes raise OSError with errno ENOSPC (or EDQUOT
for a quota), safetensors raises its own error quoting the OS ("No space left on device (os error 28)"),
and torch.save raises a RuntimeError with no errno at all ("file write failed", "iostream error"). So a
failed write counts as a full disk when the error says so, or when the filesystem it wrote to has next to
nothing free once it failed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from gqa.convert.errors import GQAError
from gqa.convert.sizes import human_bytes

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
FULL_WORDS = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")
NEARLY_FULL_BYTES = 1 * 2**20  # less than this free after a failed write: the write failed for want of space
SLACK_BYTES = 256 * 2**10  # on top of what a write is planned to need: small side files, file system blocks


def existing_parent(path: str | Path) -> Path:
    """`path`, or its nearest ancestor that exists: where its bytes will land before it is created."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int:
    """Bytes this process may still write on the file system that holds (or will hold) `path`."""
    return shutil.disk_usage(existing_parent(path)).free


def check_free_space(path: str | Path, needed: int, what: str,
                     advice: str = "free some space there or write somewhere else") -> None:
    """Refuse, before anything is written, a write of about `needed` bytes that the file system of `path` cannot
    take; the figure quoted includes a little slack for what the caller does not count."""
    free, needed = free_bytes(path), needed + SLACK_BYTES
    if needed > free:
        raise GQAError(f"{what} needs {human_bytes(needed)}, {human_bytes(free)} free on {existing_parent(path)}; {advice}")


def is_disk_full(err: BaseException, path: str | Path) -> bool:
    """Whether `err`, raised by a write under `path`, means the disk (or the user's quota) is full."""
    if isinstance(err, OSError) and err.errno in FULL_ERRNOS:
        return True
    if any(words in str(err).lower() for words in FULL_WORDS):
        return True
    if not _looks_like_io(err):
        return False  # a bug or bad input, whatever the free space
    try:
        return free_bytes(path) < NEARLY_FULL_BYTES
    except OSError:
        return False


def _looks_like_io(err: BaseException) -> bool:
    if isinstance(err, OSError) or type(err).__name__ == "SafetensorError":
        return True
    # torch.save's stream writer: "file write failed", "iostream error", "[enforce fail at inline_container.cc]"
    return isinstance(err, RuntimeError) and any(w in str(err) for w in ("write", "iostream", "inline_container"))


@contextlib.contextmanager
def disk_full_is_an_error(path: str | Path, what: str, then: str | Callable[[], str] = "",
                          cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """Run the block; when it runs out of space under `path`, call `cleanup` (remove what the failed write left)
    and raise GQAError naming `what` and `path`, the space free there, and `then` (what the user can count on)."""
    try:
        yield
    except GQAError:
        raise
    except Exception as err:  # noqa: BLE001 - judged by is_disk_full; anything else is raised unchanged
        if not is_disk_full(err, path):
            raise
        if cleanup is not None:
            cleanup()
        free = human_bytes(free_bytes(path))
        after = then() if callable(then) else then
        raise GQAError(
            f"no space left on the device while writing {what} ({free} free on {existing_parent(path)}). Free "
            f"some space there and run the same command again{'; ' + after if after else ''}"
        ) from err


def remove(path: str | Path) -> None:
    """Remove a file or a directory tree if it is there: what a failed write left."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
