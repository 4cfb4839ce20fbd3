"""GPT-2 to multi-query attention, as transformers' gpt_bigcode.

GPT-2 has no num_key_value_heads, but gpt_bigcode is GPT-2's block with one key/value head shared by
all query heads (`multi_query`): the same embeddings, learned positions, LayerNorms, MLP and softmax
scale. A GPT-2 checkpoint therefore becomes a GPTBigCodeForCausalLM checkpoint that plain
transformers loads:

- GPT-2 stores its projections as Conv1D, weight [in, out]; gpt_bigcode's are nn.Linear, weight
  [out, in]: c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj are transposed.
- c_attn's [Q | K | V] (each hidden wide) becomes [Q | K | V] with K and V one head wide: the K heads
  are merged into one, and so are the V heads, weights and biases alike. With `--method aligned` the
  heads are aligned before merging (gqa.convert.aligned: GPT-2 has no rotary embedding, so keys, like
  values, take any linear map), the maps folded into the query rows of c_attn and into attn.c_proj, on
  the attention inputs the source model shows on the calibration text.
- Every other tensor keeps its name and value; stored copies of GPT-2's causal-mask buffers
  (attn.bias, attn.masked_bias in older checkpoints) are left out, as the model computes its own.

Each output tensor is made from one source tensor (a layer's attention tensors together, when aligned),
so the conversion streams through the same writer as every other family: the plan (names, dtypes,
shapes) first, then the tensors one at a time.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import GPTBigCodeConfig, PretrainedConfig

from gqa.convert import steps  # the steps every conversion shares: finite checks, streaming, side files
from gqa.convert.errors import GQAError
from gqa.convert.aligned import aligned_merge
from gqa.convert.families import GPT_BIGCODE, Geometry
from gqa.convert.heads import merge_stacked_rows
from gqa.convert.modeldir import CheckpointIndex, Source, config_dtype, dtype_name, meta_tensors, same_tensor
from gqa.convert.options import DTYPES, ConvertOptions
from gqa.convert.writer import TensorSpec

log = logging.getLogger(__name__)

FAMILY_NAME = "GPT-2"
TARGET_MODEL_TYPE = "gpt_bigcode"
TARGET_ARCHITECTURE = "GPTBigCodeForCausalLM"
METHODS = ("mean", "first", "random", "aligned")
# A layer's attention tensors that --method aligned makes together (relative to the layer).
ALIGNED_TENSORS = ("attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight")
# Tensors GPT-2 stores as Conv1D weights, [in, out]: transposed into nn.Linear's [out, in].
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# The GPT-2 config fields that mean the same in a gpt_bigcode config; every other field is GPT-2's
# own (the double-heads model's summary_*) or one of the options refused below.
CARRIED_FIELDS = (
    "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
    "resid_pdrop", "embd_pdrop", "attn_pdrop", "layer_norm_epsilon", "initializer_range", "scale_attn_weights",
    "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings",
)  # fmt: skip
NOTES = (
    "converts to gpt_bigcode (GPTBigCodeForCausalLM, multi_query): GPT-2's block with one KV head, loaded natively",
    "Conv1D weights are transposed to nn.Linear's layout; the K and V heads of c_attn are merged into one",
    "--method aligned merges on the source's attention inputs, without --refine-steps: refinement runs each "
    "source layer beside its converted one, and gpt_bigcode's layer is not GPT-2's",
)


def unconvertible_options(config: PretrainedConfig) -> list[str]:
    """Why this GPT-2 config cannot become a gpt_bigcode one with the same function (empty: it can)."""
    reasons = []
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        reasons.append(
            "it sets scale_attn_by_inverse_layer_idx, which divides layer i's attention scores by i + 1; "
            "gpt_bigcode scales every layer's scores alike (by 1/sqrt(head_dim))"
        )
    if getattr(config, "reorder_and_upcast_attn", False):
        reasons.append(
            "it sets reorder_and_upcast_attn, which computes the attention scores in float32 with the scale "
            "applied first; gpt_bigcode has no such option, so in 16 bits the scores would lose the overflow "
            "protection the model was trained with"
        )
    if getattr(config, "add_cross_attention", False):
        reasons.append("it has cross-attention layers, which gpt_bigcode's multi-query attention does not support")
    return reasons


def check_convertible(config: PretrainedConfig, kv_heads: int, method: str | None = None, refine_steps: int = 0) -> None:
    """Refuse, before anything is read, what a GPT-2 conversion cannot do."""
    if kv_heads != 1:
        raise GQAError(
            f"--kv-heads {kv_heads}: a GPT-2 model converts to gpt_bigcode, which has only multi-head attention or "
            "one KV head (multi_query), nothing between; use --kv-heads 1."
        )
    reasons = unconvertible_options(config)
    if reasons:
        raise GQAError(
            "this GPT-2 model cannot be converted to gpt_bigcode with its function kept: " + "; ".join(reasons) + "."
        )
    if method is not None and method not in METHODS:
        raise GQAError(f"--method {method} is not available for GPT-2; use --method {', '.join(METHODS)}.")
    if method == "aligned" and refine_steps:
        raise GQAError(
            f"--refine-steps {refine_steps} is not available for GPT-2: refinement runs each source layer beside its "
            "converted one, and GPT-2 converts to another architecture (gpt_bigcode). --method aligned merges GPT-2 "
            "in closed form on the source's attention inputs; use --refine-steps 0, then uptrain."
        )


def geometry(config: PretrainedConfig) -> Geometry:
    """GPT-2's attention shape: learned positions, so no rotary dims."""
    heads = config.n_head
    return Geometry(layers=config.n_layer, heads=heads, kv_heads=heads, head_dim=config.n_embd // heads, rotary_dims=0)


def bigcode_config(config: PretrainedConfig, kv_heads: int = 1, dtype: torch.dtype | None = None) -> GPTBigCodeConfig:
    """The gpt_bigcode config of the converted model. Its softmax options (attention_softmax_in_fp32,
    scale_attention_softmax_in_fp32) keep their defaults: they only choose float32 for the softmax,
    the same function as GPT-2's."""
    check_convertible(config, kv_heads)
    out = GPTBigCodeConfig(**{name: getattr(config, name) for name in CARRIED_FIELDS}, multi_query=True)
    out.architectures = [TARGET_ARCHITECTURE]
    dtype = dtype or config_dtype(config)
    if dtype is not None:
        out.dtype = dtype_name(dtype)
    return out


def source_names(index: CheckpointIndex) -> dict[str, str]:
    """Each stored tensor by the name GPT2LMHeadModel gives it. The original GPT-2 checkpoints were
    saved from GPT2Model, without the `transformer.` prefix (transformers adds it on load)."""
    names = {}
    for stored in index.tensors:
        full = stored if stored.startswith(("transformer.", "lm_head.")) else f"transformer.{stored}"
        names[full] = stored
    return names


def check_source(index: CheckpointIndex, config: PretrainedConfig, stored: dict[str, str]) -> list[str]:
    """Refuse a checkpoint that lacks a tensor GPT-2 needs or has one of the wrong shape. Returns the
    stored names the model does not define (the old mask buffers), which are not written."""
    expected = meta_tensors(config)
    for name, shape in expected.shapes.items():
        if name not in stored:
            if any(alias in stored for alias in same_tensor(name, expected.tied)):
                continue  # tied weights are stored once
            raise GQAError(
                f"tensor {name} is missing from the checkpoint in {index.model_dir}; the config says the model has "
                "it. Is the download complete?"
            )
        if index.tensors[stored[name]].shape != shape:
            raise GQAError(
                f"tensor {stored[name]} has shape {list(index.tensors[stored[name]].shape)} but the config implies "
                f"{list(shape)}; config.json and the weights do not belong together."
            )
    return [stored[name] for name in stored if name not in expected.shapes]


def plan(index: CheckpointIndex, stored: dict[str, str], out_config, cast: torch.dtype | None) -> list[TensorSpec]:
    """The output tensors, in source file order, with the shapes the gpt_bigcode model gives them."""
    out_shapes = meta_tensors(out_config).shapes
    full_name = {stored_name: name for name, stored_name in stored.items()}
    specs = []
    for stored_name in index.names_in_file_order():
        name = full_name[stored_name]
        if name not in out_shapes:
            continue  # a mask buffer (check_source names it)
        dtype = index.tensors[stored_name].dtype
        out_dtype = cast if cast is not None and dtype.is_floating_point else dtype
        specs.append(TensorSpec(name, out_dtype, out_shapes[name]))
    return specs


class BigCodeView:
    """The source checkpoint read as the gpt_bigcode model stores it: `read(name)` gives the output
    tensor `name`, made from its one source tensor (transposed, and c_attn's K/V heads merged), or under
    --method aligned (`moments` given), a layer's attention tensors made together the first time one is read."""

    def __init__(self, index: CheckpointIndex, stored: dict[str, str], geometry: Geometry, method: str, seed: int,
                 moments: list[torch.Tensor] | None = None):  # fmt: skip
        self.index, self.stored, self.geometry, self.method = index, stored, geometry, method
        self.generator = torch.Generator().manual_seed(seed)
        self.moments = moments
        self.aligned: dict[str, torch.Tensor] = {}  # a layer's merged tensors until each is read

    def read(self, name: str) -> torch.Tensor:
        suffix = name.split(".", 3)[-1] if name.startswith("transformer.h.") else name
        if self.moments is not None and suffix in ALIGNED_TENSORS:
            return self._aligned(name, int(name.split(".")[2]))
        tensor = self._linear(name, suffix)
        if suffix in ("attn.c_attn.weight", "attn.c_attn.bias"):
            tensor = self._merge_kv(tensor, "bias" if suffix.endswith("bias") else "weight")
        return tensor

    def _linear(self, name: str, suffix: str) -> torch.Tensor:
        """Source tensor `name` in nn.Linear's layout, checked before any head is merged away."""
        tensor = self.index.read(self.stored[name])
        steps.check_finite(self.stored[name], tensor)
        return tensor.T if suffix in CONV1D_WEIGHTS else tensor

    def _aligned(self, name: str, layer: int) -> torch.Tensor:
        if name not in self.aligned:
            prefix = GPT_BIGCODE.layer_prefix.format(i=layer)
            tensors = {rel.removeprefix("attn."): self._linear(prefix + rel, rel) for rel in ALIGNED_TENSORS}
            one_group = [list(range(self.geometry.heads))]
            merged = aligned_merge(tensors, GPT_BIGCODE, self.geometry, one_group, self.moments[layer])
            self.aligned.update({f"{prefix}attn.{rel}": merged[rel] for rel in tensors})
        return self.aligned.pop(name)

    def _merge_kv(self, qkv: torch.Tensor, role: str) -> torch.Tensor:
        """[Q | K | V] rows, each hidden wide -> [Q | K | V] with K and V one head wide."""
        g = self.geometry
        q, k, v = qkv.split(g.heads * g.head_dim)
        one_group = [list(range(g.heads))]
        merged = [merge_stacked_rows(x, g.heads, one_group, self.method, role, self.generator) for x in (k, v)]
        return torch.cat([q.float(), *merged])


def attention_moments(model_dir: Path, config: PretrainedConfig, options: ConvertOptions) -> list[torch.Tensor]:
    """Per layer, the moment E[x̃ x̃ᵀ] of the attention's input (ln_1's output with a constant 1 appended) that
    the source model shows on the calibration text, which the aligned merge is fitted on. GPT-2 checkpoints
    are small (1.5B parameters at most), so the whole source model is loaded once for this."""
    from transformers import GPT2LMHeadModel

    from gqa.convert.calibration import augmented_rows, calibration_device, calibration_inputs

    tokens, device = calibration_inputs(model_dir, config, options), calibration_device(options.device)
    log.info("calibrating on %d x %d tokens on %s", *tokens.shape, device)
    model = GPT2LMHeadModel.from_pretrained(model_dir, config=config, dtype=torch.float32).to(device).eval()
    sums: list[torch.Tensor | None] = [None] * config.n_layer

    def accumulate(layer: int):
        def hook(module, args, kwargs):
            x = augmented_rows(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
            sums[layer] = x.T @ x if sums[layer] is None else sums[layer] + x.T @ x

        return hook

    hooks = [block.attn.register_forward_pre_hook(accumulate(i), with_kwargs=True) for i, block in enumerate(model.transformer.h)]
    try:
        with torch.no_grad():
            for batch in tokens.split(8):  # a few sequences at a time: memory stays that of one batch
                model(batch.to(device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return [total.cpu() / tokens.numel() for total in sums]


def convert_gpt2(src: Source, config: PretrainedConfig, staged: Path, out: Path, options: ConvertOptions) -> steps.ConversionResult:
    """Check, plan and stream a GPT-2 checkpoint into `staged` as a gpt_bigcode one, then the side files."""
    check_convertible(config, options.kv_heads, options.method, options.refine_steps)
    cast = DTYPES[options.dtype]
    out_config = bigcode_config(config, options.kv_heads, cast)
    index = CheckpointIndex(src.path)
    stored = source_names(index)
    dropped = check_source(index, config, stored)
    if dropped:
        log.warning("leaving out %d tensors the model does not define: %s", len(dropped), dropped[:5])
    specs = plan(index, stored, out_config, cast)
    shape = geometry(config)
    steps.check_space(out, specs, src.path, options)
    moments = attention_moments(src.path, config, options) if options.method == "aligned" else None
    view = BigCodeView(index, stored, shape, options.method, options.seed, moments)
    # Every output is a plain tensor of the plan, read from the view: no per-layer merge step.
    # the view checks each source tensor before its heads are merged away; no second check of its outputs
    bytes_written = steps.write_tensors(specs, specs, view.read, staged, options.shard_size, merge_layer=None)
    out_config.save_pretrained(staged)
    groups = [[list(range(shape.heads))] for _ in range(shape.layers)]
    # the provenance records what config.json now says, which gqa publish checks
    return steps.finish_output(src, staged, config, index, options, shape, groups, dropped, FAMILY_NAME,
                               (len(specs), bytes_written), model_type=TARGET_MODEL_TYPE)
