"""The trained model's files: written whole or not at all.

Everything is written into a hidden folder inside output.dir (rundir.final_staging_path) and moved up once
complete, config.json last, so a full disk or a killed process never leaves a directory that looks like a
finished model; the checkpoints stay as they were, and running the same command again resumes from them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedModel

from gqa.convert.card import write_model_card
from gqa.convert.diskspace import remove
from gqa.convert.modeldir import dtype_name, write_provenance
from gqa.train import rundir


def save_final_model(
    output_dir: Path, model: PreTrainedModel, state_dict: dict[str, torch.Tensor], dtype: torch.dtype,
    max_shard_size: str, tokenizer_dir: str, provenance: dict[str, Any],
) -> None:
    """Write `model` with `state_dict` (already in `dtype`), its tokenizer, provenance and card into output_dir."""
    staging = rundir.final_staging_path(output_dir)
    remove(staging)  # what a killed run left
    with rundir.disk_full_stops_run(output_dir, f"the trained model in {output_dir}", lambda: remove(staging)):
        model.save_pretrained(staging, state_dict=state_dict, max_shard_size=max_shard_size, is_main_process=True)
        # save_pretrained records the in-memory (fp32) dtype; the files hold `dtype`.
        model.config.dtype = dtype_name(dtype)
        model.config.save_pretrained(staging)
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(staging)
        write_provenance(staging, provenance, final_dir=output_dir)
        write_model_card(staging)
        rundir.move_final_model(staging, output_dir)


def cast_state_dict(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Cast floating tensors, keeping tied ones (one storage, two names) tied, so they are saved once."""
    cast: dict[tuple, torch.Tensor] = {}
    result = {}
    for name, tensor in state_dict.items():
        if not tensor.is_floating_point():
            result[name] = tensor
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if key not in cast:
            cast[key] = tensor.to(dtype)
        result[name] = cast[key]
    return result
