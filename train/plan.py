"""The numbers a recipe implies once the number of processes is known, printed before the first step."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from gqa.convert.errors import GQAError
from gqa.train.recipe import Recipe

if TYPE_CHECKING:
    from gqa.train.memory import MemoryPlan


@dataclass(frozen=True)
class TrainingPlan:
    processes: int
    micro_batch: int  # sequences per forward pass per process
    accumulation: int  # micro batches per optimizer step per process
    global_batch: int  # sequences per optimizer step, all processes
    block_size: int
    steps: int  # optimizer steps for the whole run
    warmup_steps: int
    pretrain_tokens: int | None
    streaming: bool = False  # data.streaming: read on the fly, each process its share of the stream
    data_seconds: float | None = None  # how long preparing the data took (on the main process), once known
    stream_files: int | None = None  # streamed: the files (file streams) of data.train, once known
    memory: MemoryPlan | None = None  # bytes per process (gqa.train.memory), once estimated

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.block_size

    @property
    def total_tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def pretrain_fraction(self) -> float | None:
        return self.total_tokens / self.pretrain_tokens if self.pretrain_tokens else None

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "memory"} | {
            "tokens_per_step": self.tokens_per_step,
            "total_tokens": self.total_tokens,
            "pretrain_fraction": self.pretrain_fraction,
            "memory_bytes": self.memory.estimate.total if self.memory is not None else None,
        }

    def describe(self) -> str:
        fraction = (
            f"{self.pretrain_fraction:.3g} of the source's {self.pretrain_tokens:,} pre-training tokens"
            if self.pretrain_fraction is not None
            else "unknown (set budget.pretrain_tokens)"
        )
        rows = [
            ("processes", f"{self.processes}"),
            ("micro batch", f"{self.micro_batch} sequences x {self.block_size} tokens per process"),
            ("accumulation", f"{self.accumulation} micro batches per step per process"),
            ("global batch", f"{self.global_batch} sequences = {self.tokens_per_step:,} tokens per optimizer step"),
            ("steps", f"{self.steps:,} (warmup {self.warmup_steps:,})"),
            ("total tokens", f"{self.total_tokens:,}"),
            ("pre-training", fraction),
            ("data", self.data_mode()),
            ("shares", self.data_shares()),
        ]
        if self.data_seconds is not None:
            rows.append(("data ready", f"in {self.data_seconds:.1f} s"))
        if self.memory is not None:
            rows += self.memory.rows()
        return "\n".join(f"  {name:<13} {value}" for name, value in rows)

    def data_mode(self) -> str:
        if self.streaming:
            return "streamed: read, tokenised and packed on the fly (data.streaming)"
        return "prepared: tokenised and packed before step 1, once per machine, and cached"

    def data_shares(self) -> str:
        n, files = self.processes, self.stream_files
        if self.streaming:
            if files is None:
                return "each process reads its share of the stream's files (counted when the data is opened)"
            if n == 1:
                return f"one process reads all {files} file(s) of the stream, every block"
            blocks = f"blocks i, i+{n}, i+{2 * n}, ... of the stream"
            if files % n == 0:
                return f"process i of {n} reads files i, i+{n}, ... of the stream's {files} ({files // n} each): {blocks}"
            apart = math.gcd(files, n)  # the files a process needs are i mod apart, + apart, ... (StreamShare)
            which = f"all {files} file(s)" if apart == 1 else f"files i mod {apart}, +{apart}, ... ({files // apart} of {files})"
            return (f"process i of {n} reads {which} of the stream and keeps 1 block in {n // apart} of what it reads "
                    f"({blocks}), as {files} file(s) do not split evenly among {n} processes; split data.train into a "
                    f"multiple of {n} files for each process to read only its own")
        if n == 1:
            return "one process reads every block, in the seeded order"
        return f"process i of {n} reads micro batches i, i+{n}, ... of the seeded order (accelerate's sharded sampler)"


def plan_training(recipe: Recipe, processes: int) -> TrainingPlan:
    """Derive accumulation and steps; errors name the recipe key to change."""
    block = recipe.data.block_size
    batch = recipe.batch
    if batch.global_tokens is not None:
        if batch.global_tokens % block:
            raise GQAError(
                f"batch.global_tokens={batch.global_tokens} is not a multiple of data.block_size={block}; "
                f"use for example {max(1, batch.global_tokens // block) * block}"
            )
        global_batch = batch.global_tokens // block
    else:
        global_batch = batch.global_sequences
    per_step = batch.micro * processes
    if global_batch % per_step:
        # Name the key the recipe sets, in its own unit.
        given = (f"batch.global_tokens a multiple of {per_step * block}" if batch.global_tokens is not None
                 else f"batch.global_sequences a multiple of {per_step}")
        raise GQAError(
            f"the global batch ({global_batch} sequences) does not split into micro batches of batch.micro={batch.micro} "
            f"on {processes} process(es); make {given}, or change batch.micro"
        )
    tokens_per_step = global_batch * block
    budget = recipe.budget
    if budget.steps is not None:
        steps = budget.steps
    else:
        tokens = budget.tokens if budget.tokens is not None else budget.alpha * budget.pretrain_tokens
        steps = max(1, math.ceil(tokens / tokens_per_step))
    warmup = recipe.schedule.warmup_steps
    if warmup is None:
        warmup = round(recipe.schedule.warmup_fraction * steps)
    if warmup > steps:
        raise GQAError(f"schedule.warmup_steps={warmup} is longer than the run ({steps} steps)")
    if budget.stop_at_step is not None and budget.stop_at_step > steps:
        raise GQAError(f"budget.stop_at_step={budget.stop_at_step} is past the end of the run ({steps} steps)")
    return TrainingPlan(
        processes=processes,
        micro_batch=batch.micro,
        accumulation=global_batch // per_step,
        global_batch=global_batch,
        block_size=block,
        steps=steps,
        warmup_steps=warmup,
        pretrain_tokens=budget.pretrain_tokens,
        streaming=recipe.data.streaming,
    )
