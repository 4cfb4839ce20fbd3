"""The measured step of the memory plan: one micro batch's forward, loss and backward run on fake tensors (shapes
and dtypes, no storage) exactly as the loop runs them, while every tensor the step allocates is counted until
it is freed. The peak of that count is the activations; the model built on the meta device gives the exact
parameter counts."""

from __future__ import annotations

import logging
import re
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gqa.convert.errors import GQAError
from gqa.convert.families import trained_family_for
from gqa.convert.modeldir import DTYPES, config_dtype
from gqa.train.params import prepare_model, weights_dtype
from gqa.train.recipe import Recipe, model_directory


@dataclass(frozen=True)
class StepProfile:
    """What one training micro batch of a recipe's model holds, measured on fake tensors."""

    total_params: int  # every parameter (adapters included)
    weight_bytes: int  # as the loop holds them: fp32, but a 16-bit checkpoint's frozen base under lora
    trainable_params: int
    largest_trainable: int  # elements of the largest trainable tensor (CPU AdamW's per-tensor scratch)
    largest_group: int  # trainable elements of the largest optimizer parameter group (CUDA's multi-tensor scratch)
    layer_params: int  # parameters of the largest decoder layer (FSDP2 / ZeRO-3 gather one at a time)
    outer_params: int  # parameters outside the layers (embeddings, final norm, output head)
    teacher_params: int
    vocab_size: int
    peak: int  # activation bytes at the peak, gradients counted as passing spikes (they accumulate elsewhere)
    peak_with_grads: int  # the same, with the gradients as backward builds them (accumulation 1)
    peak_without_casts: int  # `peak` without autocast's copies of the weights (sharded launches gather instead)
    logits: int  # bytes of logits-sized tensors (micro x tokens x vocab) alive at `peak`


_PROFILES: dict[tuple, StepProfile] = {}  # measured steps of this process, by _profile_key


def measured_step(recipe: Recipe, config=None) -> StepProfile:
    """The measured step of a recipe (of the model `config` describes, when given, instead of model.path's);
    remembered, since the suggestions measure the same step again."""
    key = _profile_key(recipe, config)
    if key not in _PROFILES:
        if len(_PROFILES) >= 64:
            _PROFILES.clear()
        _PROFILES[key] = _measure(recipe, config)
    return _PROFILES[key]


def distilling(recipe: Recipe) -> bool:
    return recipe.loss.kind == "distill" and recipe.loss.distill_weight > 0


def _profile_key(recipe: Recipe, config=None) -> tuple:
    """Everything the measured step depends on, the config files (or the config given) included."""

    def config_stamp(path: str | None):
        if path is None:
            return None
        file = Path(path) / "config.json"
        return (str(path), file.stat().st_mtime_ns, file.stat().st_size) if file.is_file() else str(path)

    distill = distilling(recipe)
    return (
        config_stamp(recipe.model.path) if config is None else config.to_json_string(),
        config_stamp(recipe.model.teacher) if distill else None,
        recipe.train.model_dump_json() if recipe.train.params == "lora" else recipe.train.params,
        recipe.train.gradient_checkpointing, recipe.precision, recipe.batch.micro, recipe.data.block_size,
        (recipe.loss.temperature, recipe.loss.distill_weight) if distill else None,
    )


def _read_config(path: str, key: str):
    from transformers import AutoConfig

    directory = model_directory(key, path)  # on disk, or refused at once: never a hub lookup
    try:
        return AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as err:
        raise GQAError(f"{key}: cannot read the config of {path}: {err}") from None


