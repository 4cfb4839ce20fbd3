"""What each supported model family looks like: the one place that knows about architectures.

A family spec says which tensors of a layer's attention hold key/value heads and how they are laid
out. Everything else in a checkpoint is copied through untouched. Supporting a new family that
follows the usual `model.layers.{i}.self_attn.*` layout is one more entry in FAMILIES.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import torch
from dataclasses import dataclass, field

from gqa.convert.errors import GQAError
from gqa.convert.kvcache import head_dim_of, kv_heads_of
from gqa.convert.serving import Serving, serving_of


LAYER_PREFIX = "model.layers.{i}."  # where each decoder layer's tensors live
ATTENTION_MODULE = "self_attn"  # the layer's attention block
ATTENTION_PREFIX = f"{LAYER_PREFIX}{ATTENTION_MODULE}."


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    # Tensors (relative to the attention prefix) whose first dimension is KV heads x head_dim:
    # they are merged head by head. Optional ones (biases, norms) are used when present.
    kv_stacked: tuple[str, ...] = ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")
    # Tensors with one entry per KV head, the head index in the name (StableLM's per-head LayerNorm).
    kv_per_head: tuple[str, ...] = ()
    # A fused [Q | K | V] projection (Phi-3), rows stacked in that order.
    fused_qkv: tuple[str, ...] = ()
    # Query-side tensors and the output projection, for regrouping and aligned merging.
    q_stacked: tuple[str, ...] = ("q_proj.weight", "q_proj.bias")
    q_per_head: tuple[str, ...] = ()
    o_proj: str = "o_proj.weight"
    # The separate q, k and v projection modules (unless fused_qkv).
    projections: tuple[str, str, str] = ("q_proj", "k_proj", "v_proj")
    # Modules that normalise queries or keys after the projection, when the model has them: a key
    # transform cannot pass through them, and the k one belongs to the keys alone.
    q_norm: str | None = None
    k_norm: str | None = None
    # Which layers rotate queries and keys (RoPE), read from the config; None: every layer. In a layer
    # without it a key takes any linear map folded into the queries, like partial rotary's unrotated dims.
    rotary_layers: Callable[[object], Sequence[bool]] | None = None
    # The config field that clips q, k and v elementwise after the projection (OLMo's clip_qkv), when
    # the family has one: no head transform passes through the clip, so aligned merging is refused.
    clip_config: str | None = None
    # What a user should know about this family's conversion (shown by `gqa inspect` and the docs).
    notes: tuple[str, ...] = field(default_factory=tuple)
    # Where each decoder layer's tensors and its attention block live, in the model's parameter names.
    layer_prefix: str = LAYER_PREFIX
    attention_prefix: str = ATTENTION_PREFIX

    def role(self, rel: str) -> str:
        """How a merge treats an attention tensor: "norm" (q/k norms), "bias" or "weight"."""
        if rel.split(".")[0] in (self.q_norm, self.k_norm):
            return "norm"
        return "bias" if rel.endswith(".bias") else "weight"

    def qkv_clip(self, config) -> float | None:
        """The elementwise clip of q, k and v this model's config sets, if any."""
        return getattr(config, self.clip_config, None) if self.clip_config else None

    def has_qk_norm(self, rels) -> bool:
        """Whether any of these attention tensors belongs to a q or k norm."""
        return any(rel.split(".")[0] in (self.q_norm, self.k_norm) for rel in rels)

    @property
    def serving(self) -> tuple[Serving, ...]:
        """Whether this family's GQA output serves as GQA in each engine (gqa.convert.serving's table)."""
        return serving_of(self.model_types[0])

    @property
    def kv_modules(self) -> tuple[str, ...]:
        """Attention submodules whose parameters serve keys and values alone (none when fused)."""
        if self.fused_qkv:
            return ()
        return tuple(m for m in (*self.projections[1:], self.k_norm) if m)


