"""KV-cache arithmetic, exact from the config."""

from __future__ import annotations

import torch

from gqa.convert.modeldir import config_dtype


def head_dim_of(config) -> int:
    """head_dim as the model uses it: the config's own value when it has one (Gemma), else hidden/heads."""
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def kv_heads_of(config) -> int:
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def kv_cache_bytes_per_token(config, kv_heads: int | None = None, dtype: torch.dtype | None = None) -> int:
    """Bytes the KV cache holds per token: keys and values, every layer, every KV head."""
    kv_heads = kv_heads_of(config) if kv_heads is None else kv_heads
    dtype = dtype or config_dtype(config, torch.float32)
    return 2 * config.num_hidden_layers * kv_heads * head_dim_of(config) * dtype.itemsize
