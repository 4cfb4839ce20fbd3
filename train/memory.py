"""The memory plan: the bytes one process holds while training a recipe, worked out before anything loads.

    weights      every parameter as the loop holds it (fp32 master weights; sharded under FSDP2 and ZeRO-3)
    gradients    one fp32 gradient per trainable parameter (DDP adds its fp32 all-reduce buckets)
    optimizer    AdamW's two fp32 moments per trainable parameter, and on CUDA the scratch of its
                 multi-tensor step (one fp32 value per trainable parameter)
    activations  what one micro batch of `micro x block_size` tokens keeps alive at its peak: saved
                 tensors, autocast copies of the weights, the logits and the loss (which dominate small
                 models with big vocabularies); with or without gradient checkpointing
    gathered     FSDP2 / ZeRO-3: the layers' parameters gathered in full while they compute
    teacher      distillation: the frozen teacher in the recipe's precision, on every process

The model is built from its config.json on fake tensors (shapes and dtypes, no storage: nothing is
read or allocated), so the parameter counts are exact. Activations are measured, not modelled: one
micro batch runs forward, loss and backward on those fake tensors under the run's autocast,
exactly as the loop calls them, while every tensor the step allocates is counted until it is
freed; the activations are the peak of that count. Weights, gradients and optimizer state are
arithmetic on the parameter counts; sharding divides them by the number of processes.

Gradients and activations peak together when gradients are held across micro batches
(accumulation > 1); with accumulation 1 they build up while the activations are freed, and the
measured step says how far they overlap.
"""

from __future__ import annotations

import logging
import math
import os
import re
import weakref
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gqa.convert.errors import GQAError
from gqa.convert.families import LAYER_PREFIX
from gqa.convert.modeldir import DTYPES, config_dtype
from gqa.train.params import apply_lora, trainable_names, weights_dtype
from gqa.train.plan import plan_training
from gqa.train.recipe import Recipe, model_directory

logger = logging.getLogger(__name__)

LAUNCHES = ("one", "ddp", "fsdp", "zero1", "zero2", "zero3")
SHARDED = ("fsdp", "zero3")  # weights, gradients and optimizer state divided among the processes
LAUNCH_NAMES = {
    "one": "one process",
    "ddp": "DDP",
    "fsdp": "FSDP2",
    "zero1": "DeepSpeed ZeRO-1",
    "zero2": "DeepSpeed ZeRO-2",
    "zero3": "DeepSpeed ZeRO-3",
}

# CUDA holds more than the tensors: its context, NCCL's buffers and the caching allocator's slack.
RESERVE_BYTES = 1_000_000_000
RESERVE_FRACTION = 0.05


# --- the launch ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """How the run is spread over processes: what decides which bytes each process holds."""

    kind: str  # one of LAUNCHES
    processes: int
    source: str = "options"  # where it was read from, for the table
    offload: bool = False  # the config offloads parameters or optimizer state to the CPU (not modelled)

    def __post_init__(self) -> None:
        if self.kind not in LAUNCHES:
            raise GQAError(f"launch {self.kind!r} is not one of {', '.join(LAUNCHES)}")
        if self.processes < 1:
            raise GQAError(f"the number of processes must be at least 1 (got {self.processes})")
        if self.kind == "one" and self.processes != 1:
            raise GQAError(f"launch 'one' is a single process, not {self.processes}; use ddp, fsdp or zero3")

    @property
    def sharded(self) -> bool:
        return self.kind in SHARDED

    def describe(self) -> str:
        if self.kind == "one":
            return "one process"
        return f"{LAUNCH_NAMES[self.kind]} on {self.processes} processes"


