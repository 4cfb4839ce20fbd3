"""The uptraining loop: one recipe, one process or many, with Accelerate throughout.

recipe -> checks (paths, output dir, plan) -> data (tokenised once and cached, or streamed) -> model (+ teacher)
-> Accelerator.prepare -> step-0 eval of the model and the baseline (a fresh run)
-> steps (accumulate, clip, step, schedule, log, eval, checkpoint)
-> final eval -> save_pretrained from accelerator.get_state_dict -> provenance and model card.

The setup stages are gqa.train.setup's, checkpoints and the final model gqa.train.checkpoints', logging
gqa.train.logbook's; this module holds the run, its loop and its step.

The data order is fixed by the seed alone (see dataset.training_order; streamed, the module docstring
of gqa.train.dataset), every optimizer step sees
a full global batch, and its loss is the sum of its token losses over its number of predicted
tokens however it is split, so one process with accumulation, many processes, and an
interrupted-then-resumed run all compute the same steps, padded documents included.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import (
    GradientAccumulationPlugin, set_seed,
)
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from gqa.convert import outputlock
from gqa.convert.errors import GQAError
from gqa.convert.perplexity import perplexity, summed_loss
from gqa.train import rundir
from gqa.train.checkpoints import RunCheckpoints, keep_trainable_weights, load_trainable_weights
from gqa.train.logbook import RunLogging, Window, tracker_config
from gqa.train.setup import RunSetup, accelerator_available, check_lora_distribution, check_paths, lock_output, same_source, setup_tasks
from gqa.train.stream import StreamLoader
from gqa.train.losses import IGNORE_INDEX, distillation_loss
from gqa.train.memory import check_run
from gqa.train.plan import TrainingPlan, plan_training
from gqa.train.recipe import Recipe
from gqa.train.tasks import headline_metrics, run_tasks

logger = logging.getLogger(__name__)

MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


@dataclass
class TrainResult:
    output_dir: Path
    finished: bool  # False when the run stopped at budget.stop_at_step
    steps: int  # optimizer steps done, counting those before a resume
    tokens_seen: int
    plan: TrainingPlan
    losses: dict[int, float]  # step -> training loss (global batch's token mean), for the steps this call ran
    evals: list[dict[str, float]]  # every evaluation this call ran, step 0 included: step, loss, perplexity, tokens
    final_eval: dict[str, float] | None
    train_seconds: float  # time in training steps this call (evaluation and checkpoints excluded)
    model: PreTrainedModel  # the trained model on this process (unwrapped; LoRA adapters merged once finished)
    process_index: int = 0

    @property
    def tokens_per_second(self) -> float:
        ran = len(self.losses) * self.plan.tokens_per_step
        return ran / self.train_seconds if self.train_seconds > 0 else float("nan")


@dataclass
class Progress:
    """Position in the run; saved in every checkpoint via accelerator.register_for_checkpointing."""

    step: int = 0
    tokens_seen: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])


def train(recipe: Recipe, recipe_file: str | None = None, check_memory: bool = True) -> TrainResult:
    """Run a recipe to its end (or to budget.stop_at_step) and return what happened.

    check_memory: refuse to start on CUDA when the memory plan exceeds the device's memory (gqa.train.memory).
    """
    check_paths(recipe)
    use_cpu = not accelerator_available()
    state = PartialState(cpu=use_cpu)
    existed = Path(recipe.output.dir).exists()
    lock = lock_output(recipe, state)  # before the output dir is read: its checkpoints are this run's alone
    output_dir = Path(recipe.output.dir)
    try:
        # Checkpoints and the final model say what they were writing themselves; this names any other write.
        with rundir.disk_full_stops_run(output_dir, f"the run's files in {output_dir}"):
            return _train_locked(recipe, recipe_file, check_memory, state, use_cpu)
    finally:
        if lock is not None:
            outputlock.release(*lock)
            if not existed:  # a run refused before it wrote anything leaves no empty output dir behind
                with contextlib.suppress(OSError):
                    Path(recipe.output.dir).rmdir()


def _train_locked(recipe: Recipe, recipe_file: str | None, check_memory: bool, state: PartialState, use_cpu: bool) -> TrainResult:
    plan = plan_training(recipe, state.num_processes)
    start = rundir.resolve_start(recipe)
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=MIXED_PRECISION[recipe.precision],
        # A plugin, not gradient_accumulation_steps=: that argument yields to an accelerate config's value.
        # The loop reads each step's batches before its backward passes, so the loader reports its end before
        # the last step's first backward pass: sync by count alone (the plan makes every step full).
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=plan.accumulation, sync_with_dataloader=False),
        # Steps are counted in optimizer steps of the global batch: step the schedule ourselves, once.
        step_scheduler_with_optimizer=False,
        log_with=recipe.logging.trackers or None,
        project_dir=str(Path(recipe.output.dir) / "logs"),
    )
    try:
        # Before any data or weights: bytes per process, printed with the plan; refused when they cannot fit.
        plan = replace(plan, memory=check_run(recipe, plan.accumulation, accelerator, check_memory))
        return _Run(recipe, recipe_file, accelerator, plan, start).execute()
    finally:
        accelerator.end_training()
        # Forget accelerate's process-wide singletons so the next train() in this process starts clean.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


class _Run(RunSetup, RunCheckpoints, RunLogging):
    """One training run: its setup (gqa.train.setup), the loop and its step (here), evaluation, checkpoints and the
    final model (gqa.train.checkpoints), logging (gqa.train.logbook)."""

    def __init__(self, recipe: Recipe, recipe_file: str | None, accelerator: Accelerator, plan: TrainingPlan, start):
        self.recipe = recipe
        self.recipe_file = recipe_file
        self.accelerator = accelerator
        self.plan = plan
        self.start: rundir.Checkpoint | None = start
        self.output_dir = Path(recipe.output.dir)
        self.progress = Progress()
        self.main = accelerator.is_main_process
        self.lora: dict[str, Any] | None = None  # train.params: lora: what the adapters are (for the provenance)
        self.final_model: PreTrainedModel | None = None

    # --- setup ---------------------------------------------------------------------------------

    def execute(self) -> TrainResult:
        recipe, accelerator = self.recipe, self.accelerator
        check_lora_distribution(recipe, accelerator.distributed_type)
        self.tasks, self.task_manager = setup_tasks(recipe, accelerator)  # names checked before any data or weights
        set_seed(recipe.seed)
        tokenizer, data = self._setup_data()  # prints the plan, data included
        self.tokenizer = tokenizer
        model = self._setup_model()
        teacher = None
        if recipe.loss.kind == "distill":
            teacher = self._load_frozen(recipe.model.teacher, "model.teacher", "distillation needs the same tokenizer")
        optimizer, scheduler = self._setup_optimizer(model)
        train_loader, eval_loader = self._setup_loaders(tokenizer, data)

        model, optimizer, scheduler, train_loader, eval_loader = accelerator.prepare(
            model, optimizer, scheduler, train_loader, eval_loader
        )
        if accelerator.gradient_accumulation_steps != self.plan.accumulation:  # DeepSpeed can impose its own
            raise GQAError(
                f"the accelerate/DeepSpeed config sets gradient_accumulation_steps={accelerator.gradient_accumulation_steps}, "
                f"but the recipe's batch needs {self.plan.accumulation}; remove it from the config (gqa derives it)"
            )
        accelerator.register_for_checkpointing(self.progress)
        if self.lora is not None:  # checkpoints hold the trainable parameters; the frozen base is model.path
            accelerator.register_save_state_pre_hook(keep_trainable_weights)
            accelerator.register_load_state_pre_hook(load_trainable_weights)
        if self.start is not None:
            self._load_start()
        accelerator.init_trackers(recipe.logging.project, config=tracker_config(recipe, self.plan))

        self.model, self.teacher, self.optimizer, self.scheduler = model, teacher, optimizer, scheduler
        # Read back after prepare: FSDP replaces parameter objects.
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.eval_loader = eval_loader
        self.data = data
        return self._loop(train_loader)


    # The setup stages, in the order they run; the training step itself is _step.


    # --- the loop ------------------------------------------------------------------------------

    def _loop(self, train_loader) -> TrainResult:
        recipe, accelerator, plan = self.recipe, self.accelerator, self.plan
        start_step = self.progress.step
        stop_at = recipe.budget.stop_at_step or plan.steps
        loader = train_loader
        if start_step >= stop_at:
            loader = []  # resumed at (or past) where this invocation should stop
        elif start_step and not isinstance(train_loader, StreamLoader):  # a stream continues where load_state put it
            loader = accelerator.skip_first_batches(train_loader, start_step * plan.accumulation)
        losses: dict[int, float] = {}
        evals: list[dict[str, float]] = []
        window = Window()
        train_seconds = 0.0
        if self.start is None and recipe.eval.at_start:  # a resumed run's step 0 is in metrics.jsonl already
            evals.append(self._evaluate(0))
            self._score_baseline()
        bar = tqdm(total=plan.steps, initial=start_step, desc="uptraining", unit="step", disable=not accelerator.is_main_process)
        self.model.train()
        tick = time.perf_counter()
        for micro_batches in _steps(loader, plan.accumulation):
            loss_value, tokens, grad_norm = self._step(micro_batches)
            self.progress.step += 1
            step = self.progress.step
            self.progress.tokens_seen += tokens
            losses[step] = loss_value
            now_ = time.perf_counter()
            elapsed, tick = now_ - tick, now_  # logging below counts as training time for the next step
            train_seconds += elapsed
            window.add(loss_value, tokens, grad_norm, elapsed)
            bar.update(1)
            if step % recipe.logging.every == 0 or step == stop_at:
                self._log_window(window, step, bar)
            paused = False
            if recipe.eval.every and step % recipe.eval.every == 0 and step != plan.steps:
                evals.append(self._evaluate(step))
                paused = True
            if (recipe.checkpoint.every and step % recipe.checkpoint.every == 0) or (step == stop_at and step < plan.steps):
                self._save_checkpoint(step)
                paused = True
            if step >= stop_at:
                break
            if paused:  # evaluation and checkpoints are not training time
                tick = time.perf_counter()
        bar.close()
        return self._finish(losses, evals, train_seconds)

    def _step(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[float, int, torch.Tensor | None]:
        """One optimizer step on one global batch: its loss (the token mean), tokens read and grad norm."""
        accelerator, plan = self.accelerator, self.plan
        # Random draws inside a step (dropout, LoRA's included) depend on the seed, the step and the process
        # alone, so a resumed run draws what an uninterrupted one would, whatever ran before it.
        torch.manual_seed(_step_seed(self.recipe.seed, self.progress.step + 1, accelerator.process_index))
        # Every micro batch's summed token loss is divided by the predicted tokens of the whole global batch
        # (all micro batches, all processes), so that count is needed before the first backward pass. One
        # collective for it and the tokens read (padding not counted); a second one for the loss after.
        counts = sum(torch.stack([_predicted_tokens(batch), _read_tokens(batch)]) for batch in micro_batches)
        predicted, tokens = accelerator.reduce(counts, reduction="sum").tolist()
        # accelerate's backward (or DeepSpeed's engine) divides each loss by the accumulation steps, and
        # DDP, FSDP and ZeRO average gradients over processes; each micro batch's loss is already its share of
        # the global batch's loss, so undo both.
        undo_averaging = plan.accumulation * plan.processes
        step_loss = torch.zeros((), device=accelerator.device, dtype=torch.float64)
        for i, batch in enumerate(micro_batches, 1):
            with accelerator.accumulate(self.model):
                # Only the step's last backward pass may sync gradients (and, under DeepSpeed, step).
                assert accelerator.sync_gradients == (i == plan.accumulation), "accelerate syncs out of step"
                loss = self._loss(batch, predicted)
                accelerator.backward(loss * undo_averaging)
                step_loss += loss.detach()
        loss_value = accelerator.reduce(step_loss, reduction="sum").item()  # the global batch's token mean
        if not math.isfinite(loss_value):
            self._fail_non_finite("training loss", loss_value)
        grad_norm = accelerator.clip_grad_norm_(self.trainable, self.recipe.optimizer.max_grad_norm or math.inf)
        if grad_norm is not None and not torch.is_tensor(grad_norm):  # DeepSpeed's engine reports a Python float
            grad_norm = torch.tensor(float(grad_norm))
        if grad_norm is not None and self.recipe.precision != "fp16" and not math.isfinite(grad_norm.item()):
            # (fp16's loss scaler skips such steps by itself)
            self._fail_non_finite("gradient norm", grad_norm.item())
        self.optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16 overflow skips a step; so does the schedule
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, int(tokens), grad_norm

    def _finish(self, losses: dict[int, float], evals: list[dict[str, float]], train_seconds: float) -> TrainResult:
        """The final evaluation and model when the budget is spent; a stopped run's status otherwise."""
        finished = self.progress.step >= self.plan.steps
        final_eval = None
        if finished:
            final_eval = self._evaluate(self.progress.step)
            evals.append(final_eval)
            self._save_final_model(final_eval)
        elif self.main:
            rundir.write_run_file(self.output_dir, self.recipe, self.recipe_file, status="stopped", steps=self.progress.step)
        self.accelerator.wait_for_everyone()
        return TrainResult(
            output_dir=self.output_dir,
            finished=finished,
            steps=self.progress.step,
            tokens_seen=self.progress.tokens_seen,
            plan=self.plan,
            losses=losses,
            evals=evals,
            final_eval=final_eval,
            train_seconds=train_seconds,
            model=self.final_model if self.final_model is not None else self.accelerator.unwrap_model(self.model),
            process_index=self.accelerator.process_index,
        )

    def _loss(self, batch: dict[str, torch.Tensor], predicted: int) -> torch.Tensor:
        """This micro batch's summed token losses over the global batch's `predicted` tokens."""
        if self.teacher is None:
            return self.model(**batch, num_items_in_batch=predicted).loss
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        student_logits = self.model(**inputs).logits
        with torch.no_grad(), self.accelerator.autocast():
            teacher_logits = self.teacher(**inputs).logits
        loss = self.recipe.loss
        return distillation_loss(
            student_logits, teacher_logits, batch["labels"], loss.temperature, loss.distill_weight, num_items=predicted
        )

    def _fail_non_finite(self, what: str, value: float | str, changed: bool = False) -> None:
        """Stop every process with one message; the checkpoints on disk all hold finite weights."""
        step = self.progress.step if changed else self.progress.step + 1
        found = rundir.complete_checkpoints(self.output_dir)
        where = f"the last good checkpoint is {found[-1].path} (step {found[-1].step})" if found else "no checkpoint was saved yet"
        if self.main:
            rundir.write_run_file(
                self.output_dir, self.recipe, self.recipe_file, status="failed", steps=self.progress.step,
                error=f"{what} {value} at step {step}",
            )
        effect = "" if changed else "; stopped before that step changed the weights"
        raise GQAError(
            f"the {what} became {value} at step {step}{effect}, and {where}. Start again with a lower "
            "optimizer.lr, more warmup (schedule.warmup_steps), optimizer.max_grad_norm set, or precision "
            "bf16/fp32 instead of fp16"
        )


    def _held_out_loss(self, model: torch.nn.Module) -> tuple[float, int]:
        """Token-weighted mean loss on the held-out blocks over every process's share, and the tokens predicted."""
        # gather_for_metrics drops the samples accelerate repeats to even out the last batch
        loss_sum, tokens = summed_loss(model, self.eval_loader, self.accelerator.gather_for_metrics)
        return loss_sum / tokens, tokens

    @torch.no_grad()
    def _evaluate(self, step: int) -> dict[str, float]:
        """Perplexity on the held-out blocks; its metrics record carries the tokens trained so far (the curves' x)."""
        self.model.eval()
        loss, tokens = self._held_out_loss(self.model)
        tasks = self._score_tasks(self.model, "task")
        self.model.train()
        result = {"step": step, "loss": loss, "perplexity": perplexity(loss), "tokens": tokens}
        if tasks:
            result["tasks"] = tasks
        self.accelerator.log({"eval/loss": loss, "eval/perplexity": result["perplexity"], **tasks}, step=step)
        if self.main:
            self._append_metrics({"step": step, "tokens": self.progress.tokens_seen, "eval_loss": loss,
                                  "eval_perplexity": result["perplexity"], **tasks})
            logger.info("step %d: eval loss %.4f, perplexity %.3f%s", step, loss, result["perplexity"],
                        "".join(f", {k} {v:.4f}" for k, v in tasks.items()))  # fmt: skip
        return result

    def _score_tasks(self, model: torch.nn.Module, prefix: str) -> dict[str, float]:
        """eval.tasks on the main process (the others wait): {prefix/task/metric: value}; {} without tasks."""
        if self.tasks is None:
            return {}
        values: dict[str, float] = {}
        if self.main:
            with self.accelerator.autocast():
                out = run_tasks(self.accelerator.unwrap_model(model), self.tokenizer, self.tasks, self.task_manager)
            values = {f"{prefix}/{name}/{metric}": task["metrics"][metric]
                      for name, task in out["tasks"].items() for metric in headline_metrics(task)}  # fmt: skip
        self.accelerator.wait_for_everyone()
        return values

    @torch.no_grad()
    def _score_baseline(self) -> None:
        """The original's held-out figure, scored once at step 0 as _evaluate scores the model: the recovery
        curve's target line. A model loaded for it is freed before training starts; the teacher stays."""
        recipe = self.recipe
        source = recipe.eval.baseline or recipe.model.teacher
        if source is None:
            return
        in_memory = self.teacher is not None and same_source(source, recipe.model.teacher)
        key = "eval.baseline" if recipe.eval.baseline else "model.teacher"
        baseline = self.teacher if in_memory else self._load_frozen(source, key, "its perplexity would not compare")
        with self.accelerator.autocast():  # as the teacher runs in the loss
            loss, _ = self._held_out_loss(baseline)
        tasks = self._score_tasks(baseline, "baseline_task")
        if not in_memory:  # freed now, not at some later collection: training's memory must not hold it too
            del baseline
            gc.collect()
            if torch.cuda.is_available():  # hand its cached blocks back: training should not start beside them
                torch.cuda.empty_cache()
        values = {"baseline_eval_loss": loss, "baseline_eval_perplexity": perplexity(loss), **tasks}
        self.accelerator.log({"eval/baseline_loss": loss, "eval/baseline_perplexity": values["baseline_eval_perplexity"]},
                             step=0)
        if self.main:
            self._append_metrics({"step": 0, "tokens": 0, **values})
            logger.info("baseline %s: eval loss %.4f, perplexity %.3f", source, loss, values["baseline_eval_perplexity"])


    # --- the result ----------------------------------------------------------------------------


# --- helpers --------------------------------------------------------------------------------------


def _steps(loader, accumulation: int):
    """The loader's batches in lists of `accumulation`: each optimizer step's micro batches (the plan fills them)."""
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == accumulation:
            yield batches
            batches = []


def _step_seed(seed: int, step: int, process: int) -> int:
    return (seed * 1_000_003 + step) * 1_009 + process


def _predicted_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Positions whose next token has a label: what the loss averages over."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def _read_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    mask = batch.get("attention_mask")
    return mask.sum() if mask is not None else torch.tensor(batch["input_ids"].numel(), device=batch["input_ids"].device)


