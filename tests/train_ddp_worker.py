"""Run under torchrun by the tests: train a recipe, dump this rank's weights and losses.

    torchrun --nproc_per_node 2 tests/train_ddp_worker.py RECIPE DUMP_DIR [key=value ...] [@NAME [key=value ...]] ...

Without @NAME: one run, dumped as rank{R}.safetensors and rank{R}.json. Each `@NAME` group is one more
run, in order, in the same processes and process group (kept up between runs), with the shared overrides
followed by its own, dumped as NAME-rank{R}.*: one launch, several runs.
"""

import json
import sys
from pathlib import Path

import torch.distributed
from accelerate import PartialState
from safetensors.torch import save_file

from gqa.train.api import run_recipe

recipe, dump_dir, *rest = sys.argv[1:]
shared, runs = [], []
for arg in rest:
    if arg.startswith("@"):
        runs.append([arg[1:], []])
    elif runs:
        runs[-1][1].append(arg)
    else:
        shared.append(arg)
# Each run ends with accelerator.end_training(), which takes the process group down; bringing gloo up again in
# the same processes is not reliable, so keep the group for the next run (accelerate reuses an initialised one).
PartialState.destroy_process_group = lambda self, group=None: None
for name, own in runs or [["", []]]:
    result = run_recipe(recipe, shared + own)
    prefix = f"{name}-" if name else ""
    rank = result.process_index
    weights = {key: tensor.detach().contiguous().clone() for key, tensor in result.model.state_dict().items()}
    save_file(weights, str(Path(dump_dir) / f"{prefix}rank{rank}.safetensors"))
    record = {"losses": result.losses, "processes": result.plan.processes, "accumulation": result.plan.accumulation,
              "final_eval": result.final_eval, "tokens_seen": result.tokens_seen, "finished": result.finished,
              "plan": result.plan.describe()}
    (Path(dump_dir) / f"{prefix}rank{rank}.json").write_text(json.dumps(record))
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