def launch_of(state) -> Launch:
    """The launch of a running accelerate process (an AcceleratorState or Accelerator)."""
    from accelerate.utils import DistributedType

    state = getattr(state, "state", state)
    processes = state.num_processes
    kind = "ddp" if processes > 1 else "one"
    offload = False
    if state.distributed_type == DistributedType.FSDP:
        kind = "fsdp"
        offload = bool(getattr(getattr(state.fsdp_plugin, "cpu_offload", None), "offload_params", False))
    elif state.distributed_type == DistributedType.DEEPSPEED:
        plugin = state.deepspeed_plugin
        kind = _zero_kind(getattr(plugin, "zero_stage", 3), processes)
        zero = (getattr(plugin, "deepspeed_config", None) or {}).get("zero_optimization", {})
        offload = any(str((zero.get(key) or {}).get("device", "none")).lower() != "none"
                      for key in ("offload_optimizer", "offload_param"))
    return Launch(kind, processes, "accelerate", offload)


def launch_from_environment(env: dict[str, str] | None = None) -> Launch:
    """The launch `accelerate launch` (or torchrun) gave this process, read from the environment it sets."""
    env = os.environ if env is None else env
    processes = int(env.get("WORLD_SIZE", "1"))
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        stage = int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3"))
        return Launch(_zero_kind(stage, processes), processes, "accelerate launch")
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return Launch("fsdp", processes, "accelerate launch")
    source = "launcher" if "WORLD_SIZE" in env else "this invocation"
    return Launch("ddp" if processes > 1 else "one", processes, source)


def launch_from_config(path_or_name: str) -> Launch:
    """The launch an accelerate config file describes (a path, or a shipped name such as accelerate/fsdp)."""
    import yaml

    from gqa.train.recipe import shipped_recipes

    path = Path(path_or_name)
    shipped = shipped_recipes()
    name = path_or_name.removesuffix(".yaml")
    if not path.is_file() and name in shipped and name.startswith("accelerate/"):
        text, source = shipped[name].read_text(), name
    elif path.is_file():
        text, source = path.read_text(), str(path)
    else:
        raise GQAError(
            f"--launch {path_or_name}: not one of {', '.join(LAUNCHES)}, nor an accelerate config file "
            "(a path, or a shipped one such as accelerate/fsdp; `gqa recipes` lists them)"
        )
    config = yaml.safe_load(text) or {}
    if not isinstance(config, dict) or "distributed_type" not in config:
        raise GQAError(f"--launch {path_or_name}: not an accelerate config (it has no distributed_type)")
    processes = int(config.get("num_processes", 1) or 1)
    distributed = str(config["distributed_type"]).upper()
    offload = False
    if distributed == "FSDP":
        kind = "fsdp"
        offload = bool((config.get("fsdp_config") or {}).get("fsdp_offload_params", False))
    elif distributed == "DEEPSPEED":
        deepspeed = config.get("deepspeed_config") or {}
        kind = _zero_kind(int(deepspeed.get("zero_stage", 3)), processes)
        offload = any(str(deepspeed.get(key, "none")).lower() != "none"
                      for key in ("offload_optimizer_device", "offload_param_device"))
    elif distributed == "NO":
        kind, processes = "one", 1
    else:
        kind = "ddp" if processes > 1 else "one"
    return Launch(kind, processes, source, offload)


def resolve_launch(launch: str | None, processes: int | None, env: dict[str, str] | None = None) -> Launch:
    """The launch `gqa train --plan` describes: `--launch` (a kind or an accelerate config) and
    `--processes`, else what the launcher of this process set (one process when there is none)."""
    if launch is None:
        found = launch_from_environment(env)
        if processes is None or processes == found.processes:
            return found
        return Launch(_same_kind(found.kind, processes), processes, f"{found.source}, --processes {processes}")
    if launch in LAUNCHES:
        if processes is None:
            if launch != "one":
                raise GQAError(f"--launch {launch} needs --processes N (how many processes, all machines together)")
            processes = 1
        return Launch(launch, processes, "options")
    found = launch_from_config(launch)
    if processes is not None and processes != found.processes:
        return Launch(_same_kind(found.kind, processes), processes, f"{found.source}, --processes {processes}", found.offload)
    return found


def _same_kind(kind: str, processes: int) -> str:
    """The kind of launch on another number of processes: one process becomes DDP."""
    if kind in ("one", "ddp"):
        return "ddp" if processes > 1 else "one"
    return kind


