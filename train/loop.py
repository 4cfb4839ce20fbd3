"""The uptraining loop: one recipe, one process or many, with Accelerate throughout.

recipe -> checks (paths, output dir, plan) -> data (tokenised once and cached, or streamed) -> model (+ teacher)
-> Accelerator.prepare -> step-0 eval of the model and the baseline (a fresh run)
-> steps (accumulate, clip, step, schedule, log, eval, checkpoint)
-> final eval -> save_pretrained from accelerator.get_state_dict -> provenance and model card.

The data order is fixed by the seed alone (see dataset.training_order; streamed, the module docstring
of gqa.train.dataset), every optimizer step sees
a full global batch, and its loss is the sum of its token losses over its number of predicted
tokens however it is split, so one process with accumulation, many processes, and an
interrupted-then-resumed run all compute the same steps, padded documents included.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import (
    SAFE_MODEL_NAME, DistributedType, GradientAccumulationPlugin, broadcast_object_list, gather_object, set_seed,
)
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, get_scheduler

from gqa.convert import __version__
from gqa.convert import outputlock
from gqa.convert.errors import GQAError
from gqa.convert.perplexity import perplexity, summed_loss
from gqa.convert.modeldir import (
    DTYPES, apply_umask, config_dtype, from_pretrained_args, looks_like_hub_id, now, provenance_of,
)
from gqa.train import rundir
from gqa.train.dataset import PreparedData, make_collate, prepare_data, training_order
from gqa.train.finalmodel import cast_state_dict, save_final_model
from gqa.train.stream import StreamLoader
from gqa.train.losses import IGNORE_INDEX, distillation_loss
from gqa.train.memory import check_run
from gqa.train.params import apply_lora, lora_record, merge_lora, select_trainable, weights_dtype
from gqa.train.plan import TrainingPlan, plan_training
from gqa.train.recipe import Recipe, flat_items, model_directory
from gqa.train.tasks import TaskSettings, headline_metrics, run_tasks, task_manager

logger = logging.getLogger(__name__)

MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


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
    _check_paths(recipe)
    use_cpu = not _accelerator_available()
    state = PartialState(cpu=use_cpu)
    existed = Path(recipe.output.dir).exists()
    lock = _lock_output(recipe, state)  # before the output dir is read: its checkpoints are this run's alone
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


def _lock_output(recipe: Recipe, state: PartialState) -> tuple[Path, int] | None:
    """The main process takes output.dir's lock; a refusal is raised on every process, with the same message."""
    refusal, lock = None, None
    if state.is_main_process:
        output_dir = Path(recipe.output.dir)
        if output_dir.exists() and not output_dir.is_dir():
            refusal = f"output.dir {output_dir} is a file; point output.dir at a directory"
        else:
            path = rundir.lock_path(output_dir)
            try:
                lock = path, outputlock.acquire(path, f"output.dir {output_dir}")
            except GQAError as err:
                refusal = str(err)
    if state.num_processes > 1:
        message = [refusal]
        broadcast_object_list(message, from_process=0)
        refusal = message[0]
    if refusal is not None:
        AcceleratorState._reset_state(reset_partial_state=True)
        raise GQAError(refusal)
    return lock


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