def build_model(config, recipe) -> torch.nn.Module:
    """The recipe's model on the meta device (exact shapes, no storage), set up as the loop sets it up
    (gqa.train.params.weights_dtype and prepare_model)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), _quiet():
        model = AutoModelForCausalLM.from_config(config, dtype=weights_dtype(recipe.train.params, config_dtype(config)))
        return prepare_model(model, recipe.train, recipe.seed)


def _measure(recipe: Recipe, config=None) -> StepProfile:
    """Build the model (model.path's, or `config`'s when given) and teacher on the meta device, count its
    parameters, then run one micro batch's forward, loss and backward on fake tensors while _Tracker counts
    what is allocated and freed."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM

    if config is None:
        config = _read_config(recipe.model.path, "model.path")
    dtype = DTYPES[recipe.precision]
    model = build_model(config, recipe).train()
    teacher = None
    if distilling(recipe):
        with torch.device("meta"), _quiet():
            teacher = AutoModelForCausalLM.from_config(_read_config(recipe.model.teacher, "model.teacher"), dtype=dtype)
        teacher.eval().requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    matrices = sum(p.numel() for p in trainable if p.ndim >= 2)
    layer_params, outer_params = _layer_sizes(model)
    counts = dict(
        total_params=sum(p.numel() for p in model.parameters()),
        weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in trainable),
        largest_trainable=max((p.numel() for p in trainable), default=0),
        largest_group=max(matrices, sum(p.numel() for p in trainable) - matrices),  # AdamW's two groups
        layer_params=layer_params,
        outer_params=outer_params,
        teacher_params=sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0,
        vocab_size=config.vocab_size,
    )
    with torch.random.fork_rng(devices=[]), FakeTensorMode(allow_non_fake_inputs=True) as mode, _quiet():
        _to_fake(model, mode)
        if teacher is not None:
            _to_fake(teacher, mode)
        micro, block = recipe.batch.micro, recipe.data.block_size
        tokens = torch.zeros(micro, block, dtype=torch.long)
        predicted = micro * (block - 1)
        tracker = _Tracker(model, teacher, vocab=config.vocab_size, rows=predicted)
        with tracker:
            loss = _micro_batch_loss(model, teacher, tokens, predicted, dtype if recipe.precision != "fp32" else None,
                                     recipe.loss if teacher is not None else None)
            loss.backward()
            del loss
        grads = {p.grad.untyped_storage()._cdata for p in model.parameters() if p.grad is not None}
        peaks = tracker.peaks(grads)
    return StepProfile(**counts, **peaks)


def _to_fake(module: torch.nn.Module, mode) -> None:
    """Replace a meta module's parameters and buffers by fake CPU tensors of the same shapes (ties kept)."""
    done: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for name, tensor in table.items():
                if tensor is None:
                    continue
                if id(tensor) not in done:
                    with mode:
                        fake = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
                    if isinstance(tensor, torch.nn.Parameter):
                        fake = torch.nn.Parameter(fake, requires_grad=tensor.requires_grad)
                    done[id(tensor)] = fake
                table[name] = done[id(tensor)]


def _micro_batch_loss(model, teacher, tokens, predicted: int, autocast_dtype, distill) -> torch.Tensor:
    # distill: the recipe's loss section when distilling, else None
    """One micro batch's loss the way the loop computes it (_Run._loss under accelerate's autocast, whose
    wrapper returns the model's outputs in fp32); the outputs are dropped before the backward pass."""
    from accelerate.utils import convert_to_fp32

    def forward(module, **inputs):
        with torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            out = module(**inputs)
        return convert_to_fp32(out) if autocast_dtype is not None else out

    if distill is None:
        return forward(model, input_ids=tokens, labels=tokens, num_items_in_batch=predicted).loss
    from gqa.train.losses import distillation_loss

    student_logits = forward(model, input_ids=tokens).logits
    with torch.no_grad(), torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        teacher_logits = teacher(input_ids=tokens).logits
    return distillation_loss(student_logits, teacher_logits, tokens, distill.temperature, distill.distill_weight,
                             num_items=predicted)


