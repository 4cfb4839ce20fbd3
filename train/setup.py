"""A training run's setup, kept apart from its step: the checks made before any process group, data or weights
(paths, output lock, LoRA's launch, eval.tasks), then the data, the model, the optimizer and the loaders."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import (
    DistributedType, broadcast_object_list, gather_object,
)
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, get_scheduler

from gqa.convert import outputlock
from gqa.convert.errors import GQAError
from gqa.convert.modeldir import (
    DTYPES, config_dtype, from_pretrained_args, looks_like_hub_id,
)
from gqa.train import rundir
from gqa.train.dataset import PreparedData, make_collate, prepare_data, training_order
from gqa.train.stream import StreamLoader
from gqa.train.params import lora_record, prepare_model, weights_dtype
from gqa.train.recipe import Recipe, model_directory
from gqa.train.tasks import TaskSettings, task_manager

logger = logging.getLogger(__name__)

SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


class RunSetup:
    """The setup stages of a run (mixed into gqa.train.loop._Run, whose __init__ sets recipe, accelerator, plan,
    output_dir, main, start and lora), in the order execute() calls them."""

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
        model = prepare_model(model, recipe.train, recipe.seed)
        if recipe.train.params != "lora":
            return model
        self.lora = lora_record(model, recipe.train.lora)
        return model

    def _setup_optimizer(self, model: PreTrainedModel):
        recipe = self.recipe
        optimizer = torch.optim.AdamW(
            parameter_groups(model, recipe.optimizer.weight_decay),
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
            train_loader = StreamLoader(data.train, plan.micro_batch, collate, self.accelerator.device, gather_object,
                                        reader_timeout=recipe.data.reader_timeout)
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


def lock_output(recipe: Recipe, state: PartialState) -> tuple[Path, int] | None:
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


def check_paths(recipe: Recipe) -> None:
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


def same_source(a: str, b: str | None) -> bool:
    """Whether two model keys name the same checkpoint: one directory however spelled, or one hub id."""
    pa, pb = Path(a).expanduser(), Path(b or "").expanduser()
    return b is not None and (pa.resolve() == pb.resolve() if pa.exists() and pb.exists() else a == b)


def accelerator_available() -> bool:
    accelerator_api = getattr(torch, "accelerator", None)
    if accelerator_api is not None:
        return bool(accelerator_api.is_available())
    return torch.cuda.is_available()


def setup_tasks(recipe: Recipe, accelerator: Accelerator) -> tuple[TaskSettings | None, Any]:
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


def check_lora_distribution(recipe: Recipe, distributed_type: DistributedType) -> None:
    """LoRA runs on one process or DDP: the adapters are merged into full, unsharded weights before saving."""
    if recipe.train.params == "lora" and distributed_type in (
        DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM
    ):
        raise GQAError(
            f"train.params: lora does not run under {distributed_type.value} (sharded weights cannot be merged in "
            "place); LoRA keeps the frozen weights in 16 bits, so a 7B model fits one 24 GB GPU: launch on one "
            "process, or with the accelerate/ddp config"
        )


def parameter_groups(model: PreTrainedModel, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: decaying norms and biases pulls them away from their role."""
    # Under ZeRO-3 (zero.Init) a parameter's own data is an empty placeholder; ds_shape is its real shape.
    decay = [p for p in model.parameters() if p.requires_grad and len(getattr(p, "ds_shape", p.shape)) >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and len(getattr(p, "ds_shape", p.shape)) < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