class _Run:
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
        _check_lora_distribution(recipe, accelerator.distributed_type)
        self.tasks, self.task_manager = _setup_tasks(recipe, accelerator)  # names checked before any data or weights
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
            accelerator.register_save_state_pre_hook(_keep_trainable_weights)
            accelerator.register_load_state_pre_hook(_load_trainable_weights)
        if self.start is not None:
            self._load_start()
        accelerator.init_trackers(recipe.logging.project, config=_tracker_config(recipe, self.plan))

        self.model, self.teacher, self.optimizer, self.scheduler = model, teacher, optimizer, scheduler
        # Read back after prepare: FSDP replaces parameter objects.
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.eval_loader = eval_loader
        self.data = data
        return self._loop(train_loader)

    def _load_start(self) -> None:
        """load_state from self.start; when its files do not load on some process, every process falls back to
        the newest whole checkpoint before it (resume=auto), or stops naming what failed."""
        while True:
            if self.main:
                logger.info("resuming from %s (step %d)", self.start.path, self.start.step)
            failed = None
            try:
                self.accelerator.load_state(str(self.start.path))
            except GQAError:
                raise  # a checkpoint of another setting (LoRA), not a damaged one
            except Exception as err:  # noqa: BLE001 - whatever a damaged file makes torch or safetensors raise
                failed = f"{type(err).__name__}: {err}"
            problem = next((f for f in gather_object([failed]) if f is not None), None)
            if problem is None:
                return
            damaged = f"{self.start.path} does not load ({problem})"
            if self.recipe.resume != "auto":
                raise GQAError(f"resume={self.recipe.resume}: {damaged}. Restore it from a copy, or resume from another checkpoint")
            logger.warning("checkpoint %s; trying the one before it", damaged)
            older = rundir.newest_whole_checkpoint(self.output_dir, before=self.start.step)
            if older is None:
                raise rundir.no_whole_checkpoint(self.output_dir, [damaged])
            self.start = older

    # The setup stages, in the order they run; the training step itself is _step.

    def _setup_data(self):
        recipe, accelerator = self.recipe, self.accelerator
        tokenizer_dir = recipe.model.tokenizer or recipe.model.path
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.config = AutoConfig.from_pretrained(recipe.model.path)
        self._check_vocab(self.config, tokenizer)
        started = time.perf_counter()
        # Prepared data is built by the first process of each machine while the others wait, then read from
        # the cache by all; streamed, each process opens its own share of the stream.
        data = prepare_data(
            recipe.data, tokenizer, tokenizer_dir, recipe.seed, accelerator.local_main_process_first,
            process_index=accelerator.process_index, num_processes=accelerator.num_processes,
        )
        self.plan = replace(self.plan, data_seconds=time.perf_counter() - started, stream_files=data.stats.get("stream_files"))
        if self.main:
            logger.info("plan:\n%s", self.plan.describe())
            self._log_data(data)
            rundir.write_run_file(self.output_dir, recipe, self.recipe_file, status="running", steps=self.start.step if self.start else 0)
        self.accelerator.wait_for_everyone()
        return tokenizer, data

    def _setup_model(self) -> PreTrainedModel:
        recipe = self.recipe
        # fp32 master weights; under lora the frozen base keeps a 16-bit checkpoint's dtype (see params.weights_dtype)
        dtype = weights_dtype(recipe.train.params, config_dtype(self.config))
        model = AutoModelForCausalLM.from_pretrained(recipe.model.path, dtype=dtype)
        model.config.use_cache = False  # no KV cache while training
        if recipe.train.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.x on
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if recipe.train.params != "lora":
            select_trainable(model, recipe.train.params)
            return model
        # With gradient checkpointing and frozen embeddings, the checkpointed layers' inputs must still carry
        # gradients to the adapters: transformers' activation_checkpointing_enable and peft's get_peft_model
        # both hook the input embeddings for that (enable_input_require_grads).
        # The adapters' initial values come from the seed alone, whatever ran before (data preparation).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            model = apply_lora(model, recipe.train.lora)
        self.lora = lora_record(model, recipe.train.lora)
        return model

    def _setup_optimizer(self, model: PreTrainedModel):
        recipe = self.recipe
        optimizer = torch.optim.AdamW(
            _parameter_groups(model, recipe.optimizer.weight_decay),
            lr=recipe.optimizer.lr,
            betas=recipe.optimizer.betas,
            eps=recipe.optimizer.eps,
        )
        scheduler = get_scheduler(
            "cosine_with_min_lr" if recipe.schedule.min_lr_ratio else SCHEDULERS[recipe.schedule.kind],
            optimizer,
            num_warmup_steps=self.plan.warmup_steps,
            num_training_steps=self.plan.steps,
            scheduler_specific_kwargs={"min_lr_rate": recipe.schedule.min_lr_ratio} if recipe.schedule.min_lr_ratio else None,
        )
        return optimizer, scheduler

    def _setup_loaders(self, tokenizer, data: PreparedData) -> tuple[DataLoader | StreamLoader, DataLoader]:
        recipe, plan = self.recipe, self.plan
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        collate = make_collate(recipe.data.block_size, pad_id)
        if data.streaming:  # each process's share already; not prepared by accelerate (see StreamLoader)
            train_loader = StreamLoader(data.train, plan.micro_batch, collate, self.accelerator.device, gather_object)
            self.accelerator.register_for_checkpointing(train_loader)  # the stream's position, in every checkpoint
        else:
            order = training_order(len(data.train), plan.steps * plan.global_batch, recipe.seed)
            train_loader = DataLoader(data.train.select(order), batch_size=plan.micro_batch, collate_fn=collate)
        eval_set = data.eval
        if recipe.eval.max_blocks is not None and len(eval_set) > recipe.eval.max_blocks:
            eval_set = eval_set.select(range(recipe.eval.max_blocks))
        return train_loader, DataLoader(eval_set, batch_size=plan.micro_batch, collate_fn=collate)

    def _log_data(self, data: PreparedData) -> None:
        stats = data.stats
        if data.streaming:
            held = f"the first {stats['held_out_blocks']:,} blocks of the stream" if stats["held_out_blocks"] else "data.eval"
            logger.info(
                "data: data.train streamed; %s eval tokens in %s blocks (%s), cache %s", f"{stats['eval_tokens']:,}",
                f"{stats['eval_blocks']:,}", held, stats["cache_dir"],
            )
            return
        epochs = self.plan.steps * self.plan.global_batch / stats["train_blocks"]
        logger.info(
            "data: %s train tokens in %s blocks (the run reads %.2f epochs), %s eval tokens in %s blocks; cache %s",
            f"{stats['train_tokens']:,}", f"{stats['train_blocks']:,}", epochs, f"{stats['eval_tokens']:,}",
            f"{stats['eval_blocks']:,}", stats["cache_dir"],
        )

    def _check_vocab(self, config, tokenizer) -> None:
        if len(tokenizer) > config.vocab_size:
            raise GQAError(
                f"the tokenizer has {len(tokenizer)} tokens but {self.recipe.model.path} embeds only "
                f"{config.vocab_size}; set model.tokenizer to the model's own tokenizer"
            )

    def _load_frozen(self, source: str, key: str, why: str) -> PreTrainedModel:
        """A frozen model in the recipe's precision on this process's device: the teacher, or the baseline.

        Replicated on every process (not sharded by FSDP/ZeRO). `why` says what a different vocabulary breaks.
        """
        where, extra = from_pretrained_args(source)
        try:
            model = AutoModelForCausalLM.from_pretrained(where, dtype=DTYPES[self.recipe.precision], **extra)
        except (OSError, ValueError) as err:
            raise GQAError(
                f"{key}: could not load {source} ({err}); give a checkpoint directory, a .gguf file or a reachable hub id"
            ) from err
        if model.config.vocab_size != self.config.vocab_size:
            raise GQAError(
                f"{key} {source} has a vocabulary of {model.config.vocab_size}, the student {self.config.vocab_size}; {why}"
            )
        model.requires_grad_(False)
        return model.eval().to(self.accelerator.device)

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
        window = _Window()
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

    def _log_window(self, window: _Window, step: int, bar) -> None:
        values = window.summary()
        values["lr"] = self.scheduler.get_last_lr()[0]
        values["tokens_seen"] = self.progress.tokens_seen
        self.accelerator.log({f"train/{k}": v for k, v in values.items()}, step=step)
        if self.main:
            self._append_metrics({"step": step, **values})
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}", tok_s=f"{values['tokens_per_second']:.0f}")
        window.reset()

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
        in_memory = self.teacher is not None and _same_source(source, recipe.model.teacher)
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

    def _save_checkpoint(self, step: int) -> None:
        # A finite loss does not prove the update that followed it was finite (Adam can overflow):
        # never write a checkpoint that could not be resumed.
        # Each process counts what it holds (FSDP2 parameters are DTensors: their local shard), then all add up.
        bad = sum(int((~torch.isfinite(p.to_local() if hasattr(p, "to_local") else p)).sum()) for p in self.trainable)
        bad = int(self.accelerator.reduce(torch.tensor(float(bad), device=self.accelerator.device), reduction="sum").item())
        if bad:
            self._fail_non_finite("weights", f"non-finite ({bad:,} values)", changed=True)
        # Written under a partial name and renamed once complete: a process killed mid-save leaves no checkpoint
        # that looks complete, and the next save clears what it left.
        partial = rundir.partial_path(self.output_dir, step)
        if self.main:
            rundir.clear_partial(self.output_dir)
        self.accelerator.wait_for_everyone()
        with rundir.disk_full_stops_checkpoint(self.output_dir, step, partial):  # the ones before it stay as they are
            self.accelerator.save_state(str(partial))
            self.accelerator.wait_for_everyone()
            if self.main:
                path = rundir.complete_checkpoint(partial, step, self.progress.tokens_seen)
                apply_umask(path)  # accelerate's save_state writes some files 0600
                rundir.prune_checkpoints(self.output_dir, self.recipe.checkpoint.keep)
                logger.info("step %d: checkpoint %s", step, path)
        self.accelerator.wait_for_everyone()

    # --- the result ----------------------------------------------------------------------------

    def _save_final_model(self, final_eval: dict[str, float]) -> None:
        accelerator, recipe = self.accelerator, self.recipe
        accelerator.wait_for_everyone()
        if self.lora is not None:
            # The adapters merged into the weights: a plain checkpoint with the model's own tensor names. Every
            # process merges its own replica (the same numbers), so each returns the model that was saved.
            unwrapped = self.final_model = merge_lora(accelerator.unwrap_model(self.model))
            state_dict = unwrapped.state_dict()
        else:
            state_dict = accelerator.get_state_dict(self.model)  # every process takes part (FSDP/ZeRO-3 gather)
            unwrapped = accelerator.unwrap_model(self.model)
        if self.main:
            out_dtype = _output_dtype(recipe)
            unwrapped.config.use_cache = True
            provenance = provenance_of(recipe.model.path, unwrapped.config)
            provenance["training"] = self._training_record(final_eval)
            save_final_model(self.output_dir, unwrapped, cast_state_dict(state_dict, out_dtype), out_dtype,
                             recipe.output.max_shard_size, recipe.model.tokenizer or recipe.model.path, provenance)
            rundir.write_run_file(
                self.output_dir, recipe, self.recipe_file, status="finished", steps=self.progress.step,
                tokens_seen=self.progress.tokens_seen, final_eval=final_eval,
            )
            apply_umask(self.output_dir)  # save_pretrained's files come out 0600; every output gets the umask's mode
            logger.info("saved the trained model to %s", self.output_dir)
        accelerator.wait_for_everyone()

    def _training_record(self, final_eval: dict[str, float]) -> dict[str, Any]:
        recipe, plan = self.recipe, self.plan
        pretrain = recipe.budget.pretrain_tokens
        return {
            "gqa_version": __version__,
            "finished": now(),
            "recipe_file": self.recipe_file,
            "recipe": recipe.model_dump(mode="json", exclude={"output", "logging", "resume"}),
            "method": "distillation from model.teacher" if recipe.loss.kind == "distill" else "language modelling",
            "params": recipe.train.params,
            **({"lora": self.lora, "lora_summary": _lora_summary(self.lora)} if self.lora else {}),
            "processes": plan.processes,
            "global_batch_sequences": plan.global_batch,
            "block_size": plan.block_size,
            "steps": self.progress.step,
            "tokens_seen": self.progress.tokens_seen,
            "pretrain_tokens": pretrain,
            "pretrain_fraction": self.progress.tokens_seen / pretrain if pretrain else None,
            "data": {
                "train": recipe.data.train,
                "eval": recipe.data.eval or (
                    f"the first {recipe.data.eval_blocks} blocks of the data.train stream held out" if recipe.data.streaming
                    else f"{recipe.data.eval_fraction} of data.train held out"
                ),
                "train_tokens": self.data.stats["train_tokens"],
            },
            "final_eval": {
                "loss": final_eval["loss"],
                "perplexity": final_eval["perplexity"],
                "tokens": final_eval["tokens"],
                **({"tasks": final_eval["tasks"]} if final_eval.get("tasks") else {}),
            },
        }

    def _append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


