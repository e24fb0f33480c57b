"""Stateless building blocks shared by the celltyper modules and training plans."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

CPM_TARGET_SUM = 1e6


def log1p_normalize(x: Tensor, target_sum: float | None = CPM_TARGET_SUM) -> Tensor:
    """Scale each row of ``x`` to ``target_sum`` (or the mean row total) and apply ``log1p``.

    Parameters
    ----------
    x
        Non-negative expression, cells x genes.
    target_sum
        Total each cell is scaled to; ``None`` scales to the mean total of the minibatch.
    """
    totals = x.sum(dim=1, keepdim=True)
    # Cells without a single count stay at zero instead of turning into NaN.
    totals = torch.where(totals > 0, totals, torch.ones_like(totals))
    scale = target_sum if target_sum is not None else totals.mean()
    return torch.log1p(x / totals * scale)


def drop_values_augmentation(x_log: Tensor, rate: float = 0.1) -> Tensor:
    """scNym's augmentation: drop a fraction of the values of log1p-normalised profiles.

    ``expm1`` -> elementwise dropout of ``rate`` of the entries -> rescale each cell back to
    its own total before the dropout (1e6 for CPM over the modelled genes) -> ``log1p``.
    Keeping each cell's total, rather than forcing 1e6, keeps profiles normalised by the
    whole-transcriptome library size on their scale.
    """
    if rate <= 0:
        return x_log
    expression = torch.expm1(x_log)
    kept = expression * (torch.rand_like(expression) >= rate)
    before = expression.sum(dim=1, keepdim=True)
    after = kept.sum(dim=1, keepdim=True)
    scale = torch.where(after > 0, before / after.clamp_min(1e-12), torch.ones_like(after))
    return torch.log1p(kept * scale)


def sharpen(probabilities: Tensor, temperature: float) -> Tensor:
    """Sharpen a categorical distribution: ``p ** (1/T)``, renormalised per row."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    powered = probabilities.clamp_min(1e-12) ** (1.0 / temperature)
    return powered / powered.sum(dim=1, keepdim=True)


def sample_dominant_mixup_lambda(n: int, alpha: float, device: torch.device | str) -> Tensor:
    """Per-sample mixup weights ``max(l, 1 - l)`` with ``l ~ Beta(alpha, alpha)``.

    Keeping the weight of the original sample >= 0.5 makes the mixed sample keep the
    identity of its first argument (MixMatch's modification of mixup).
    """
    if alpha <= 0:
        return torch.ones(n, device=device)
    beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))
    lam = beta.sample((n,)).to(device)
    return torch.maximum(lam, 1.0 - lam)


def mixup(x: Tensor, y: Tensor, x_other: Tensor, y_other: Tensor, lam: Tensor):
    """Convex combination ``lam * (x, y) + (1 - lam) * (x_other, y_other)`` per sample."""
    lam = lam.view(-1, 1)
    return lam * x + (1.0 - lam) * x_other, lam * y + (1.0 - lam) * y_other


def soft_cross_entropy(logits: Tensor, target_probabilities: Tensor) -> Tensor:
    """Mean cross-entropy against soft targets."""
    return -(target_probabilities * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def linear_ramp(epoch: float, ramp_epochs: float, max_value: float = 1.0, burn_in: float = 0):
    """Weight rising linearly from 0 (until ``burn_in``) to ``max_value`` after ``ramp_epochs``."""
    if ramp_epochs <= 0:
        return max_value
    progress = (epoch - burn_in) / ramp_epochs
    return max_value * float(min(max(progress, 0.0), 1.0))


def sigmoid_ramp(epoch: float, ramp_epochs: float, max_value: float = 1.0) -> float:
    """Laine & Aila's sigmoid-shaped ramp-up ``max * exp(-5 (1 - t)^2)``, t = epoch / ramp."""
    if ramp_epochs <= 0:
        return max_value
    t = min(max(epoch / ramp_epochs, 0.0), 1.0)
    return max_value * math.exp(-5.0 * (1.0 - t) ** 2)


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: float) -> Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        return -ctx.weight * grad_output, None


def grad_reverse(x: Tensor, weight: float = 1.0) -> Tensor:
    """Identity in the forward pass; multiplies the gradient by ``-weight`` going back."""
    return _GradientReversal.apply(x, weight)


def labelled_cross_entropy(
    logits: Tensor, labels: Tensor, labelled: Tensor, weight: Tensor | None = None
) -> Tensor:
    """Cross-entropy over the labelled cells of a minibatch; 0 (with a graph) if none are.

    Keeping the zero attached to ``logits`` lets a minibatch without labelled cells go
    through the optimiser step like any other.
    """
    if not labelled.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[labelled], labels[labelled], weight=weight)