PER_HEAD_QK_NORMS = "q_norm/k_norm are per-head RMSNorms shared by all heads: copied unchanged, applied after merging"

FAMILIES: tuple[Family, ...] = (
    Family("Llama", ("llama",)),
    Family("Mistral", ("mistral",)),
    Family("Qwen2", ("qwen2",), notes=("q/k/v biases are merged like their weights",)),
    Family("Gemma", ("gemma",), notes=("head_dim is read from the config (256 on Gemma-7B)",)),
    Family(
        "Phi-3",
        ("phi3",),
        kv_stacked=(),
        fused_qkv=("qkv_proj.weight",),
        q_stacked=(),
        notes=("qkv_proj is fused as [Q | K | V]; only the K and V blocks change",),
    ),
    Family(
        "StableLM",
        ("stablelm",),
        kv_per_head=("k_layernorm.norms.{j}.weight",),
        q_per_head=("q_layernorm.norms.{j}.weight",),
        q_norm="q_layernorm",
        k_norm="k_layernorm",
        notes=("partial rotary; optional qkv bias and per-head q/k LayerNorm (k norms are merged per group)",),
    ),
    Family(
        "OLMo",
        ("olmo",),
        clip_config="clip_qkv",
        notes=("a config that sets clip_qkv converts with mean or first; aligned is refused (no transform passes the clip)",),
    ),
    Family(
        "OLMo-2",
        ("olmo2",),
        kv_stacked=("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias", "k_norm.weight"),
        q_stacked=("q_proj.weight", "q_proj.bias", "q_norm.weight"),
        q_norm="q_norm",
        k_norm="k_norm",
        notes=(
            "k_norm is one RMSNorm over all KV heads together: with fewer heads it normalises over fewer "
            "dimensions, so merging is exact only when the merged heads are identical",
        ),
    ),
    Family(
        "Qwen3",
        ("qwen3",),
        q_norm="q_norm",
        k_norm="k_norm",
        notes=(PER_HEAD_QK_NORMS,),
    ),
    Family(
        "Phi",
        ("phi",),
        o_proj="dense.weight",
        q_norm="q_layernorm",
        k_norm="k_layernorm",
        notes=("partial rotary (phi-2: 32 of 80 dims); biases merged; optional shared q/k LayerNorm copied",),
    ),
    # Gemma-2 and Gemma-3 (text).
    Family(
        "Gemma-2",
        ("gemma2",),
        notes=(
            "sliding-window and global layers alternate; attention-logit soft-capping and query_pre_attn_scalar "
            "act on q·k, which merging and key alignment keep; calibration runs the model's own (eager) attention",
        ),
    ),
    Family(
        "Gemma-3",
        ("gemma3_text",),
        q_norm="q_norm",
        k_norm="k_norm",
        notes=(
            PER_HEAD_QK_NORMS,
            "local and global RoPE bases (per layer type) with sliding-window layers",
        ),
    ),
)


def _smollm3_rotary_layers(config) -> list[bool]:
    """SmolLM3's no_rope_layers holds 1 for a layer that uses RoPE and 0 for one that does not."""
    return [bool(flag) for flag in config.no_rope_layers]