@dataclass
class _Window:
    """The steps since the last log line."""

    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    grad_norms: list[torch.Tensor] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, loss: float, tokens: int, grad_norm: torch.Tensor | None, seconds: float) -> None:
        self.losses.append(loss)
        self.tokens += tokens
        self.seconds += seconds
        if grad_norm is not None:  # DeepSpeed clips inside its engine: no norm before its first step
            self.grad_norms.append(grad_norm)

    def summary(self) -> dict[str, float]:
        values = {"loss": sum(self.losses) / len(self.losses), "tokens_per_second": self.tokens / max(self.seconds, 1e-9)}
        if self.grad_norms:
            values["grad_norm"] = torch.stack([g.detach().float() for g in self.grad_norms]).mean().item()
        return values

    def reset(self) -> None:
        self.losses, self.tokens, self.grad_norms, self.seconds = [], 0, [], 0.0


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


def _check_paths(recipe: Recipe) -> None:
    """Fail on missing inputs before any process group, data or model work starts."""
    for key, path in (("model.path", recipe.model.path), ("model.teacher", recipe.model.teacher)):
        if path is not None:
            model_directory(key, path)
    if recipe.eval.baseline is not None:
        _check_baseline(recipe.eval.baseline)
    context = getattr(AutoConfig.from_pretrained(recipe.model.path), "max_position_embeddings", None)
    if context and recipe.data.block_size > context:
        raise GQAError(f"data.block_size={recipe.data.block_size} is longer than the model's context ({context} tokens)")
    if recipe.model.tokenizer is not None and not Path(recipe.model.tokenizer).is_dir():
        raise GQAError(f"model.tokenizer: {recipe.model.tokenizer} is not a directory")
    for tracker in recipe.logging.trackers:
        module = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}[tracker]
        try:
            __import__(module)
        except ImportError:
            raise GQAError(f"logging.trackers: {tracker} is not installed; pip install {module}, or remove it") from None


