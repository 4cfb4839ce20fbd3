"""A run's checkpoints and its result: resuming from a checkpoint (passing over damaged ones), saving one under a
partial name, the LoRA checkpoint hooks, and the final model with its provenance record."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import (
    SAFE_MODEL_NAME, gather_object,
)
from safetensors.torch import load_file
from transformers import AutoConfig

from gqa.convert import __version__
from gqa.convert.errors import GQAError
from gqa.convert.modeldir import (
    DTYPES, apply_umask, config_dtype, now, provenance_of,
)
from gqa.train import rundir
from gqa.train.finalmodel import cast_state_dict, save_final_model
from gqa.train.params import merge_lora
from gqa.train.recipe import Recipe

logger = logging.getLogger(__name__)


class RunCheckpoints:
    """Checkpoint, resume and the final save of a run (mixed into gqa.train.loop._Run)."""

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


def _lora_summary(record: dict[str, Any]) -> str:
    """One line for the model card: what the adapters were and that they are merged."""
    full = f"; {', '.join(record['fully_trained'])} trained fully" if record["fully_trained"] else ""
    return (f"LoRA rank {record['rank']} (alpha {record['alpha']:g}) on {', '.join(record['targets'])}{full}; "
            "adapters merged into the weights")


def _trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def keep_trainable_weights(models: list[torch.nn.Module], weights: list[dict[str, torch.Tensor]], output_dir: str) -> None:
    """accelerate save_state hook (LoRA): the checkpoint keeps the trainable parameters only."""
    for model, state in zip(models, weights):
        keep = _trainable_names(model)
        for name in [name for name in state if name not in keep]:
            del state[name]


def load_trainable_weights(models: list[torch.nn.Module], input_dir: str) -> None:
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


def _output_dtype(recipe: Recipe) -> torch.dtype:
    if recipe.output.dtype != "auto":
        return DTYPES[recipe.output.dtype]
    return config_dtype(AutoConfig.from_pretrained(recipe.model.path), torch.float32)
