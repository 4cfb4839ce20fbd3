"""The calibration pass of `--method aligned`: merge layer by layer on the converted model's own
activations, one layer's weights in memory at a time.

Two hidden-state streams run side by side over the calibration tokens: the source model's and the
converted model's (whose earlier layers are already merged). For each layer:

1. the source layer runs on the source stream, recording its attention's per-head outputs A
   (the input of o_proj), which are the targets;
2. the source layer's attention input on the converted stream gives the moment E[x̃ x̃ᵀ] that the
   merge is fitted on (gqa.convert.aligned), so each layer is merged for the inputs it will see;
3. the merged layer runs on the converted stream, and o_proj is refitted by least squares so the
   merged attention's output best matches the source's, E‖A Oᵀ − A' O'ᵀ‖²: this undoes what the
   merge lost in values and keys alike, and the drift of earlier layers too;
4. the merged layer (with its refitted o_proj) carries the converted stream to the next layer.

The models are built on the meta device and run with their real transformers code; every layer
runs with the arguments the model's own forward gives it (its own attention mask: sliding-window
layers see a different one from full-attention layers). A layer's weights are materialised from the
checkpoint (on `device`: a GPU when there is one) just before it runs and dropped after. The
closed-form merge itself runs on the CPU: it sees one layer's weights and a (hidden+1)^2 moment.
Each merged layer's attention tensors go to disk, for the streaming writer to pick up.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from gqa.convert.modeldir import CheckpointIndex, model_layout, same_tensor, tied_names
from gqa.convert.errors import GQAError
from gqa.convert.families import ATTENTION_MODULE, ATTENTION_PREFIX, LAYER_PREFIX, Family, Geometry
from gqa.convert.text import chunk_tokens, leading_bos, text_documents, token_stream

log = logging.getLogger(__name__)

# Standard-library modules whose docstrings make the default calibration text: real English
# technical prose that ships with Python, disjoint from the held-out split used for evaluation.
DEFAULT_CALIBRATION_MODULES = (
    "argparse", "collections", "functools", "itertools", "pathlib", "subprocess",
    "os", "typing", "threading", "re", "shutil", "inspect", "io",
    "asyncio", "socket", "unittest", "decimal", "random", "configparser", "xml.etree.ElementTree", "pickle", "urllib.parse",
)
RIDGE = 1e-4  # relative ridge for the o_proj refit: keeps it stable when heads are nearly collinear


def default_calibration_text() -> str:
    from gqa.convert.corpus import HELDOUT_PACKAGES, module_docstrings

    assert not set(DEFAULT_CALIBRATION_MODULES) & set(HELDOUT_PACKAGES)
    return "\n\n".join(doc for name in DEFAULT_CALIBRATION_MODULES for doc in module_docstrings(name))


def calibration_device(name: str) -> torch.device:
    """The torch device for the calibration pass: `auto` picks the GPU when torch sees one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise GQAError(f"--device {name!r} is not a torch device; use auto, cpu, cuda or cuda:N.") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GQAError(f"--device {name}: torch sees no CUDA GPU here; use --device cpu (or auto).")
    if device.type not in ("cpu", "cuda"):
        raise GQAError(f"--device {name}: the calibration pass runs on cpu or cuda only.")
    return device


def calibration_text(calibration: str | None) -> str:
    """The text --calibration names: a file, a split of the recipes' corpus (`stdlib-docs:train`), or
    (None) the default docstrings."""
    from gqa.convert import corpus

    name, _, split = (calibration or "").partition(":")
    if name == corpus.NAME:  # the recipes' corpus, as `stdlib-docs:train`
        if split not in corpus.SPLITS:
            splits = ", ".join(f"{corpus.NAME}:{s}" for s in corpus.SPLITS)
            raise GQAError(f"--calibration {calibration}: the corpus splits are {splits}.")
        return corpus.corpus_text(split)
    if calibration:
        path = Path(calibration)
        if not path.is_file():
            raise GQAError(f"calibration file {path} does not exist.")
        return path.read_text(encoding="utf-8", errors="replace")
    return default_calibration_text()


def calibration_inputs(model_dir: Path, config, options) -> torch.Tensor:
    """The calibration token ids --method aligned merges on, as the options (ConvertOptions) ask for them,
    no longer than the model's context."""
    length = options.calibration_length
    context = getattr(config, "max_position_embeddings", None)
    if context and length > context:  # activations past the trained context would mislead the merge
        log.warning("--calibration-length %d is longer than the model's context; using %d", length, context)
        length = context
    text = calibration_text(options.calibration)
    return calibration_tokens(model_dir, text, options.calibration_sequences, length)


