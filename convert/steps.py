"""The steps every conversion shares, whatever its plan: finite checks on what is read, streaming the planned
tensors into shards, the side files copied from the source, and the provenance record."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gqa.convert import __version__
from gqa.convert.errors import GQAError
from gqa.convert.families import ATTENTION_PREFIX, Geometry
from gqa.convert.diskspace import check_free_space
from gqa.convert.modeldir import (BIN_INDEX, CARD_FILE, CONFIG_FILE, PROVENANCE_FILE, SAFETENSORS_INDEX, TOKENIZER_FILE,
                                  WEIGHT_SUFFIXES, CheckpointIndex, Source, write_provenance)
from gqa.convert.card import write_model_card
from gqa.convert.kvcache import kv_cache_bytes_per_token
from gqa.convert.options import DTYPES, ConvertOptions
from gqa.convert.writer import ShardedSafetensorsWriter, TensorSpec

# Files the conversion writes itself, or that describe the source's weights only.
NOT_COPIED = {CONFIG_FILE, CARD_FILE, SAFETENSORS_INDEX, BIN_INDEX, PROVENANCE_FILE}


@dataclass
class ConversionResult:
    out_dir: Path
    source: Source
    family: str
    geometry: Geometry
    kv_heads: int
    kv_bytes_per_token_before: int
    kv_bytes_per_token_after: int
    tensors_written: int
    bytes_written: int
    seconds: float
    dropped: list[str] = field(default_factory=list)  # tensors the model does not define, not written


def check_finite(name: str, tensor: torch.Tensor) -> None:
    # A sum is NaN/inf whenever an element is, and costs one pass with no copy (torch accumulates
    # half-precision sums in float32); only when it is not finite (or overflowed) is the exact,
    # allocating check needed.
    if tensor.is_floating_point() and not torch.isfinite(tensor.sum()):
        if not torch.isfinite(tensor).all():
            raise GQAError(
                f"tensor {name} contains NaN or inf values; the source checkpoint is damaged. Nothing was written."
            )


def read_finite(index: CheckpointIndex, name: str) -> torch.Tensor:
    tensor = index.read(name)
    check_finite(name, tensor)
    return tensor


def write_tensors(plan, specs: list[TensorSpec], read: Callable[[str], torch.Tensor], staged: Path, shard_size: int,
                  merge_layer) -> int:
    """Stream the plan into shards: passthrough tensors as `read` gives them (checked finite by it), each
    layer's attention as `merge_layer` returns it. Returns the bytes written."""
    writer = ShardedSafetensorsWriter(staged, specs, shard_size)
    try:
        with tqdm(total=sum(s.nbytes for s in specs), unit="B", unit_scale=True, desc="converting", disable=None) as bar:
            for item in plan:
                if isinstance(item, TensorSpec):
                    writer.write(item.name, read(item.name).to(item.dtype))
                    bar.update(item.nbytes)
                    continue
                prefix = ATTENTION_PREFIX.format(i=item.layer)
                merged = merge_layer(item)
                for spec in item.outputs:
                    writer.write(spec.name, merged[spec.name[len(prefix) :]].to(spec.dtype))
                    bar.update(spec.nbytes)
        writer.finish()
    finally:
        writer.close()  # after a failure: no background write into the staging directory being removed
    return writer.bytes_written


def side_files(src: Path, copy_tokenizer: bool) -> list[Path]:
    """The source's files OUT gets a copy of: all but the weights, the files the conversion writes, hidden ones
    and, without copy_tokenizer, the tokenizer's."""
    found = []
    for path in sorted(src.iterdir()):
        if not path.is_file() or path.name in NOT_COPIED or path.name.startswith("."):
            continue
        if path.suffix in WEIGHT_SUFFIXES:
            continue
        if not copy_tokenizer and TOKENIZER_FILE.match(path.name):
            continue
        found.append(path)
    return found


def copy_side_files(src: Path, staged: Path, copy_tokenizer: bool) -> None:
    for path in side_files(src, copy_tokenizer):
        shutil.copy2(path, staged / path.name)


def provenance(
    src: Source, config, index: CheckpointIndex, options: ConvertOptions, geometry, groups, dropped: list[str]
) -> dict:
    return {
        "gqa_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "id": src.id,
            "hub_id": src.hub_id,
            "kind": src.kind,
            "model_type": config.model_type,
            "num_attention_heads": geometry.heads,
            "num_key_value_heads": geometry.kv_heads,
            "head_dim": geometry.head_dim,
            "files": [{"name": f.name, "bytes": f.stat().st_size} for f in index.files],
            "tensors": len(index.tensors),
            "dropped_tensors": dropped,
        },
        "conversion": {
            "method": options.method,
            "grouping": options.grouping,
            "calibration": (options.calibration or "default") if options.method == "aligned" else None,
            "refine": {"steps": options.refine_steps, "lr": options.refine_lr, "batch": options.refine_batch} if options.refine_steps else None,
            "kv_heads": options.kv_heads,
            "groups": groups,
            "dtype": options.dtype,
            "seed": options.seed if options.method == "random" else None,
        },
        "training": None,
        "eval": None,
    }


def check_space(out: Path, specs: list[TensorSpec], src: Path, options: ConvertOptions, held: int = 0) -> None:
    """Refuse, before any tensor is written, an output that will not fit beside OUT: the shards (tensors and a
    header entry each), the copied side files and `held` bytes the conversion keeps on disk until the shards are
    written. The config, index, card and provenance are small: check_free_space's slack covers them."""
    if options.skip_space_check:
        return
    needed = sum(s.nbytes + 128 + len(s.name) for s in specs) + held
    needed += sum(p.stat().st_size for p in side_files(src, options.copy_tokenizer))
    check_free_space(
        out.parent, needed, f"the converted model {out}",
        "free some space there, write OUT somewhere else, or pass --skip-space-check if the file system "
        "stores more than it reports free (compression)",
    )


def finish_output(src: Source, staged: Path, config, index: CheckpointIndex, options: ConvertOptions, geometry: Geometry,
                  groups, dropped: list[str], family: str, written: tuple[int, int], **conversion) -> ConversionResult:
    """After the shards and config.json: the side files, the provenance (`conversion` adds to its conversion
    record) and the card, and what the conversion did. `written`: (tensors, bytes)."""
    copy_side_files(src.path, staged, options.copy_tokenizer)
    record = provenance(src, config, index, options, geometry, groups, dropped)
    record["conversion"].update(conversion)
    write_provenance(staged, record)
    write_model_card(staged)
    source_dtype = next((t.dtype for t in index.tensors.values() if t.dtype.is_floating_point), torch.float32)
    out_dtype = DTYPES[options.dtype] or source_dtype
    return ConversionResult(
        out_dir=staged,
        source=src,
        family=family,
        geometry=geometry,
        kv_heads=options.kv_heads,
        kv_bytes_per_token_before=kv_cache_bytes_per_token(config, dtype=source_dtype),
        kv_bytes_per_token_after=kv_cache_bytes_per_token(config, options.kv_heads, dtype=out_dtype),
        tensors_written=written[0],
        bytes_written=written[1],
        seconds=0.0,
        dropped=dropped,
    )
