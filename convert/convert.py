"""The conversion pipeline: source -> index -> family spec -> plan -> tensor stream -> shards.

Nothing here holds more than one layer's attention tensors (or one other tensor) at a time.
Output goes to a hidden temporary directory beside OUT, renamed into place only when complete,
so a failed or killed run never leaves an OUT that looks finished. A lock file beside OUT
(`.OUT.gqa-lock`, see gqa.convert.outputlock) keeps a second conversion out of OUT while one runs.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, PretrainedConfig

from gqa.convert.diskspace import disk_full_is_an_error
from gqa.convert.modeldir import (
    CONFIG_FILE,
    CheckpointIndex,
    Source,
    directory_is_inside,
    dtype_name,
    meta_tensors,
    resolve_source,
    same_tensor,
    apply_umask,
)
from gqa.convert.errors import GQAError
from gqa.convert.gpt2 import bigcode_config, convert_gpt2
from gqa.convert.steps import ConversionResult, check_finite, check_space, finish_output, read_finite, write_tensors
from gqa.convert.families import (
    ATTENTION_PREFIX,
    Family,
    attention_layer,
    Geometry,
    check_supported,
    check_target,
    converts_to_gpt_bigcode,
    family_for,
    geometry_of,
    output_family,
    rotary_frequencies,
)
from gqa.convert.aligned import aligned_merge, split_qkvo
from gqa.convert.calibration import calibration_device
from gqa.convert.grouping import head_distances, permute_heads, similarity_groups
from gqa.convert.heads import contiguous_groups, merge_per_head, merge_stacked_rows
from gqa.convert.options import DTYPES, ConvertOptions
from gqa.convert.outputlock import output_lock
from gqa.convert.serving import config_warnings, serving_warnings
from gqa.convert.writer import TensorSpec

log = logging.getLogger(__name__)


def check_output_location(source: str, out: Path, force: bool) -> None:
    source_path = Path(source).expanduser()
    if source_path.is_dir() and directory_is_inside(out, source_path):
        raise GQAError(f"OUT {out} is the source or inside it; choose a directory outside {source_path}.")
    if source_path.exists() and directory_is_inside(source_path, out):
        raise GQAError(f"OUT {out} contains the source {source_path}; choose another directory.")
    if out.exists() and not out.is_dir():
        raise GQAError(f"{out} exists and is not a directory; refusing to replace it.")
    if out.exists() and not force:
        raise GQAError(f"{out} already exists; choose another OUT or pass --force to replace it.")


def convert(source: str, out: str | Path, options: ConvertOptions) -> ConversionResult:
    started = time.perf_counter()
    options.check()  # ConvertOptions checks its values on construction; again here for unchecked copies
    if options.method == "aligned":
        calibration_device(options.device)  # a bad --device fails before anything is read or written
    out = Path(out).expanduser().absolute()
    check_output_location(source, out, options.force)
    warn_where_not_served(source, options)
    with output_lock(lock_path(out), f"OUT {out}"):
        check_output_location(source, out, options.force)  # again: another conversion may have just finished it
        result = _convert_locked(source, out, options)
    result.out_dir = out
    result.seconds = time.perf_counter() - started
    return result


def warn_where_not_served(source: str, options: ConvertOptions) -> None:
    """Warn, from the source's config alone, for each engine where the output will not serve as GQA: before
    any weight is downloaded, dequantised or read, so the user learns it before spending the time. The
    conversion goes on; a --kv-heads that merging cannot reach is refused here already."""
    _, config = read_source_config(source)
    out = converted_config(config, options.kv_heads, allow_same=options.allow_same)
    family = output_family(config.model_type)
    for message in serving_warnings(family.model_types[0], family.name, out.num_attention_heads, options.kv_heads):
        log.warning(message)
    for message in config_warnings(out):
        log.warning(message)


def lock_path(out: Path) -> Path:
    """The lock file of a conversion into OUT: beside it, since OUT itself appears only at the end."""
    return out.parent / f".{out.name}.gqa-lock"


def _convert_locked(source: str, out: Path, options: ConvertOptions) -> ConversionResult:
    work = out.parent / f".{out.name}.gqa-tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    staged = work / "out"
    staged.mkdir(parents=True)
    try:
        # Inside the try: the staging directory goes (finally) only after a full disk has been recognised.
        with disk_full_is_an_error(out.parent, f"the converted model {out}", "nothing was left behind"):
            src = resolve_source(source, work)
            result = _convert_into(src, staged, out, options)
            apply_umask(staged)
            _move_into_place(staged, out, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _move_into_place(staged: Path, out: Path, work: Path) -> None:
    if out.exists():  # --force: the old OUT goes only once the new one is complete
        old = work / "replaced"
        os.rename(out, old)
    os.rename(staged, out)


def read_source_config(source: str) -> tuple[Source, PretrainedConfig]:
    """A source's config alone (a local dir's config.json, a .gguf file's metadata, or a hub id's config.json,
    fetched alone), its family checked as a conversion checks it; no weights are read."""
    scratch = Path(tempfile.mkdtemp(prefix="gqa-config-"))
    try:
        src = resolve_source(source, scratch, config_only=True)
        _, config = load_config(src.path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return src, config


def converted_config(config: PretrainedConfig, kv_heads: int, allow_same: bool = False) -> PretrainedConfig:
    """The config of the model a conversion to `kv_heads` KV heads makes of a model with `config`; a G that
    merging cannot reach is refused (check_target). A GPT-2 model becomes a gpt_bigcode one."""
    if converts_to_gpt_bigcode(config.model_type):
        return bigcode_config(config, kv_heads)
    check_target(geometry_of(config), kv_heads, allow_same=allow_same)
    out = copy.deepcopy(config)
    out.num_key_value_heads = kv_heads
    return out


def load_config(model_dir: Path):
    if not (model_dir / CONFIG_FILE).is_file():
        raise GQAError(f"{model_dir} has no config.json; is it a transformers model directory?")
    raw = json.loads((model_dir / CONFIG_FILE).read_text())
    check_supported(raw.get("model_type", "(none)"))  # refuse unsupported families before anything heavy
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (ValueError, KeyError, OSError) as err:
        raise GQAError(f"could not read {model_dir}/config.json: {err}") from err
    return raw, config


def _check_tensors(index: CheckpointIndex, expected: dict[str, tuple[int, ...]], tied_to: dict[str, str]) -> list[str]:
    """Refuse a checkpoint that lacks a tensor the model needs or has one of the wrong shape.
    Returns the names the model does not know: transformers ignores them on load (older checkpoints
    store each layer's rotary `inv_freq`, which the model computes itself), so they are not written."""
    for name, shape in expected.items():
        if name not in index:
            if any(n in index for n in same_tensor(name, tied_to)):
                continue  # tied weights are stored once
            raise GQAError(
                f"tensor {name} is missing from the checkpoint in {index.model_dir}; the config says the model has "
                "it. Is the download complete?"
            )
        if index.tensors[name].shape != shape:
            raise GQAError(
                f"tensor {name} has shape {list(index.tensors[name].shape)} but the config implies {list(shape)}; "
                "config.json and the weights do not belong together."
            )
    return [n for n in index.tensors if n not in expected]


@dataclass
class AttentionUnit:
    """One layer's attention tensors: read together, merged together, written together."""

    layer: int
    inputs: list[str]  # full names in the source
    outputs: list[TensorSpec] = field(default_factory=list)


def build_plan(
    index: CheckpointIndex,
    in_shapes: dict[str, tuple[int, ...]],
    out_shapes: dict[str, tuple[int, ...]],
    cast: torch.dtype | None,
) -> list[TensorSpec | AttentionUnit]:
    """The ordered work list: passthrough tensors and per-layer attention units, in source file
    order so reads move front to back through each shard. Output names and shapes come from the
    converted config's model (built on the meta device), so every shard header is known up front.
    Tensors the model does not define (`in_shapes` lacks them) are left out of the output."""

    def out_dtype(dtype: torch.dtype) -> torch.dtype:
        return cast if cast is not None and dtype.is_floating_point else dtype

    plan: list[TensorSpec | AttentionUnit] = []
    units: dict[int, AttentionUnit] = {}
    for name in index.names_in_file_order():
        info = index.tensors[name]
        layer = attention_layer(name)
        if layer is None:
            if name in in_shapes:
                plan.append(TensorSpec(name, out_dtype(info.dtype), info.shape))
            continue
        if layer not in units:
            units[layer] = AttentionUnit(layer, [])
            plan.append(units[layer])
        unit = units[layer]
        unit.inputs.append(name)
        if name in out_shapes:
            unit.outputs.append(TensorSpec(name, out_dtype(info.dtype), out_shapes[name]))
        # else: a per-head tensor of a head that merging removes, or one the model does not define
    return plan


def merge_attention_unit(
    tensors: dict[str, torch.Tensor],
    family: Family,
    geometry: Geometry,
    groups: list[list[int]],
    method: str,
    generator: torch.Generator | None = None,
    moment: torch.Tensor | None = None,
    frequencies: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Merge one layer's attention tensors (keys relative to the attention prefix). `groups` may be
    any partition of the KV heads; heads are first renumbered so that the groups are contiguous."""
    order = [j for group in groups for j in group]
    if order != sorted(order):
        tensors = permute_heads(tensors, family, geometry, order)
        size = len(groups[0])
        groups = [list(range(g * size, (g + 1) * size)) for g in range(len(groups))]
    if method == "aligned":
        return aligned_merge(tensors, family, geometry, groups, moment, frequencies)
    kv = geometry.kv_heads
    merged = dict(tensors)
    for rel, tensor in tensors.items():
        if rel in family.kv_stacked:
            merged[rel] = merge_stacked_rows(tensor, kv, groups, method, family.role(rel), generator)
        elif rel in family.fused_qkv:
            q_rows = geometry.heads * geometry.head_dim
            k_rows = kv * geometry.head_dim
            q, k, v = tensor.split([q_rows, k_rows, k_rows])
            role = family.role(rel)
            merged[rel] = torch.cat(
                [
                    q,
                    merge_stacked_rows(k, kv, groups, method, role, generator),
                    merge_stacked_rows(v, kv, groups, method, role, generator),
                ]
            )
    for pattern in family.kv_per_head:
        merge_per_head(merged, pattern, kv, groups, method, family.role(pattern), generator)
    return merged


def _convert_into(src: Source, staged: Path, out: Path, options: ConvertOptions) -> ConversionResult:
    """Check the source, plan the output, merge and stream every tensor, then the side files."""
    raw_config, config = load_config(src.path)
    if converts_to_gpt_bigcode(config.model_type):
        return convert_gpt2(src, config, staged, out, options)
    family, geometry = family_for(config.model_type), geometry_of(config)
    out_config = converted_config(config, options.kv_heads, allow_same=options.allow_same)
    if options.method == "aligned" and family.qkv_clip(config) is not None:
        raise GQAError(
            f"--method aligned cannot merge this {family.name} model exactly: its config sets {family.clip_config} "
            f"({family.qkv_clip(config)}), which clips queries, keys and values elementwise after the projection, "
            "and no head alignment passes through a clip. Use --method mean (the default)."
        )
    index = CheckpointIndex(src.path)
    source_tensors = meta_tensors(config, index.tensors)
    dropped = _check_tensors(index, source_tensors.shapes, source_tensors.tied)
    if dropped:
        log.warning("leaving out %d tensors the model does not define: %s", len(dropped), dropped[:5])
    cast = DTYPES[options.dtype]
    plan = build_plan(index, source_tensors.shapes, meta_tensors(out_config, index.tensors).shapes, cast)

    specs = [s for item in plan for s in (item.outputs if isinstance(item, AttentionUnit) else [item])]
    check_space(out, specs, src.path, options, held=_aligned_bytes(plan) if options.method == "aligned" else 0)

    groups_per_layer: dict[int, list[list[int]]] = {}
    if options.method == "aligned":
        files, aligned_groups = _aligned_pass(src, index, config, out_config, family, geometry, options, staged)
        groups_per_layer.update(enumerate(aligned_groups))

        def merge_layer(unit: AttentionUnit) -> dict[str, torch.Tensor]:
            return load_file(files[unit.layer])  # merged (and its inputs checked) by the calibration pass
    else:
        generator = torch.Generator().manual_seed(options.seed)

        def merge_layer(unit: AttentionUnit) -> dict[str, torch.Tensor]:
            prefix = ATTENTION_PREFIX.format(i=unit.layer)
            tensors = {name[len(prefix) :]: read_finite(index, name) for name in unit.inputs}
            groups_per_layer[unit.layer] = groups = _groups_for(tensors, family, geometry, options, None)
            return merge_attention_unit(tensors, family, geometry, groups, options.method, generator)

    bytes_written = write_tensors(plan, specs, lambda name: read_finite(index, name), staged, options.shard_size,
                                  merge_layer)
    _write_config(raw_config, staged, options.kv_heads, cast)
    groups = [groups_per_layer[layer] for layer in sorted(groups_per_layer)]
    return finish_output(src, staged, config, index, options, geometry, groups, dropped, family.name, (len(specs), bytes_written))


def _aligned_pass(src: Source, index, config, out_config, family, geometry, options: ConvertOptions, staged: Path):
    from gqa.convert.calibration import calibration_inputs, layerwise_aligned_merge

    tokens = calibration_inputs(src.path, config, options)
    device = calibration_device(options.device)
    log.info("calibrating on %d x %d tokens on %s", *tokens.shape, device)

    def merge(layer: int, tensors: dict[str, torch.Tensor], moment: torch.Tensor):
        prefix = ATTENTION_PREFIX.format(i=layer)
        for rel, tensor in tensors.items():
            check_finite(prefix + rel, tensor)
        groups = _groups_for(tensors, family, geometry, options, moment)
        layer_geometry = geometry.at_layer(layer)  # no rotary dims in a layer without RoPE
        frequencies = rotary_frequencies(config, layer_geometry, layer) if layer_geometry.rotary_dims else None
        return merge_attention_unit(tensors, family, layer_geometry, groups, "aligned", None, moment, frequencies), groups

    work = staged.parent / "aligned"
    return layerwise_aligned_merge(
        index, config, out_config, family, geometry, tokens, merge, work,
        refine_steps=options.refine_steps, refine_lr=options.refine_lr, refine_batch=options.refine_batch,
        device=device,
    )


def _groups_for(
    tensors: dict[str, torch.Tensor], family: Family, geometry: Geometry, options: ConvertOptions, moment
) -> list[list[int]]:
    if options.grouping == "contiguous":
        return contiguous_groups(geometry.kv_heads, options.kv_heads)
    parts = split_qkvo(tensors, family, geometry)
    shape = (geometry.kv_heads, geometry.head_dim, -1)
    distances = head_distances(parts["k"].reshape(shape), parts["v"].reshape(shape), moment)
    return similarity_groups(distances, options.kv_heads)


def _write_config(raw: dict, staged: Path, kv_heads: int, cast: torch.dtype | None) -> None:
    """Edit the user's own config.json, so every field they had stays as they wrote it."""
    config = dict(raw)
    config["num_key_value_heads"] = kv_heads
    if cast is not None:
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = dtype_name(cast)
        config.setdefault("dtype", dtype_name(cast))
    (staged / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _aligned_bytes(plan) -> int:
    """What --method aligned keeps on disk until the shards are written: the merged layers, in float32."""
    units = [item for item in plan if isinstance(item, AttentionUnit)]
    return sum(math.prod(s.shape) * 4 for unit in units for s in unit.outputs)