def calibration_tokens(model_dir: Path, text: str, sequences: int, seq_len: int) -> torch.Tensor:
    """`sequences` x `seq_len` token ids from the start of the text, tokenised with the source's
    tokenizer and cut into windows the way training and evaluation cut text (gqa.convert.text)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise GQAError(f"calibration needs the source's tokenizer, but none loads from {model_dir} ({err}).") from err
    stream = token_stream(tokenizer, text_documents(text), max_tokens=sequences * seq_len)
    windows = chunk_tokens(stream, seq_len, leading_bos(tokenizer))[:sequences]
    if len(windows) == 0:
        raise GQAError(
            f"the calibration text has {len(stream)} tokens, fewer than one sequence of {seq_len}; give a longer "
            "--calibration file or a smaller --calibration-length."
        )
    if len(windows) < sequences:
        log.warning("calibration text is short: using %d sequences of %d tokens, not %d", len(windows), seq_len, sequences)
    return torch.from_numpy(windows)


def _materialise(model, module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str, device: torch.device) -> None:
    """Give a meta-device module real storage and its weights, taken from `tensors` (full names, as
    the model holds them). Buffers that are not stored (rotary frequencies, embedding scales) are
    computed by the model's own initialiser."""
    module.to_empty(device=device)
    for sub in module.modules():
        if sub._non_persistent_buffers_set:
            model._init_weights(sub)
    module.load_state_dict({name: tensors[prefix + name].float() for name in module.state_dict()}, strict=True)


def _meta_model(config):
    """The model on the meta device, with the attention code plain transformers loads it with: SDPA,
    or the eager code where the model refuses SDPA (Gemma-2, whose attention-logit soft-capping SDPA
    cannot compute). The config is copied: transformers records its choice in the config it is given."""
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa", dtype=torch.float32)
        except ValueError:
            return AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager", dtype=torch.float32)


class _LayerCall(torch.nn.Module):
    """Stands in for a decoder layer: records the call the model makes to it and passes the hidden
    states through unchanged."""

    def __init__(self, layer: torch.nn.Module, calls: list[dict]):
        super().__init__()
        self.calls = calls
        if hasattr(layer, "attention_type"):  # some models pick each layer's mask by this attribute
            self.attention_type = layer.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        self.calls.append(dict(kwargs, hidden_states=hidden_states))
        return hidden_states


def _layer_calls(base: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """The input of layer 0 (embeddings) and the keyword arguments the model's own code gives each
    layer (its attention mask, which differs between sliding-window and full-attention layers, the
    rotary embeddings). The layers are swapped for recorders, so none of them runs."""
    layers = base.layers
    calls: list[dict] = []
    base.layers = torch.nn.ModuleList(_LayerCall(layer, calls) for layer in layers)
    try:
        with torch.no_grad():
            base(input_ids=input_ids, use_cache=False)
    finally:
        base.layers = layers
    if len(calls) != len(layers):
        raise GQAError(f"the model called {len(calls)} of its {len(layers)} layers; cannot calibrate it layer by layer.")
    first = calls[0]["hidden_states"]
    return first, [{k: v for k, v in call.items() if k != "hidden_states"} for call in calls]


def _capture(module: torch.nn.Module, store: list, calls: list | None = None):
    """Record a module's input on every call (its first argument or its kwarg 'hidden_states'), and
    into `calls`, when given, the call's other keyword arguments (masks, rotary embeddings)."""

    def hook(mod, args, kw):
        store.append(kw["hidden_states"] if "hidden_states" in kw else args[0])
        if calls is not None:
            calls.append({k: v for k, v in kw.items() if k != "hidden_states"})

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def augmented_rows(x: torch.Tensor) -> torch.Tensor:
    """x's vectors as float64 rows with a constant 1 appended: x̃, whose moment E[x̃ x̃ᵀ] the aligned merge fits."""
    x = x.reshape(-1, x.shape[-1]).double()
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)


