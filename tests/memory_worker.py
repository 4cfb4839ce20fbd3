"""Measure the peak memory of real training steps on the CPU, in a fresh process (tests/test_memory.py).

    python tests/memory_worker.py '{"config": DIR, "params": "all", "micro": 2, "block": 256, ...}'

Builds the model from DIR/config.json, sets it up as the loop does (prepare_model), and trains
`steps` optimizer steps of `accumulation` micro batches the way gqa's loop does (the summed token loss
over the global batch's predicted tokens, AdamW over the loop's parameter groups, gradient clipping,
zero_grad(set_to_none)). The optimizer state is created first by a step on zero gradients, so that the
first real step already holds what every later step holds (weights, moments, gradients, activations).
Prints one JSON line: the peak resident set of those steps (VmHWM, reset just before the model is built)
minus the resident set at that moment, in bytes.

Run it with MALLOC_MMAP_THRESHOLD_ set low (the test does) so that glibc hands every freed tensor back
to the system: the resident set then follows the live tensors, the way a CUDA allocator's
peak-allocated counter does, instead of keeping freed blocks in its heap.
"""

from __future__ import annotations

import gc
import json
import resource
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from gqa.train.losses import distillation_loss
from gqa.train.params import prepare_model
from gqa.train.recipe import LoraSection, TrainSection


def train_section(settings: dict) -> TrainSection:
    """The recipe's train section the settings describe: params, gradient checkpointing, LoRA."""
    lora = LoraSection()
    if settings["params"] == "lora":
        lora = LoraSection(rank=settings["rank"], alpha=settings["alpha"], targets=settings["targets"], train_kv=bool(settings["full"]))
    return TrainSection(params=settings["params"], gradient_checkpointing=bool(settings.get("gradient_checkpointing")), lora=lora)


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak() -> None:
    """Start the peak resident set (VmHWM) afresh at the current one, so the peak read after the steps is theirs
    alone, not that of whatever ran before them in this process."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_resident_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024  # kB


def train(config, settings: dict) -> list[torch.nn.Parameter]:
    """Build the model and train it as the loop does; returns the trainable parameters."""
    micro, block, accumulation = settings["micro"], settings["block"], settings["accumulation"]
    batches = [torch.randint(0, config.vocab_size, (micro, block)) for _ in range(accumulation)]
    predicted = accumulation * micro * (block - 1)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = prepare_model(model, train_section(settings), seed=0).train()  # the loop's own set-up
    teacher = None
    if settings.get("teacher"):  # loss.kind: distill, the teacher in the run's precision (fp32 here)
        teacher = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval().requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # The loop's parameter groups (gqa.train.setup.parameter_groups, not imported: it costs seconds)
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=1e-4)
    for param in trainable:  # AdamW allocates its moments on its first step
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for _ in range(settings["steps"]):
        for batch in batches:
            if teacher is None:
                loss = model(input_ids=batch, labels=batch, num_items_in_batch=predicted).loss
            else:  # as gqa.train.loop._Run._loss
                student_logits = model(input_ids=batch).logits
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=batch).logits
                loss = distillation_loss(student_logits, teacher_logits, batch, 2.0, 0.5, num_items=predicted)
                del student_logits, teacher_logits
            (loss * accumulation).backward()
            del loss
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return trainable


def main(settings: dict) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = AutoConfig.from_pretrained(settings["config"])
    # Everything loaded on first use (modeling code, peft, kernels) is loaded by a run of the same code on
    # a one-layer model of the same family, before the baseline.
    small = AutoConfig.from_pretrained(settings["config"], num_hidden_layers=1, vocab_size=64)
    train(small, settings | {"micro": 1, "block": 8, "accumulation": 1})
    gc.collect()
    reset_peak()
    before = resident_bytes()
    trainable = train(config, settings)
    return {"peak": peak_resident_bytes() - before, "trainable": sum(p.numel() for p in trainable)}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