def _check_baseline(source: str) -> None:
    """eval.baseline as from_pretrained_args reads it: a local checkpoint dir, a .gguf file, or else a hub id."""
    path = Path(source).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise GQAError(f"eval.baseline: {source} holds no config.json; point it at a transformers checkpoint directory")
    if path.is_file() and path.suffix != ".gguf":
        raise GQAError(f"eval.baseline: {source} is a file; give a checkpoint directory, a .gguf file or a hub id")
    if not path.exists() and not looks_like_hub_id(source):
        raise GQAError(f"eval.baseline: {source} is neither a local checkpoint directory nor a hub id (owner/name)")


def _same_source(a: str, b: str | None) -> bool:
    """Whether two model keys name the same checkpoint: one directory however spelled, or one hub id."""
    pa, pb = Path(a).expanduser(), Path(b or "").expanduser()
    return b is not None and (pa.resolve() == pb.resolve() if pa.exists() and pb.exists() else a == b)


def _accelerator_available() -> bool:
    accelerator_api = getattr(torch, "accelerator", None)
    if accelerator_api is not None:
        return bool(accelerator_api.is_available())
    return torch.cuda.is_available()


def _setup_tasks(recipe: Recipe, accelerator: Accelerator) -> tuple[TaskSettings | None, Any]:
    """eval.tasks as `gqa eval --tasks` scores them, with lm-eval's task index; (None, None) without tasks.
    The main process scores the whole model, so sharded launches are refused."""
    if not recipe.eval.tasks:
        return None, None
    plugin = accelerator.state.deepspeed_plugin
    if accelerator.distributed_type == DistributedType.FSDP or (plugin is not None and plugin.zero_stage == 3):
        raise GQAError(
            f"eval.tasks needs the whole model in one process, which {accelerator.distributed_type.value} shards; "
            "drop eval.tasks and score the saved model with gqa eval --tasks, or launch with DDP"
        )
    settings = TaskSettings(tuple(recipe.eval.tasks), recipe.eval.num_fewshot, recipe.eval.task_limit,
                            include_paths=tuple(recipe.eval.task_paths))  # fmt: skip
    return settings, task_manager(settings)