def _zero_kind(stage: int, processes: int) -> str:
    if stage in (1, 2, 3):
        return f"zero{stage}"
    return "ddp" if processes > 1 else "one"


# --- sizes ------------------------------------------------------------------------------------------


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?(b)?\s*$", re.IGNORECASE)
_PREFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """Bytes of a size such as 80GB, 80 GB, 80G, 79.6GiB, 24000MB, 1024B; a bare number is in GB (10^9 bytes)."""
    match = _SIZE.match(str(text))
    if match is None:
        raise GQAError(f"--gpu-memory {text!r} is not a size; write for example 80GB, 24GB or 79.6GiB")
    number, prefix, unit = match.groups()
    factor = _PREFIXES[prefix.lower()] if prefix else (1 if unit else 10**9)
    size = int(float(number) * factor)
    if size <= 0:
        raise GQAError(f"--gpu-memory {text!r} must be more than zero")
    return size


def format_bytes(n: float) -> str:
    if n >= 10**9:
        return f"{n / 10**9:.2f} GB"
    if n >= 10**6:
        return f"{n / 10**6:.1f} MB"
    return f"{n / 10**3:.1f} KB"


def device_memory(device: torch.device | str | None = None) -> int | None:
    """The total memory of this process's CUDA device, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    if device is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


# --- the measured step -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Profile:
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


_PROFILES: dict[tuple, _Profile] = {}  # measured steps of this process, by _profile_key


def _profile(recipe: Recipe, config=None) -> _Profile:
    """The measured step of a recipe (of the model `config` describes, when given, instead of model.path's);
    remembered, since the suggestions measure the same step again."""
    key = _profile_key(recipe, config)
    if key not in _PROFILES:
        if len(_PROFILES) >= 64:
            _PROFILES.clear()
        _PROFILES[key] = _measure(recipe, config)
    return _PROFILES[key]


def _distilling(recipe: Recipe) -> bool:
    return recipe.loss.kind == "distill" and recipe.loss.distill_weight > 0


def _profile_key(recipe: Recipe, config=None) -> tuple:
    """Everything the measured step depends on, the config files (or the config given) included."""

    def config_stamp(path: str | None):
        if path is None:
            return None
        file = Path(path) / "config.json"
        return (str(path), file.stat().st_mtime_ns, file.stat().st_size) if file.is_file() else str(path)

    distill = _distilling(recipe)
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


def set_trainable(model: torch.nn.Module, recipe: Recipe) -> torch.nn.Module:
    """The model with the recipe's trained parameter set (train.params) requiring gradients, set up by the
    loop's own code: all, attention, kv, or lora (gqa.train.params.apply_lora)."""
    which = recipe.train.params
    if which == "lora":
        return apply_lora(model, recipe.train.lora)
    chosen = trainable_names(model, which)
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
    return model


def build_model(config, recipe) -> torch.nn.Module:
    """The recipe's model on the meta device (exact shapes, no storage), set up as the loop sets it up:
    the weights' dtype (gqa.train.params.weights_dtype), gradient checkpointing and the trained parameter set."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), _quiet():
        model = AutoModelForCausalLM.from_config(config, dtype=weights_dtype(recipe.train.params, config_dtype(config)))
        model.config.use_cache = False
        if recipe.train.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.x on
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return set_trainable(model, recipe)


def _measure(recipe: Recipe, config=None) -> _Profile:
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
    if _distilling(recipe):
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
    return _Profile(**counts, **peaks)


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
    pattern = re.compile(r"(?:^|\.)" + re.escape(LAYER_PREFIX).replace(r"\{i\}", r"(\d+)"))
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


# --- the estimate ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one process holds while training, by kind; `total` is the peak, `reserve` included on CUDA."""

    launch: Launch
    device: str  # "cuda" or "cpu"
    precision: str
    params: str  # train.params
    micro_batch: int
    block_size: int
    accumulation: int
    gradient_checkpointing: bool
    total_params: int
    trainable_params: int
    teacher_params: int
    vocab_size: int
    weights: int
    gradients: int
    unsharded_gradients: int  # FSDP2 with accumulation: full gradients held until the step's last micro batch
    buckets: int  # DDP's gradient buckets
    optimizer: int
    optimizer_scratch: int
    activations: int  # with the recipe's gradient checkpointing setting
    activations_other: int | None  # with the other setting, when measured
    logits: int  # of the activations: logits and loss
    gathered: int
    teacher: int
    peak: int  # all tensors at the busiest moment of a step
    reserve: int  # CUDA context, communication buffers, allocator slack

    @property
    def total(self) -> int:
        return self.peak + self.reserve

    @property
    def parts_sum(self) -> int:
        return (self.weights + self.gradients + self.unsharded_gradients + self.buckets + self.optimizer
                + self.activations + self.gathered + self.teacher)

    def rows(self) -> list[tuple[str, str]]:
        kind, p = self.launch.kind, self.launch.processes

        def share(*kinds: str) -> str:
            return f", 1/{p} of them on each process ({LAUNCH_NAMES[kind]})" if kind in kinds and p > 1 else ""

        weights_note = "fp32"
        if self.params == "lora" and self.weights < 4 * self.total_params:
            weights_note = "the frozen ones in the checkpoint's 16-bit dtype, the trainable ones fp32"
        if kind.startswith("zero") and self.precision != "fp32":
            weights_note = f"{self.precision}, and fp32 master weights of the trainable ones (sharded)"
        gc_on = "with" if self.gradient_checkpointing else "without"
        gc_off = "without" if self.gradient_checkpointing else "with"
        other = f" ({gc_off}: {format_bytes(self.activations_other)})" if self.activations_other is not None else ""
        autocast = "fp32"
        if self.precision != "fp32":
            autocast = self.precision if kind.startswith("zero") else f"{self.precision} autocast"
        unsharded = ""
        if self.unsharded_gradients:
            unsharded = (f"; and {format_bytes(self.unsharded_gradients)} unsharded, held across the step's "
                         f"{self.accumulation} micro batches (FSDP2 reduce-scatters them on the last)")
        rows = [
            ("memory", f"per process, {self.launch.describe()} ({self.launch.source}), on {self.device.upper()}"),
            ("  weights", f"{format_bytes(self.weights)}: {self.total_params:,} parameters, {weights_note}"
                          f"{share('fsdp', 'zero3')}"),
            ("  gradients", f"{format_bytes(self.gradients)}: {self.trainable_params:,} trainable parameters "
                            f"(train.params={self.params}), fp32{share('fsdp', 'zero2', 'zero3')}"
                            f"{unsharded}"),
        ]
        if self.buckets:
            rows.append(("  buckets", f"{format_bytes(self.buckets)}: DDP's fp32 gradient buckets for the all-reduce"))
        rows.append(("  optimizer", f"{format_bytes(self.optimizer)}: AdamW, 2 fp32 moments per trainable parameter"
                                    f"{share('fsdp', 'zero1', 'zero2', 'zero3')}; {format_bytes(self.optimizer_scratch)} "
                                    "more while it steps"))
        rows.append(("  activations", f"{format_bytes(self.activations)}: {self.micro_batch} x {self.block_size} tokens, "
                                      f"{autocast}, {gc_on} gradient checkpointing{other}; "
                                      f"logits and loss {format_bytes(self.logits)} of it (vocabulary {self.vocab_size:,})"))
        if self.gathered:
            rows.append(("  gathered", f"{format_bytes(self.gathered)}: the embeddings and two layers' parameters and "
                                       "one layer's gradients gathered in full while they compute"))
        if self.teacher:
            rows.append(("  teacher", f"{format_bytes(self.teacher)}: {self.teacher_params:,} parameters in "
                                      f"{self.precision}, a full copy on every process"))
        if self.reserve:
            rows.append(("  reserve", f"{format_bytes(self.reserve)}: CUDA context, communication buffers, allocator "
                                      f"slack ({format_bytes(RESERVE_BYTES)} + {RESERVE_FRACTION:.0%})"))
        note = ""
        if self.accumulation == 1 and self.peak < self.parts_sum:
            note = " (less than the sum: with accumulation 1, gradients build up as the activations are freed)"
        if self.launch.offload:
            note += "; the config offloads to the CPU, which the estimate does not model (an upper bound)"
        rows.append(("  total", f"{format_bytes(self.total)} at the peak of a step{note}"))
        return rows


def estimate_memory(
    recipe: Recipe, launch: Launch, accumulation: int | None = None, device: str = "cuda", compare: bool = True,
    config=None,
) -> MemoryEstimate:
    """The bytes each process holds while training `recipe` under `launch` (see the module docstring).

    accumulation: micro batches per optimizer step (the plan's); None derives it from the recipe.
    device: "cuda" adds the CUDA reserve and AdamW's multi-tensor scratch; "cpu" estimates host memory.
    compare: also measure the activations with gradient checkpointing switched the other way.
    config: the model's config (a transformers config), instead of model.path's config.json: `gqa train --plan
    --source` plans on the config a conversion would write, before converting.
    """
    if accumulation is None:
        accumulation = plan_training(recipe, launch.processes).accumulation
    profile = _profile(recipe, config)
    other = (_profile(_with(recipe, "train", gradient_checkpointing=not recipe.train.gradient_checkpointing), config)
             if compare else None)
    p, kind = launch.processes, launch.kind
    mixed = recipe.precision != "fp32"
    compute_bytes = 2 if mixed else 4
    total, trainable = profile.total_params, profile.trainable_params

    def shard(n: float, kinds: tuple[str, ...]) -> int:
        return math.ceil(n / p) if kind in kinds else int(n)

    deepspeed = kind.startswith("zero")
    if deepspeed and mixed:  # DeepSpeed holds the module in 16 bits, and fp32 master weights in its optimizer
        weights = shard(compute_bytes * total, ("zero3",)) + shard(4 * trainable, ("zero1", "zero2", "zero3"))
    else:
        weights = shard(profile.weight_bytes, ("fsdp", "zero3"))
    gradients = shard(4 * trainable, ("fsdp", "zero2", "zero3"))
    # FSDP2 skips the reduce-scatter on all but a step's last micro batch (accelerate's no_sync) and
    # accumulates the full, unsharded gradients in the reduce dtype meanwhile.
    unsharded = compute_bytes * trainable if kind == "fsdp" and p > 1 and accumulation > 1 else 0
    buckets = 4 * trainable if kind == "ddp" and p > 1 else 0
    optimizer = shard(8 * trainable, ("fsdp", "zero1", "zero2", "zero3"))
    scratch = 4 * (profile.largest_group if device == "cuda" else profile.largest_trainable)
    scratch = shard(scratch, ("fsdp", "zero1", "zero2", "zero3"))
    gathered = 0
    if launch.sharded:
        # The unsharded embeddings and head, one layer computing and the next prefetched, and one layer's
        # gradients before they are reduce-scattered, all in the compute dtype.
        gathered = compute_bytes * (profile.outer_params + 3 * profile.layer_params)
    # FSDP2 (its mixed-precision policy) and DeepSpeed compute with 16-bit weights: no autocast copies of them.
    casts = not (mixed and (launch.sharded or deepspeed))

    def activations_of(measured: _Profile | None) -> int | None:
        if measured is None:
            return None
        return measured.peak if casts else measured.peak_without_casts

    activations, activations_other = activations_of(profile), activations_of(other)
    teacher = profile.teacher_params * compute_bytes
    if accumulation == 1 and kind in ("one", "ddp"):
        busiest = profile.peak_with_grads  # the gradients as backward builds them, measured with the activations
    else:
        busiest = unsharded + gradients + activations  # earlier micro batches' gradients are held
    peak = weights + buckets + optimizer + gathered + teacher + max(busiest, gradients + scratch)
    reserve = int(RESERVE_BYTES + RESERVE_FRACTION * peak) if device == "cuda" else 0
    return MemoryEstimate(
        launch=launch, device=device, precision=recipe.precision, params=recipe.train.params,
        micro_batch=recipe.batch.micro, block_size=recipe.data.block_size, accumulation=accumulation,
        gradient_checkpointing=recipe.train.gradient_checkpointing, total_params=total, trainable_params=trainable,
        teacher_params=profile.teacher_params, vocab_size=profile.vocab_size, weights=weights, gradients=gradients,
        unsharded_gradients=unsharded, buckets=buckets, optimizer=optimizer, optimizer_scratch=scratch, activations=activations,
        activations_other=activations_other, logits=profile.logits, gathered=gathered, teacher=teacher, peak=peak,
        reserve=reserve,
    )


# --- what fits ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Suggestion:
    """A change to the recipe or launch that makes the estimate fit."""

    change: str  # what to change, the way the user writes it
    cost: str  # what the change costs
    estimate: MemoryEstimate


@dataclass(frozen=True)
class MemoryPlan:
    """The estimate, the GPU it is held against, and the cheapest change that fits when it does not."""

    estimate: MemoryEstimate
    capacity: int | None = None  # bytes of GPU memory, when known
    capacity_source: str = ""  # where the capacity came from (--gpu-memory, the device's name)
    suggestion: Suggestion | None = None
    tried: tuple[str, ...] = ()  # the changes considered, when none fits

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.estimate.total <= self.capacity

    def rows(self) -> list[tuple[str, str]]:
        rows = self.estimate.rows()
        if self.capacity is None:
            if self.estimate.device == "cuda":
                rows.append(("  fits", "unknown: pass --gpu-memory SIZE (e.g. 80GB) to check a GPU"))
            return rows
        gpu = f"{format_bytes(self.capacity)} ({self.capacity_source})"
        if self.fits:
            rows.append(("  fits", f"yes: {format_bytes(self.estimate.total)} of {gpu}"))
            return rows
        rows.append(("  fits", f"no: {format_bytes(self.estimate.total)} per process, more than {gpu}"))
        rows.append(("  change", self.advice()))
        return rows

    def advice(self) -> str:
        if self.suggestion is not None:
            s = self.suggestion
            return f"{s.change}: {format_bytes(s.estimate.total)} per process ({s.cost})"
        return (f"none of {', '.join(self.tried)} fits, alone or with gradient checkpointing; "
                "a GPU with more memory, or a smaller block size (data.block_size)")

    def refusal(self) -> str:
        """The error that stops a run before step 1 when the estimate does not fit."""
        return (
            f"the memory plan needs {format_bytes(self.estimate.total)} per process at the peak of a step, more than "
            f"{format_bytes(self.capacity)} ({self.capacity_source}): this run would run out of memory. "
            f"Change: {self.advice()}. `gqa train RECIPE --plan` shows the whole estimate; --skip-memory-check "
            "trains anyway"
        )


def plan_memory(
    recipe: Recipe, launch: Launch, accumulation: int | None = None, device: str = "cuda",
    capacity: int | None = None, capacity_source: str = "", compare: bool = True, config=None,
) -> MemoryPlan:
    """The estimate of `recipe` under `launch`, held against `capacity` bytes of GPU memory; when it does
    not fit, the first change in the order of `_changes` that does, each estimated the same way. config: as
    estimate_memory takes it."""
    estimate = estimate_memory(recipe, launch, accumulation, device, compare, config)
    plan = MemoryPlan(estimate, capacity, capacity_source)
    if plan.fits is not False:
        return plan
    tried: list[str] = []
    for candidates in (_changes(recipe, launch), _with_checkpointing(recipe, launch)):
        for kind, change, cost, new_recipe, new_launch in candidates:
            tried.append(kind)
            try:
                accumulation = plan_training(new_recipe, new_launch.processes).accumulation
            except GQAError:  # the global batch does not split that way
                continue
            candidate = estimate_memory(new_recipe, new_launch, accumulation, device, compare=False, config=config)
            if candidate.total <= capacity:
                return replace(plan, suggestion=Suggestion(change, cost, candidate))
    return replace(plan, tried=tuple(dict.fromkeys(tried)))


def _changes(recipe: Recipe, launch: Launch):
    """(kind, change, cost, recipe, launch) to try, cheapest first: the changes that train exactly the same
    steps (gradient checkpointing, FSDP2 on the processes there are, smaller micro batches with more
    accumulation), then more processes, then training fewer parameters (attention blocks, LoRA)."""
    p = launch.processes
    if not recipe.train.gradient_checkpointing:
        yield ("gradient checkpointing", "train.gradient_checkpointing=true", "the same steps, about 1/3 more compute",
               _with(recipe, "train", gradient_checkpointing=True), launch)
    if launch.kind in ("ddp", "zero1", "zero2") and p > 1:
        yield ("FSDP2", f"FSDP2 on the same {p} processes (accelerate launch with `gqa recipes cp accelerate/fsdp`)",
               "the same steps, more communication", recipe, Launch("fsdp", p, "suggested"))
    for micro in range(recipe.batch.micro - 1, 0, -1):
        yield ("a smaller batch.micro", f"batch.micro={micro}", "the same steps, more accumulation, less throughput",
               _with(recipe, "batch", micro=micro), launch)
    kind = launch.kind if launch.sharded else "fsdp"
    more = 2 * p if p > 1 else 2
    while more <= 64:
        yield (f"{LAUNCH_NAMES[kind]} on up to 64 processes", f"{LAUNCH_NAMES[kind]} on {more} processes",
               "the same steps on more GPUs", recipe, Launch(kind, more, "suggested"))
        more *= 2
    if recipe.train.params == "all":
        yield ("train.params=attention", "train.params=attention", "trains the attention blocks only",
               _with(recipe, "train", params="attention"), launch)
    if recipe.train.params != "lora":
        yield ("train.params=lora", "train.params=lora", "trains low-rank adapters and the key/value projections only",
               _with(recipe, "train", params="lora"), launch)


def _with_checkpointing(recipe: Recipe, launch: Launch):
    """Each later change together with gradient checkpointing (when the recipe has it off)."""
    if recipe.train.gradient_checkpointing:
        return
    checkpointed = _with(recipe, "train", gradient_checkpointing=True)
    for kind, change, cost, new_recipe, new_launch in _changes(checkpointed, launch):
        yield (kind, f"train.gradient_checkpointing=true and {change}", f"{cost}; about 1/3 more compute",
               new_recipe, new_launch)


def _with(recipe: Recipe, section: str, **values) -> Recipe:
    return recipe.model_copy(update={section: getattr(recipe, section).model_copy(update=values)})


def check_run(recipe: Recipe, accumulation: int, accelerator, check: bool = True) -> MemoryPlan | None:
    """The memory plan of a starting run, printed with the training plan. On CUDA, when the estimate exceeds
    the device's memory: a GQAError that names the change that fits, or (check False) a warning. An
    estimate that cannot be made never stops the run: it is left out, with a warning."""
    device = accelerator.device
    cuda = device.type == "cuda"
    if not cuda and not getattr(accelerator, "is_main_process", True):
        return None  # without CUDA nothing is checked, and only the main process prints the plan
    try:
        capacity = device_memory(device) if cuda else None
        source = f"{device}, {torch.cuda.get_device_name(device)}" if cuda else ""
        memory = plan_memory(recipe, launch_of(accelerator), accumulation, "cuda" if cuda else "cpu", capacity, source,
                             compare=False)
    except Exception as err:  # noqa: BLE001 - an estimate that cannot be made must not stop the run
        logger.warning("memory plan: no estimate (%s: %s); training without it", type(err).__name__, err)
        return None
    if memory.fits is False:
        if check:
            raise GQAError(memory.refusal())
        logger.warning("memory plan: %s per process, more than %s; training anyway (--skip-memory-check)",
                       format_bytes(memory.estimate.total), format_bytes(memory.capacity))
    return memory
