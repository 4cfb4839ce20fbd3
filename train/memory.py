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
from dataclasses import dataclass, replace

import torch

from gqa.convert.errors import GQAError
from gqa.convert.sizes import human_bytes
from gqa.train.activations import StepProfile, measured_step
from gqa.train.launch import LAUNCH_NAMES, Launch, launch_of
from gqa.train.plan import plan_training
from gqa.train.recipe import Recipe

logger = logging.getLogger(__name__)

# CUDA holds more than the tensors: its context, NCCL's buffers and the caching allocator's slack.
RESERVE_BYTES = 2**30
RESERVE_FRACTION = 0.05


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
        other = f" ({gc_off}: {human_bytes(self.activations_other)})" if self.activations_other is not None else ""
        autocast = "fp32"
        if self.precision != "fp32":
            autocast = self.precision if kind.startswith("zero") else f"{self.precision} autocast"
        unsharded = ""
        if self.unsharded_gradients:
            unsharded = (f"; and {human_bytes(self.unsharded_gradients)} unsharded, held across the step's "
                         f"{self.accumulation} micro batches (FSDP2 reduce-scatters them on the last)")
        rows = [
            ("memory", f"per process, {self.launch.describe()} ({self.launch.source}), on {self.device.upper()}"),
            ("  weights", f"{human_bytes(self.weights)}: {self.total_params:,} parameters, {weights_note}"
                          f"{share('fsdp', 'zero3')}"),
            ("  gradients", f"{human_bytes(self.gradients)}: {self.trainable_params:,} trainable parameters "
                            f"(train.params={self.params}), fp32{share('fsdp', 'zero2', 'zero3')}"
                            f"{unsharded}"),
        ]
        if self.buckets:
            rows.append(("  buckets", f"{human_bytes(self.buckets)}: DDP's fp32 gradient buckets for the all-reduce"))
        rows.append(("  optimizer", f"{human_bytes(self.optimizer)}: AdamW, 2 fp32 moments per trainable parameter"
                                    f"{share('fsdp', 'zero1', 'zero2', 'zero3')}; {human_bytes(self.optimizer_scratch)} "
                                    "more while it steps"))
        rows.append(("  activations", f"{human_bytes(self.activations)}: {self.micro_batch} x {self.block_size} tokens, "
                                      f"{autocast}, {gc_on} gradient checkpointing{other}; "
                                      f"logits and loss {human_bytes(self.logits)} of it (vocabulary {self.vocab_size:,})"))
        if self.gathered:
            rows.append(("  gathered", f"{human_bytes(self.gathered)}: the embeddings and two layers' parameters and "
                                       "one layer's gradients gathered in full while they compute"))
        if self.teacher:
            rows.append(("  teacher", f"{human_bytes(self.teacher)}: {self.teacher_params:,} parameters in "
                                      f"{self.precision}, a full copy on every process"))
        if self.reserve:
            rows.append(("  reserve", f"{human_bytes(self.reserve)}: CUDA context, communication buffers, allocator "
                                      f"slack ({human_bytes(RESERVE_BYTES)} + {RESERVE_FRACTION:.0%})"))
        note = ""
        if self.accumulation == 1 and self.peak < self.parts_sum:
            note = " (less than the sum: with accumulation 1, gradients build up as the activations are freed)"
        if self.launch.offload:
            note += "; the config offloads to the CPU, which the estimate does not model (an upper bound)"
        rows.append(("  total", f"{human_bytes(self.total)} at the peak of a step{note}"))
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
    profile = measured_step(recipe, config)
    other = (measured_step(_with(recipe, "train", gradient_checkpointing=not recipe.train.gradient_checkpointing), config)
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

    def activations_of(measured: StepProfile | None) -> int | None:
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
        gpu = f"{human_bytes(self.capacity)} ({self.capacity_source})"
        if self.fits:
            rows.append(("  fits", f"yes: {human_bytes(self.estimate.total)} of {gpu}"))
            return rows
        rows.append(("  fits", f"no: {human_bytes(self.estimate.total)} per process, more than {gpu}"))
        rows.append(("  change", self.advice()))
        return rows

    def advice(self) -> str:
        if self.suggestion is not None:
            s = self.suggestion
            return f"{s.change}: {human_bytes(s.estimate.total)} per process ({s.cost})"
        return (f"none of {', '.join(self.tried)} fits, alone or with gradient checkpointing; "
                "a GPU with more memory, or a smaller block size (data.block_size)")

    def refusal(self) -> str:
        """The error that stops a run before step 1 when the estimate does not fit."""
        return (
            f"the memory plan needs {human_bytes(self.estimate.total)} per process at the peak of a step, more than "
            f"{human_bytes(self.capacity)} ({self.capacity_source}): this run would run out of memory. "
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
                       human_bytes(memory.estimate.total), human_bytes(memory.capacity))
    return memory
