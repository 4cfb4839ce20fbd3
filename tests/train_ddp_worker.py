"""Run under torchrun by test_train_distributed.py: train a recipe, dump this rank's weights and losses.

    torchrun --nproc_per_node 2 tests/train_ddp_worker.py RECIPE DUMP_DIR [key=value ...]
"""

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from gqa.train.api import run_recipe

recipe, dump_dir, *overrides = sys.argv[1:]
result = run_recipe(recipe, overrides)
rank = result.process_index
weights = {name: tensor.detach().contiguous().clone() for name, tensor in result.model.state_dict().items()}
save_file(weights, str(Path(dump_dir) / f"rank{rank}.safetensors"))
record = {"losses": result.losses, "processes": result.plan.processes, "accumulation": result.plan.accumulation,
          "final_eval": result.final_eval, "tokens_seen": result.tokens_seen}
(Path(dump_dir) / f"rank{rank}.json").write_text(json.dumps(record))