def refit_output_projection(
    source_heads: torch.Tensor,
    merged_heads: torch.Tensor,
    source_weight: torch.Tensor,
    source_bias: torch.Tensor | None,
    prior_weight: torch.Tensor,
    prior_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The o_proj (and bias) that best maps the merged attention's per-head outputs A' to what the
    source's o_proj made of the source's A: least squares over the calibration tokens, with a ridge
    pulling toward the merge's own o_proj (the prior), so directions the calibration data never
    excites keep the prior's weights instead of collapsing to zero. Exact when A' = A."""
    has_bias = prior_bias is not None
    a = merged_heads.reshape(-1, merged_heads.shape[-1]).double()
    if has_bias:
        a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype, device=a.device)], dim=1)
    target = source_heads.reshape(-1, source_heads.shape[-1]).double() @ source_weight.double().T
    if source_bias is not None:
        target = target + source_bias.double()
    prior = prior_weight.double().T
    if has_bias:
        prior = torch.cat([prior, prior_bias.double()[None, :]])
    gram = a.T @ a
    ridge = RIDGE * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    solution = torch.linalg.solve(gram + ridge, a.T @ target + ridge @ prior)
    if has_bias:
        return solution[:-1].T, solution[-1]
    return solution.T, None


def refine_attention(
    attention: torch.nn.Module, inputs: torch.Tensor, call_kwargs: dict, target: torch.Tensor, steps: int, lr: float,
    batch: int = 4,
) -> tuple[float, float]:
    """Adam on the merged attention's own weights, minimising its output's squared error against the
    source attention's output `target` (computed on the source stream) for the converted stream's
    `inputs`: the one objective that sees the keys through the softmax, which the closed-form merge
    cannot. Returns the relative error on all calibration tokens before and after; weights that end
    no better than they started are put back, so refinement never undoes an exact merge."""
    sequences = len(inputs)
    scale = target.pow(2).mean()

    def sliced(value, rows):
        return value[rows] if isinstance(value, torch.Tensor) and value.dim() > 0 and len(value) == sequences else value

    def error(rows) -> torch.Tensor:
        kwargs = {k: sliced(v, rows) for k, v in call_kwargs.items()}
        return (_output(attention(hidden_states=inputs[rows], **kwargs)) - target[rows]).pow(2).mean() / scale

    with torch.no_grad():
        before = float(error(slice(None)))
    if before < 1e-10:  # already exact: Adam's normalised steps would turn rounding noise into drift
        return before, before
    start = {k: v.clone() for k, v in attention.state_dict().items()}
    params = list(attention.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    # Decaying to zero lets the last steps settle instead of hopping around the minimum.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(0)
    with torch.enable_grad():
        for p in params:
            p.requires_grad_(True)
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            error(torch.randperm(sequences, generator=generator)[:batch]).backward()
            optimizer.step()
            schedule.step()
        for p in params:
            p.requires_grad_(False)
    with torch.no_grad():
        after = float(error(slice(None)))
        if not after < before:  # no better, or diverged to NaN
            attention.load_state_dict(start)
            after = before
    return before, after


def layerwise_aligned_merge(
    index: CheckpointIndex,
    config,
    out_config,
    family: Family,
    geometry: Geometry,
    tokens: torch.Tensor,
    merge: Callable[..., tuple[dict[str, torch.Tensor], list[list[int]]]],
    out_dir: Path,
    refit_output: bool = True,
    refine_steps: int = 0,
    refine_lr: float = 1e-3,
    refine_batch: int = 4,
    device: str | torch.device = "cpu",
) -> tuple[list[Path], list[list[list[int]]]]:
    """Run the pass described above. `merge(layer, attention_tensors, moment)` returns the merged
    attention tensors (relative names) and the groups used. Returns per-layer files and groups."""
    source, converted = _meta_model(config), _meta_model(out_config)
    src_base, conv_base = source.base_model, converted.base_model
    prefix = source.base_model_prefix + "."
    tied = tied_names(source)

    def read_source(name: str) -> torch.Tensor:  # a tied tensor is stored under one of its names
        return index.read(next((n for n in same_tensor(name, tied) if n in index), name))

    for name, child in src_base.named_children():
        if child is not src_base.layers:
            child_prefix = f"{prefix}{name}."
            tensors = {child_prefix + n: read_source(child_prefix + n) for n in child.state_dict()}
            _materialise(source, child, tensors, child_prefix, device)

    def layer_tensors(model, i: int, replaced: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Layer i's stored tensors, with its attention's replaced by `replaced` (relative names) when
        given, in the model's own layout (experts fused as the model holds them)."""
        layer_prefix, attention_prefix = LAYER_PREFIX.format(i=i), ATTENTION_PREFIX.format(i=i)
        names = [n for n in index.tensors if n.startswith(layer_prefix)]
        if replaced is not None:
            names = [n for n in names if not n.startswith(attention_prefix)]
        stored = {n: read_source(n) for n in names}
        stored.update({attention_prefix + rel: tensor for rel, tensor in (replaced or {}).items()})
        return model_layout(model, stored)

    embeddings, layer_kwargs = _layer_calls(src_base, tokens.to(device))
    source_stream = converted_stream = embeddings

    o_module = family.o_proj.rsplit(".", 1)[0]
    paths, all_groups = [], []
    out_dir.mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(geometry.layers), desc="aligning", unit="layer", disable=None):
        src_layer, conv_layer = src_base.layers[i], conv_base.layers[i]
        attention_prefix = ATTENTION_PREFIX.format(i=i)
        _materialise(source, src_layer, layer_tensors(source, i), LAYER_PREFIX.format(i=i), device)
        seen = _run_source_layer(src_layer, o_module, source_stream, converted_stream, layer_kwargs[i])
        src_layer.to_empty(device="meta")
        tensors = {
            name[len(attention_prefix) :]: read_source(name) for name in index.tensors if name.startswith(attention_prefix)
        }
        merged, groups = merge(i, tensors, seen.moment.cpu())
        _materialise(converted, conv_layer, layer_tensors(converted, i, merged), LAYER_PREFIX.format(i=i), device)
        if refit_output:
            weight, bias = _refit_in_place(conv_layer, o_module, converted_stream, layer_kwargs[i], seen)
            merged[family.o_proj] = weight.to("cpu", torch.float32)
            if bias is not None:
                merged[family.o_proj.replace(".weight", ".bias")] = bias.to("cpu", torch.float32)
        if refine_steps:
            before, after = refine_attention(
                conv_layer.get_submodule(ATTENTION_MODULE), seen.attention_input, seen.attention_call, seen.output(), refine_steps, refine_lr,
                refine_batch,
            )  # fmt: skip
            log.info("layer %d: attention output error %.4f -> %.4f", i, before, after)
            for name, param in conv_layer.get_submodule(ATTENTION_MODULE).named_parameters():
                merged[name] = param.detach().to("cpu", torch.float32)
        with torch.no_grad():
            converted_stream = _output(conv_layer(converted_stream, **layer_kwargs[i]))
        conv_layer.to_empty(device="meta")
        source_stream = seen.next_source
        paths.append(out_dir / f"layer-{i:05d}.safetensors")
        save_file({k: v.contiguous() for k, v in merged.items()}, paths[-1])
        all_groups.append(groups)
    return paths, all_groups


