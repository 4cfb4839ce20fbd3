"""What a conversion is asked to do: `ConvertOptions`, and the vocabularies its fields take."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from gqa.convert.errors import GQAError

GROUPINGS = ("contiguous", "similarity")
DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class ConvertOptions:
    kv_heads: int
    method: str = "mean"
    dtype: str = "auto"
    shard_size: int = 5_000_000_000
    copy_tokenizer: bool = True
    force: bool = False
    seed: int = 0
    grouping: str = "contiguous"  # or "similarity"
    calibration: str | None = None  # text file for activation-aware methods; None: the shipped default
    calibration_sequences: int = 128
    calibration_length: int = 512
    refine_steps: int = 0  # aligned: Adam steps per layer on the attention-output error (0: none)
    refine_lr: float = 1e-3
    refine_batch: int = 4  # calibration sequences per refine step
    device: str = "auto"  # where the calibration pass runs; auto: the GPU when torch sees one, else the CPU
    allow_same: bool = False  # G equal to the source's KV heads: an identity conversion


def parse_size(text: str | int) -> int:
    """'5GB' (10^9), '500MB', '2GiB' (2^30) or a plain number of bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise GQAError(f"cannot read '{text}' as a size in bytes; write e.g. 5GB, 500MB or 2GiB.")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    scale.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    size = int(number * scale[unit])
    if size <= 0:
        raise GQAError(f"size '{text}' must be positive.")
    return size
