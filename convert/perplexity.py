"""Held-out loss and perplexity, one way for the training loop and `gqa eval`.

Each window is scored on its own: position t predicts token t + 1, so a window's first token is
never predicted, and labels of IGNORE_INDEX (padding) are not counted. Losses are summed over the
predicted tokens and divided by their number: perplexity is exp(total NLL / predicted tokens),
token-weighted however the windows are batched or spread over processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # a label the loss skips (transformers' and torch's convention)


def next_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window: the summed next-token NLL and the number of tokens predicted."""
    batch, length, vocab = logits.shape
    targets = labels[:, 1:]
    per_token = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, vocab), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(batch, length - 1)
    counted = targets != IGNORE_INDEX
    return (per_token * counted).sum(dim=1), counted.sum(dim=1)


def window_losses(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward pass over a batch of windows: the logits, and per window the summed NLL and the
    number of predicted tokens. Labels default to the windows themselves."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    nll, counted = next_token_losses(logits, input_ids if labels is None else labels)
    return logits, nll, counted


@torch.no_grad()
def summed_loss(model, batches: Iterable[dict], gather: Callable | None = None) -> tuple[float, int]:
    """Summed NLL and predicted tokens over batches of windows (dicts of input_ids, and optionally
    attention_mask and labels). `gather` (accelerate's gather_for_metrics) adds every process's share."""
    total, tokens = 0.0, 0
    for batch in batches:
        _, nll, counted = window_losses(model, **batch)
        if gather is not None:
            nll, counted = gather((nll, counted))
        total += nll.double().sum().item()
        tokens += int(counted.sum().item())
    return total, tokens


def perplexity(mean_nll: float) -> float:
    """exp of the mean NLL, capped so a diverged model reports a huge number instead of overflowing."""
    return math.exp(min(mean_nll, 700.0))
