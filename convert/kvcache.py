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


def cached_tokens_per_layer(config, context: int) -> list[int]:
    """How many tokens each layer's KV cache holds after `context` tokens, as transformers' DynamicCache keeps
    them (its own rule, read from the config): every token, or a sliding-window layer's last window - 1."""
    from transformers import DynamicCache

    layers = DynamicCache(config=config).layers
    return [min(context, window - 1) if (window := getattr(layer, "sliding_window", None)) else context for layer in layers]


def kv_cache_bytes_at_context(config, context: int, kv_heads: int | None = None, dtype: torch.dtype | None = None) -> int:
    """Bytes the KV cache holds after `context` tokens: sliding-window layers (Gemma-2 and 3, Mistral,
    Starcoder2, ...) hold only their window."""
    per_layer = kv_cache_bytes_per_token(config, kv_heads, dtype) // config.num_hidden_layers
    return per_layer * sum(cached_tokens_per_layer(config, context))
