"""How a training run is launched, as far as memory goes: one process, DDP, FSDP2 or DeepSpeed ZeRO, over how many
processes, read from the running launcher (accelerate's state, torchrun's environment), an accelerate config or
`gqa train --plan --launch`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gqa.convert.errors import GQAError

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
