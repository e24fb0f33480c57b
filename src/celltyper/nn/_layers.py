"""Reusable layers."""

from __future__ import annotations

from torch import Tensor, nn

from ._functional import grad_reverse


class GradientReversal(nn.Module):
    """Gradient reversal layer (Ganin & Lempitsky 2015) with a settable weight."""

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = weight

    def forward(self, x: Tensor) -> Tensor:
        return grad_reverse(x, self.weight)


class DomainAdversary(nn.Module):
    """``Linear(n_input, n_hidden) -> ReLU -> Linear(n_hidden, n_domains)`` behind a reversal.

    Training the adversary to predict the domain while the reversed gradient reaches the
    upstream network pushes that network towards domain-invariant features.
    """

    def __init__(self, n_input: int, n_domains: int, n_hidden: int = 256):
        super().__init__()
        self.reversal = GradientReversal()
        self.layers = nn.Sequential(
            nn.Linear(n_input, n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_domains)
        )

    def forward(self, h: Tensor, reversal_weight: float = 1.0) -> Tensor:
        self.reversal.weight = reversal_weight
        return self.layers(self.reversal(h))
