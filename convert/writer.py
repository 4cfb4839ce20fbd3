"""Sharded safetensors output, written as a stream.

The safetensors library writes a file from a dict of tensors held in memory, which for 5 GB
shards would put 5 GB in the resident set. Here every output tensor's name, dtype and shape is
known before conversion starts (the plan), so each shard's header is written first and tensors
are appended one at a time as they are computed: memory stays at one tensor. The files are
plain safetensors (read back by the safetensors library in the tests), with `{"format": "pt"}`
metadata and a `model.safetensors.index.json` weight map, as transformers writes them.

The file writes run on one background thread, one tensor behind the caller, so the disk write of
a tensor overlaps the reading and merging of the next (file writes release the GIL); at most two
tensors are held at once. Written pages are handed to the kernel's writeback as the shard grows and
dropped from the page cache once on disk, so a conversion does not fill memory with its output.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from gqa.convert.modeldir import SAFETENSORS_DTYPES, SAFETENSORS_INDEX

RELEASE_STEP_BYTES = 64 * 2**20
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def assign_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Fill shards in order up to the byte budget; a tensor larger than the budget gets a shard alone."""
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for spec in specs:
        if shards[-1] and used + spec.nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += spec.nbytes
    return shards


def shard_file_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


class ShardedSafetensorsWriter:
    """Writes tensors, in the planned order, into shards whose headers were fixed up front."""

    def __init__(self, out_dir: Path, specs: list[TensorSpec], max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.shards = assign_shards(specs, max_shard_bytes)
        self.pending = [spec for shard in self.shards for spec in shard]
        self.weight_map: dict[str, str] = {}
        self.bytes_written = 0
        self._next = 0
        self._shard = -1
        self._file: BinaryIO | None = None
        self._left_in_shard = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gqa-writer")
        self._in_flight: Future | None = None

    def _open_next_shard(self) -> None:
        self._close_shard()
        self._shard += 1
        specs = self.shards[self._shard]
        name = shard_file_name(self._shard, len(self.shards))
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for spec in specs:
            header[spec.name] = {
                "dtype": DTYPE_NAMES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
            self.weight_map[spec.name] = name
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8-byte alignment
        self._file = open(self.out_dir / name, "wb")
        self._file.write(len(encoded).to_bytes(8, "little"))
        self._file.write(encoded)
        self._left_in_shard = len(specs)
        self._released = 0

    def _close_shard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.pending[self._next]
        if name != spec.name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise RuntimeError(
                f"writer expected {spec.name} {spec.dtype} {spec.shape}, got {name} {tensor.dtype} "
                f"{tuple(tensor.shape)}: the conversion plan and its execution disagree"
            )
        # Raw little-endian bytes, no copy for a contiguous tensor; the array keeps the tensor alive.
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._wait()
        self._in_flight = self._pool.submit(self._append, data)
        self.bytes_written += spec.nbytes
        self._next += 1

    def _append(self, data) -> None:
        if self._left_in_shard == 0:
            self._open_next_shard()
        self._file.write(memoryview(data))
        self._left_in_shard -= 1
        self._release_written()

    def _release_written(self) -> None:
        """Start writeback of what this shard has written and drop the pages already on disk.

        The output is not read again by this process; left to the kernel, its dirty pages pile up
        with the source's until reclaim and write throttling slow every write down."""
        end = self._file.tell()
        if end - self._released < RELEASE_STEP_BYTES or not hasattr(os, "posix_fadvise"):
            return
        os.posix_fadvise(self._file.fileno(), 0, end, os.POSIX_FADV_DONTNEED)
        self._released = end

    def _wait(self) -> None:
        """Wait for the write in flight; an error it raised is raised here."""
        future, self._in_flight = self._in_flight, None
        if future is not None:
            future.result()

    def finish(self) -> None:
        """Close the last shard and write the index; refuses if any planned tensor is missing."""
        if self._next != len(self.pending):
            missing = [s.name for s in self.pending[self._next :]]
            raise RuntimeError(f"conversion ended before writing {len(missing)} planned tensors: {missing[:5]}")
        self._wait()
        self.close()
        total = sum(s.nbytes for s in self.pending)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def close(self) -> None:
        """Stop writing: wait for the write in flight (its error, if any, is left to whoever failed
        first) and close the open shard, so the caller can remove a failed run's files. Idempotent."""
        future, self._in_flight = self._in_flight, None
        if future is not None:
            future.exception()
        self._close_shard()
        self._pool.shutdown(wait=True)
