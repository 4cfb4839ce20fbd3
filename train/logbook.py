"""A run's log: the training window between log lines, metrics.jsonl, and the trackers' configuration."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from gqa.train.plan import TrainingPlan
from gqa.train.recipe import Recipe, flat_items


class RunLogging:
    """Log lines and metrics.jsonl rows of a run (mixed into gqa.train.loop._Run)."""

    def _log_window(self, window: Window, step: int, bar) -> None:
        values = window.summary()
        values["lr"] = self.scheduler.get_last_lr()[0]
        values["tokens_seen"] = self.progress.tokens_seen
        self.accelerator.log({f"train/{k}": v for k, v in values.items()}, step=step)
        if self.main:
            self._append_metrics({"step": step, **values})
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}", tok_s=f"{values['tokens_per_second']:.0f}")
        window.reset()

    def _append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


@dataclass
class Window:
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


def tracker_config(recipe: Recipe, plan: TrainingPlan) -> dict[str, Any]:
    """Flat scalars: what tensorboard's hparams accept."""
    flat = flat_items(recipe.model_dump(mode="json")) | {f"plan.{k}": v for k, v in plan.as_dict().items()}
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}