# Granite, Starcoder2, SmolLM3, and the mixture-of-experts families, whose experts, routers and shared
# experts are copied unchanged like every other tensor outside attention.
FAMILIES += (
    Family(
        "Granite",
        ("granite",),
        notes=("attention_multiplier (the softmax scale), residual, embedding and logits multipliers stay in the config",),
    ),
    Family("Starcoder2", ("starcoder2",), notes=("q/k/v/o biases (use_bias) merged like their weights; LayerNorm",)),
    Family(
        "SmolLM3",
        ("smollm3",),
        rotary_layers=_smollm3_rotary_layers,
        notes=("layers without RoPE (no_rope_layers): their keys are aligned with any linear map folded into q",),
    ),
    Family("Mixtral", ("mixtral",), notes=("experts and routers copied unchanged",)),
    Family(
        "Qwen2-MoE",
        ("qwen2_moe",),
        notes=("q/k/v biases merged like their weights; experts, shared expert and routers copied unchanged",),
    ),
    Family(
        "Qwen3-MoE",
        ("qwen3_moe",),
        q_norm="q_norm",
        k_norm="k_norm",
        notes=(
            PER_HEAD_QK_NORMS,
            "experts and routers copied unchanged",
        ),
    ),
    Family(
        "OLMoE",
        ("olmoe",),
        kv_stacked=("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias", "k_norm.weight"),
        q_stacked=("q_proj.weight", "q_proj.bias", "q_norm.weight"),
        q_norm="q_norm",
        k_norm="k_norm",
        clip_config="clip_qkv",
        notes=(
            "k_norm is one RMSNorm over all KV heads together (as in OLMo-2): merging is exact only when the merged "
            "heads are identical",
            "experts and routers copied unchanged",
            "a config that sets clip_qkv converts with mean or first; aligned is refused (no transform passes the clip)",
        ),
    ),
)

_ATTENTION_NAME = re.compile(re.escape(ATTENTION_PREFIX).replace(r"\{i\}", r"(\d+)"))


def attention_layer(name: str) -> int | None:
    """The layer whose attention a tensor belongs to, or None for any other tensor."""
    match = _ATTENTION_NAME.match(name)
    return int(match.group(1)) if match else None


# GPT-2 has no num_key_value_heads and no entry in the family table: it converts to transformers'
# gpt_bigcode (GPT-2's block with one shared KV head) by a plan of its own, gqa.convert.gpt2.
GPT2_MODEL_TYPES = ("gpt2",)


# What gpt_bigcode (the GPT-2 conversion's output) looks like to training: q, k and v fused in c_attn as
# [Q | K | V], the output projection c_proj, in GPT-2's layout. It converts no further (one KV head), so it is
# no entry of FAMILIES; train.params and LoRA read it here.
GPT_BIGCODE = Family(
    "GPTBigCode",
    ("gpt_bigcode",),
    kv_stacked=(),
    fused_qkv=("c_attn.weight",),
    q_stacked=(),
    o_proj="c_proj.weight",
    layer_prefix="transformer.h.{i}.",
    attention_prefix="transformer.h.{i}.attn.",
    notes=("c_attn is fused as [Q | K | V] with one K and one V head",),
)


def trained_family_for(model_type: str) -> Family:
    """The layout of a model gqa trains: a family of the table, or gpt_bigcode, which the GPT-2 conversion writes."""
    return GPT_BIGCODE if model_type in GPT_BIGCODE.model_types else family_for(model_type)


def converts_to_gpt_bigcode(model_type: str) -> bool:
    """Whether a model converts by the GPT-2 -> gpt_bigcode plan rather than by the family table."""
    return model_type in GPT2_MODEL_TYPES


def output_family(model_type: str) -> Family:
    """The family of the checkpoint a model converts to: its own, or gpt_bigcode for GPT-2."""
    return GPT_BIGCODE if converts_to_gpt_bigcode(model_type) else family_for(model_type)


def check_supported(model_type: str) -> None:
    """Refuse a model_type that no conversion supports."""
    if not converts_to_gpt_bigcode(model_type):
        family_for(model_type)


def family_for(model_type: str) -> Family:
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    supported = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)
    raise GQAError(
        f"model_type '{model_type}' is not supported. Supported families: {supported}; and GPT-2 "
        f"({'/'.join(GPT2_MODEL_TYPES)}), which converts to multi-query attention only (--kv-heads 1), as "
        "gpt_bigcode. Models such as GPT-NeoX, OPT or Bloom have no num_key_value_heads in transformers, so a "
        "converted checkpoint could not load natively."
    )


