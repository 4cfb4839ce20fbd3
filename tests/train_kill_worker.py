"""train_ddp_worker.py (same arguments: one launch, several runs in turn, weights and losses dumped) under
test hooks set by the environment, for the tests that kill training from outside (test_train_kill.py):

    KILL_TEST_BATCH_SECONDS=S   sleep S seconds before each training batch of a stream, so that a kill sent from
                                outside lands at the step the test watched for, not several steps later
    KILL_TEST_HOLD_SAVE=FILE    in the first checkpoint save, once the weights, optimizer, schedule and random
                                states are written and before the run's own states (its step, its stream
                                position), wait to be killed; the first process creates FILE there

Runs with one process (python tests/train_kill_worker.py ...) or under torchrun.
"""

import os
import runpy
import time
from pathlib import Path

import accelerate.accelerator

from gqa.train import stream

if "KILL_TEST_BATCH_SECONDS" in os.environ:
    pause = float(os.environ["KILL_TEST_BATCH_SECONDS"])
    batches = stream.StreamLoader.__iter__

    def slowly(self):
        for batch in batches(self):
            time.sleep(pause)
            yield batch

    stream.StreamLoader.__iter__ = slowly

if "KILL_TEST_HOLD_SAVE" in os.environ:

    def hold(*args, **kwargs):
        # The first process writes the weights and optimizer before it gets here; the others get here at once.
        if os.environ.get("RANK", "0") == "0":
            Path(os.environ["KILL_TEST_HOLD_SAVE"]).touch()
        time.sleep(600)

    accelerate.accelerator.save_custom_state = hold  # what save_state calls for registered objects

runpy.run_path(str(Path(__file__).with_name("train_ddp_worker.py")), run_name="__main__")