def _check_lora_distribution(recipe: Recipe, distributed_type: DistributedType) -> None:
    """LoRA runs on one process or DDP: the adapters are merged into full, unsharded weights before saving."""
    if recipe.train.params == "lora" and distributed_type in (
        DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM
    ):
        raise GQAError(
            f"train.params: lora does not run under {distributed_type.value} (sharded weights cannot be merged in "
            "place); LoRA keeps the frozen weights in 16 bits, so a 7B model fits one 24 GB GPU: launch on one "
            "process, or with the accelerate/ddp config"
        )


def _lora_summary(record: dict[str, Any]) -> str:
    """One line for the model card: what the adapters were and that they are merged."""
    full = f"; {', '.join(record['fully_trained'])} trained fully" if record["fully_trained"] else ""
    return (f"LoRA rank {record['rank']} (alpha {record['alpha']:g}) on {', '.join(record['targets'])}{full}; "
            "adapters merged into the weights")


def _trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def _keep_trainable_weights(models: list[torch.nn.Module], weights: list[dict[str, torch.Tensor]], output_dir: str) -> None:
    """accelerate save_state hook (LoRA): the checkpoint keeps the trainable parameters only."""
    for model, state in zip(models, weights):
        keep = _trainable_names(model)
        for name in [name for name in state if name not in keep]:
            del state[name]


