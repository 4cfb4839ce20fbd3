"""Sizes in bytes: one way to read them and one way to print them, for every command.

Read: a whole or decimal number with a unit, KB, MB, GB, TB (powers of 10) or KiB, MiB, GiB, TiB (powers
of 2), as `save_pretrained` and `--shard-size` take them; a bare number is bytes. Printed: powers of 2
(KiB, MiB, GiB), as `free`, `du -h` and CUDA's memory figures are.
"""

from __future__ import annotations

import re

from gqa.convert.errors import GQAError

UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", re.IGNORECASE)


def parse_size(text: str | int, what: str = "a size", unit_required: bool = False) -> int:
    """Bytes of '5GB' (5 x 10^9), '500 MB', '79.6GiB' (x 2^30), '1024B' or, unless unit_required, '1024'.
    `what` names the option in the error ('--gpu-memory')."""
    if isinstance(text, int) and not isinstance(text, bool):
        number, unit = text, "B"
    else:
        match = _SIZE.fullmatch(str(text))
        if match is None:
            raise GQAError(f"{what}: cannot read {text!r} as a size; write for example 5GB, 500MB or 2GiB")
        if match.group(2) is None and unit_required:
            raise GQAError(f"{what}: {text!r} has no unit; write for example {text}GB or {text}GiB")
        number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    size = int(number * UNITS[unit])
    if size <= 0:
        raise GQAError(f"{what}: {text!r} must be more than zero bytes")
    return size


def format_size(size: int) -> str:
    """A size as parse_size reads it back, in the largest unit that divides it: 5GB, 2GiB, 1234B."""
    for unit, scale in sorted(UNITS.items(), key=lambda item: -item[1]):
        if size and size % scale == 0:
            return f"{size // scale}{unit.replace('I', 'i')}"
    return f"{size}B"


def human_bytes(n: float) -> str:
    """A size to read, in powers of 2: '512 B', '45.00 KiB', '13.52 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
