"""Which parameters train: all of them (the paper's choice), the attention blocks, or only keys and values.

Where the attention blocks are and which of their modules serve keys and values alone is asked of
the family table (gqa.convert.families), the one place that knows architectures.
"""

from __future__ import annotations

import logging

from torch import nn

from gqa.convert.errors import GQAError
from gqa.convert.families import ATTENTION_PREFIX, family_for

logger = logging.getLogger(__name__)


def trainable_names(model: nn.Module, which: str) -> set[str]:
    """The names of the parameters that train under `train.params=which`."""
    names = {name for name, _ in model.named_parameters()}
    if which == "all":
        return names
    if which not in ("attention", "kv"):
        raise GQAError(f"train.params={which}: not supported by this build; use all, attention or kv")
    family = family_for(model.config.model_type)
    if which == "kv" and family.fused_qkv:
        raise GQAError(
            f"train.params=kv: {family.name} fuses queries, keys and values into one '{family.fused_qkv[0]}' matrix, "
            "so keys and values cannot train alone; use train.params=attention"
        )
    prefixes = []
    for layer in range(model.config.num_hidden_layers):
        attention = ATTENTION_PREFIX.format(i=layer)
        prefixes += [attention] if which == "attention" else [f"{attention}{module}." for module in family.kv_modules]
    chosen = {name for name in names if name.startswith(tuple(prefixes))}
    if not chosen:
        raise GQAError(f"train.params={which}: no parameters matched in {type(model).__name__}; use train.params=all")
    return chosen


def select_trainable(model: nn.Module, which: str) -> list[nn.Parameter]:
    """Freeze everything outside the chosen set; return the trainable parameters."""
    chosen = trainable_names(model, which)
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
        if param.requires_grad:
            trainable.append(param)
    total = sum(p.numel() for p in model.parameters())
    count = sum(p.numel() for p in trainable)
    logger.info("training %s parameters: %s of %s (%.1f%%)", which, f"{count:,}", f"{total:,}", 100 * count / total)
    return trainable
