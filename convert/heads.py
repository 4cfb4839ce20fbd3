"""Merging key/value heads within groups: the paper's methods.

Tensors arrive with heads stacked on the first dimension, shape [heads, ...]. A grouping is a list
of G lists of head indices; each group becomes one head. Merged tensors come out in float32 whatever
the source's dtype: the writer casts them once, to the output dtype, so neither bf16 accumulation
nor a round trip through the source's dtype costs precision.
"""

from __future__ import annotations

import torch

from gqa.convert.errors import GQAError

METHODS = ("mean", "first", "random", "aligned")
METHOD_HELP = {
    "mean": "average the heads of each group (the paper's method and the default)",
    "first": "keep the first head of each group (the paper's ablation)",
    "random": "re-initialise each merged K/V projection at random, matching the source's scale; "
    "biases start at zero and norms are averaged (the paper's ablation)",
    "aligned": "align the heads of each group on calibration activations before merging, folding the "
    "alignment into q_proj and o_proj (see the README)",
}


def contiguous_groups(kv_heads: int, groups: int) -> list[list[int]]:
    """Heads 0..r-1 form group 0 and so on: the grouping that HF's repeat_kv implies, so query
    heads keep attending to the keys they were trained with."""
    size = kv_heads // groups
    return [list(range(g * size, (g + 1) * size)) for g in range(groups)]


def merge_heads(
    stacked: torch.Tensor,
    groups: list[list[int]],
    method: str,
    role: str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Merge `stacked` [heads, ...] into [len(groups), ...].

    `role` is "weight" for projection weights, "bias" for projection biases and "norm" for norm
    weights; only the random method treats them differently.
    """
    order = [h for g in groups for h in g]
    if order != list(range(len(stacked))):
        stacked = stacked[order]  # one reorder, then every group is a contiguous block
    grouped = stacked.reshape(len(groups), len(groups[0]), *stacked.shape[1:])
    if method == "mean":
        merged = grouped.mean(1, dtype=torch.float32)  # one reduction over a view, no float32 copy
    elif method == "first":
        merged = grouped[:, 0].float()
    elif method == "random":
        if role == "weight":
            std = stacked.float().std().item()
            shape = (len(groups), *stacked.shape[1:])
            merged = torch.randn(shape, generator=generator, dtype=torch.float32) * std
        elif role == "bias":
            merged = torch.zeros((len(groups), *stacked.shape[1:]))
        else:
            merged = grouped.mean(1, dtype=torch.float32)
    else:
        raise GQAError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}.")
    return merged


def merge_stacked_rows(
    tensor: torch.Tensor, kv_heads: int, groups: list[list[int]], method: str, role: str, generator=None
) -> torch.Tensor:
    """A tensor whose first dimension is kv_heads * head_dim (k/v weights, biases, OLMo-2's k_norm)."""
    per_head = tensor.reshape(kv_heads, tensor.shape[0] // kv_heads, *tensor.shape[1:])
    merged = merge_heads(per_head, groups, method, role, generator)
    return merged.reshape(len(groups) * per_head.shape[1], *tensor.shape[1:])


def merge_per_head(
    tensors: dict[str, torch.Tensor], pattern: str, kv_heads: int, groups: list[list[int]], method: str, role: str,
    generator=None,
) -> dict[str, torch.Tensor]:
    """Merge tensors stored one per KV head (`pattern` names head j as {j}, like StableLM's per-head
    k LayerNorm) in place: the G merged heads replace heads 0..G-1, and the other heads' entries go.
    Nothing happens when the model has no such tensors (StableLM without q/k LayerNorm)."""
    names = [pattern.format(j=j) for j in range(kv_heads)]
    if not all(name in tensors for name in names):
        return tensors
    stacked = torch.stack([tensors.pop(name) for name in names])
    for g, head in enumerate(merge_heads(stacked, groups, method, role, generator)):
        tensors[pattern.format(j=g)] = head
    return tensors