def _load_trainable_weights(models: list[torch.nn.Module], input_dir: str) -> None:
    """accelerate load_state hook (LoRA): restore the trainable parameters; the frozen ones are already
    model.path's. Loaded here, so accelerate does not demand the frozen weights from the file."""
    for i, model in enumerate(list(models)):
        path = Path(input_dir) / f"{SAFE_MODEL_NAME}{f'_{i}' if i else ''}.safetensors"  # as accelerate names it
        if not path.is_file():
            raise GQAError(f"checkpoint {input_dir} holds no {path.name}; resume from another checkpoint or resume=never")
        state = load_file(path, device=str(next(model.parameters()).device))
        missing, unexpected = model.load_state_dict(state, strict=False)
        trainable = _trainable_names(model)
        if unexpected or trainable & set(missing):
            raise GQAError(
                f"checkpoint {input_dir} does not match this LoRA model (missing {sorted(trainable & set(missing))[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}); it was written by another train.lora setting"
            )
        models.remove(model)


def _parameter_groups(model: PreTrainedModel, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: decaying norms and biases pulls them away from their role."""
    # Under ZeRO-3 (zero.Init) a parameter's own data is an empty placeholder; ds_shape is its real shape.
    decay = [p for p in model.parameters() if p.requires_grad and len(getattr(p, "ds_shape", p.shape)) >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and len(getattr(p, "ds_shape", p.shape)) < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _output_dtype(recipe: Recipe) -> torch.dtype:
    if recipe.output.dtype != "auto":
        return DTYPES[recipe.output.dtype]
    return config_dtype(AutoConfig.from_pretrained(recipe.model.path), torch.float32)


def _tracker_config(recipe: Recipe, plan: TrainingPlan) -> dict[str, Any]:
    """Flat scalars: what tensorboard's hparams accept."""
    flat = flat_items(recipe.model_dump(mode="json")) | {f"plan.{k}": v for k, v in plan.as_dict().items()}
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}