@dataclass
class _SourceLayer:
    """What one source layer shows on both streams: the targets and the merge's inputs."""

    next_source: torch.Tensor  # the source stream after this layer
    heads: torch.Tensor  # the source attention's per-head outputs (o_proj's input) on the source stream
    o_weight: torch.Tensor
    o_bias: torch.Tensor | None
    attention_input: torch.Tensor  # the attention's input on the converted stream
    attention_call: dict  # and the call's other arguments (mask, rotary embeddings)
    moment: torch.Tensor  # E[x̃ x̃ᵀ] of that input, augmented with a constant 1

    def output(self) -> torch.Tensor:
        """What the source attention outputs on the source stream: the target of refinement."""
        return self.heads @ self.o_weight.T + (0 if self.o_bias is None else self.o_bias)


def _run_source_layer(layer, o_module: str, source_stream, converted_stream, kwargs: dict) -> _SourceLayer:
    attention_inputs: list[torch.Tensor] = []
    head_outputs: list[torch.Tensor] = []
    calls: list[dict] = []
    attention = layer.get_submodule(ATTENTION_MODULE)
    o_proj = attention.get_submodule(o_module)
    hooks = [_capture(attention, attention_inputs, calls), _capture(o_proj, head_outputs)]
    with torch.no_grad():
        next_source = _output(layer(source_stream, **kwargs))
        layer(converted_stream, **kwargs)
    for hook in hooks:
        hook.remove()
    augmented = augmented_rows(attention_inputs[1])
    return _SourceLayer(
        next_source=next_source,
        heads=head_outputs[0],
        o_weight=o_proj.weight.detach().clone(),
        o_bias=None if o_proj.bias is None else o_proj.bias.detach().clone(),
        attention_input=attention_inputs[1],
        attention_call=calls[1],
        moment=augmented.T @ augmented / len(augmented),
    )


def _refit_in_place(layer, o_module: str, converted_stream, kwargs: dict, seen: _SourceLayer):
    """Refit the merged layer's o_proj (see refit_output_projection) and load it into the layer."""
    merged_outputs: list[torch.Tensor] = []
    o_proj = layer.get_submodule(ATTENTION_MODULE).get_submodule(o_module)
    hook = _capture(o_proj, merged_outputs)
    with torch.no_grad():
        layer(converted_stream, **kwargs)
    hook.remove()
    weight, bias = refit_output_projection(seen.heads, merged_outputs[0], seen.o_weight, seen.o_bias, o_proj.weight, o_proj.bias)
    with torch.no_grad():
        o_proj.weight.copy_(weight)
        if bias is not None:
            o_proj.bias.copy_(bias)
    return weight, bias


def _output(result):
    return result[0] if isinstance(result, tuple) else result