def _layer_sizes(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters of the largest decoder layer, parameters outside the layers), from the family layout."""
    prefix = trained_family_for(model.config.model_type).layer_prefix
    pattern = re.compile(r"(?:^|\.)" + re.escape(prefix).replace(r"\{i\}", r"(\d+)"))
    per_layer: dict[int, int] = {}
    outside = 0
    for name, param in model.named_parameters():
        match = pattern.search(name)
        if match:
            per_layer[int(match.group(1))] = per_layer.get(int(match.group(1)), 0) + param.numel()
        else:
            outside += param.numel()
    return max(per_layer.values(), default=0), outside


class _quiet:
    """Silence transformers' and peft's chatter while the fake model is built."""

    def __enter__(self):
        import warnings

        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        self._loggers = [(logging.getLogger(n), logging.getLogger(n).level) for n in ("transformers", "peft", "gqa.train.params")]
        for log, _ in self._loggers:
            log.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        for log, level in self._loggers:
            log.setLevel(level)
        self._warnings.__exit__(*exc)


def _bool_to_long_indices(indices):
    """Boolean masks in an index list as the long indices of an all-true mask: the packed-data case, and
    an upper bound otherwise (fake tensors cannot say which entries are true)."""
    out = []
    for index in indices:
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
            grids = torch.meshgrid(*[torch.arange(n) for n in index.shape], indexing="ij")
            out.extend(grid.reshape(-1) for grid in grids)
        else:
            out.append(index)
    return out


_aten = torch.ops.aten
_MASKED = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default, _aten._index_put_impl_.default}


class _Tracker(TorchDispatchMode):
    """Counts every storage an operation creates until it is freed: a timeline of allocations.

    Storages that existed before (parameters, buffers, inputs) and results that alias an input
    (views, in-place operations) are not new memory. A storage is freed when its last tensor goes
    (a weak reference's callback). `peaks` replays the timeline: the activations' peak with the
    gradients as passing spikes (they are counted whole in the gradients row), with the gradients
    as backward builds them (accumulation 1), and without autocast's copies of the weights.
    """

    def __init__(self, model, teacher, vocab: int, rows: int) -> None:
        super().__init__()
        existing = [*model.parameters(), *model.buffers()]
        if teacher is not None:
            existing += [*teacher.parameters(), *teacher.buffers()]
        self.existing = {t.untyped_storage()._cdata for t in existing}
        self.weights = set(self.existing)
        self.vocab, self.rows = vocab, rows
        self.live: dict[int, int] = {}  # storage key -> allocation serial
        self.events: list[tuple[int, int]] = []  # (serial, +bytes or -bytes)
        self.kinds: dict[int, str] = {}  # serial -> "cast", "logits" or "other"
        self.refs: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MASKED:  # boolean masks make data-dependent shapes, which fake tensors cannot have
            args = (args[0], _bool_to_long_indices(args[1]), *args[2:])
        elif func is _aten.nonzero.default:
            grids = torch.meshgrid(*[torch.arange(n) for n in args[0].shape], indexing="ij")
            return torch.stack([g.reshape(-1) for g in grids], dim=1)
        if func is _aten._grouped_mm.default and args[0].dtype != torch.bfloat16:
            # Mixture-of-experts layers multiply through grouped_mm, whose shape function admits bf16 alone
            # (CUDA's kernel), while the CPU kernel takes any float: the result's shape from bf16 stand-ins.
            a, b, *rest = args
            out = func(a.to(torch.bfloat16), b.to(torch.bfloat16), *rest, **kwargs).to(a.dtype)
        else:
            out = func(*args, **kwargs)
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        cast = func is _aten._to_copy.default and bool(inputs & self.weights)
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._allocated(tensor, inputs, cast)
        return out

    def _allocated(self, tensor: torch.Tensor, inputs: set[int], cast: bool) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live or key in self.existing or key in inputs:
            return
        serial = len(self.kinds)
        big = tensor.ndim >= 2 and tensor.shape[-1] == self.vocab and tensor.numel() >= self.rows * self.vocab
        self.kinds[serial] = "cast" if cast else ("logits" if big else "other")
        self.live[key] = serial
        size = storage.nbytes()
        self.events.append((serial, size))

        def freed(_ref, key=key, serial=serial, size=size):
            if self.live.get(key) == serial:
                del self.live[key]
                self.events.append((serial, -size))

        self.refs[serial] = weakref.ref(storage, freed)

    def peaks(self, grad_keys: set[int]) -> dict[str, int]:
        grads = {self.live[key] for key in grad_keys if key in self.live}
        with_grads = without = without_casts = 0
        peak_with = peak = peak_casts = logits_at_peak = logits = 0
        for serial, size in self.events:
            kind = self.kinds[serial]
            with_grads += size
            peak_with = max(peak_with, with_grads)
            if serial in grads:  # a gradient: counted while it is made, then held by the gradients row
                peak = max(peak, without + size)
                peak_casts = max(peak_casts, without_casts + size)
                continue
            without += size
            if kind == "logits":
                logits += size
            if without > peak:
                peak, logits_at_peak = without, logits
            if kind != "cast":
                without_casts += size
                peak_casts = max(peak_casts, without_casts)
        return {"peak": peak, "peak_with_grads": peak_with, "peak_without_casts": peak_casts, "logits": logits_at_peak}
