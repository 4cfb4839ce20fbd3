"""The losses of uptraining: language modelling, and distillation from the source model.

Distillation (documented in the recipe as loss.kind: distill):

    loss = (1 - w) * LM + w * T^2 * KL(softmax(teacher / T) || softmax(student / T))

with the KL summed over the vocabulary and averaged over the predicted tokens (those whose label
is not -100), w = loss.distill_weight and T = loss.temperature. The T^2 keeps the soft-target
gradients on the same scale as the LM gradients whatever the temperature (Hinton et al. 2015).

In training the average is over the global batch: both terms are summed over a micro batch's
tokens and divided by the global batch's predicted tokens (num_items), so that how the batch is
split into micro batches and processes does not change the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gqa.convert.perplexity import IGNORE_INDEX, next_token_losses


def shift_for_next_token(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position t predicts token t + 1: drop the last logit and the first label; flatten."""
    return logits[:, :-1, :].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items: int | None = None) -> torch.Tensor:
    """Next-token cross-entropy summed over the predicted tokens, divided by num_items (None: their number).

    What the HF models compute, with num_items as their num_items_in_batch.
    """
    nll, counted = next_token_losses(logits, labels)  # the held-out loss's own per-token sums
    return nll.sum() / (counted.sum().clamp(min=1) if num_items is None else num_items)


def distillation_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float,
    num_items: int | None = None,
) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T), summed over the vocabulary and the predicted tokens, over num_items
    (None: the number of predicted tokens)."""
    student, flat_labels = shift_for_next_token(student_logits, labels)
    teacher, _ = shift_for_next_token(teacher_logits, labels)
    keep = flat_labels != IGNORE_INDEX
    student_logp = F.log_softmax(student[keep].float() / temperature, dim=-1)
    teacher_logp = F.log_softmax(teacher[keep].float() / temperature, dim=-1)
    if num_items is None:
        num_items = keep.sum().clamp(min=1)
    kl = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum") / num_items
    return kl * temperature**2


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float, weight: float,
    num_items: int | None = None,
) -> torch.Tensor:
    """(1 - weight) * LM + weight * T^2 * KL(teacher || student), see the module docstring.

    num_items: what the token sums are divided by (the global batch's predicted tokens); None: this batch's.
    """
    lm = lm_loss(student_logits, labels, num_items)
    if weight == 0:
        return lm
    return (1 - weight) * lm + weight * distillation_kl(student_logits, teacher_logits, labels, temperature, num_items)