@dataclass(frozen=True)
class Geometry:
    """The attention shape of a model, read from its config."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rotary_dims: int
    unrotated_layers: tuple[int, ...] = ()  # layers that apply no RoPE at all (SmolLM3's NoPE layers)

    def at_layer(self, layer: int) -> Geometry:
        """The geometry one layer's attention sees: no rotary dims in a layer without RoPE."""
        return dataclasses.replace(self, rotary_dims=0) if layer in self.unrotated_layers else self

    def legal_kv_heads(self) -> list[int]:
        """Every G a conversion may target: divisors of the current KV heads, smaller than it."""
        return [g for g in range(1, self.kv_heads) if self.kv_heads % g == 0]


def geometry_of(config) -> Geometry:
    head_dim = head_dim_of(config)
    if config.model_type in ("stablelm",):  # StableLM ignores config.head_dim; it uses hidden / heads
        head_dim = config.hidden_size // config.num_attention_heads
    factors = {
        rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
        for rope in (rope_parameters(config, layer) for layer in range(config.num_hidden_layers))
    }
    if len(factors) > 1:
        raise GQAError(
            f"the config's layer types rotate different fractions of each head ({sorted(factors)}); gqa supports "
            "one partial_rotary_factor for all layers."
        )
    (factor,) = factors
    family = next((fam for fam in FAMILIES if config.model_type in fam.model_types), None)
    rotary = family.rotary_layers(config) if family and family.rotary_layers else [True] * config.num_hidden_layers
    return Geometry(
        layers=config.num_hidden_layers,
        heads=config.num_attention_heads,
        kv_heads=kv_heads_of(config),
        head_dim=head_dim,
        rotary_dims=int(head_dim * factor),
        unrotated_layers=tuple(i for i, rotates in enumerate(rotary) if not rotates),
    )


def check_target(geometry: Geometry, kv_heads: int, allow_same: bool = False) -> None:
    """Refuse a G that cannot be reached by merging. `allow_same` admits G equal to the current KV
    heads: an identity conversion (recast or reshard), used by the library and the tests."""
    if allow_same and kv_heads == geometry.kv_heads:
        return
    if kv_heads < 1:
        raise GQAError(f"--kv-heads must be at least 1, got {kv_heads}.")
    legal = geometry.legal_kv_heads()
    if kv_heads >= geometry.kv_heads:
        raise GQAError(
            f"--kv-heads {kv_heads} is not smaller than the model's {geometry.kv_heads} KV heads; nothing to "
            f"convert. Legal values: {legal or 'none (the model already has one KV head)'}."
        )
    if geometry.kv_heads % kv_heads:
        raise GQAError(
            f"--kv-heads {kv_heads} does not divide the model's {geometry.kv_heads} KV heads, so the heads cannot "
            f"be split into equal groups. Legal values: {legal}."
        )


def _rope_by_layer_type(config) -> bool:
    """Whether the config keys its rotary settings by layer type (Gemma-3: a local base for
    sliding-window layers, a global one, maybe scaled, for full attention)."""
    rope = getattr(config, "rope_parameters", None) or {}
    layer_types = getattr(config, "layer_types", None) or ()
    return bool(layer_types and rope and set(rope) <= set(layer_types))


def rope_parameters(config, layer: int) -> dict:
    """The rotary settings layer `layer` uses."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    return dict(rope[config.layer_types[layer]] or {}) if _rope_by_layer_type(config) else rope


def rotary_frequencies(config, geometry: Geometry, layer: int) -> torch.Tensor:
    """The rotation angle per token of each rotary pair (RoPE's inv_freq) in layer `layer`, as
    transformers computes it."""
    rope = rope_parameters(config, layer)
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type in ROPE_INIT_FUNCTIONS:
            layer_type = {"layer_type": config.layer_types[layer]} if _rope_by_layer_type(config) else {}
            return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", **layer_type)[0].double()
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    exponents = torch.arange(0, geometry.rotary_dims, 2, dtype=torch.float64) / geometry.rotary_dims
    return 1.0 / theta**exponents
