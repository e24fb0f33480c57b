"""Layers and losses for variational autoencoders with categorical covariates."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from scvi.nn import Embedding
from torch import Tensor, nn

CovariateRepresentation = Literal["embedding", "one-hot"]

#: Bandwidths (squared length scales) of the multi-kernel RBF MMD, as in scArches/trVAE.
MMD_BANDWIDTHS = (1e-2, 1e-1, 1.0, 10.0, 100.0)


class CovariateDecoder(nn.Module):
    """MLP decoder conditioned on categorical covariates: ``z`` + covariates -> genes.

    Each covariate (e.g. the batch, then further categorical covariates) has a table of
    one row per category, a :class:`scvi.nn.Embedding`, so that scArches surgery
    (scvi-tools' ``ArchesMixin``) appends rows for a query's new categories. With
    ``representation="embedding"`` the rows are learned vectors of length
    ``embedding_dim`` concatenated to ``z``; with ``"one-hot"`` the covariate enters the
    first layer as a one-hot vector, which is computed as adding the category's row of an
    ``(n_categories, n_hidden)`` table (the one-hot part of the first layer's weight
    matrix) -- the same function, stored so that new categories append rows.
    :meth:`freeze_leading_rows` keeps the reference's rows of each table fixed.

    The outputs are gene proportions (softmax), and, when asked for, gene-cell dispersion
    (``exp`` of a linear layer) and zero-inflation logits.

    Parameters
    ----------
    n_latent
        Dimension of ``z``.
    n_output
        Number of genes.
    n_categories
        Number of categories of each covariate.
    n_hidden
        Width of the hidden layers.
    n_layers
        Number of hidden layers (>= 1), each Linear -> BatchNorm -> ReLU -> Dropout.
    dropout_rate
        Dropout after each hidden layer.
    representation
        ``"embedding"`` or ``"one-hot"``.
    embedding_dim
        Length of the learned covariate vectors (``"embedding"`` only).
    dispersion, zero_inflation
        Build the dispersion / zero-inflation outputs.
    """

    def __init__(
        self,
        n_latent: int,
        n_output: int,
        n_categories: Sequence[int],
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        representation: CovariateRepresentation = "embedding",
        embedding_dim: int = 8,
        dispersion: bool = True,
        zero_inflation: bool = True,
    ):
        super().__init__()
        if representation not in ("embedding", "one-hot"):
            raise ValueError(
                f"representation must be 'embedding' or 'one-hot', got {representation!r}."
            )
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}.")
        self.representation = representation
        n_categories = [int(n) for n in n_categories]
        if representation == "embedding":
            # Rows drawn from N(0, 1), torch's initialisation of an embedding.
            tables = [Embedding(n, embedding_dim) for n in n_categories]
            n_first_in = n_latent + embedding_dim * len(n_categories)
        else:
            # Same initial scale as a Linear layer over [z, one-hot vectors].
            bound = 1.0 / math.sqrt(n_latent + sum(n_categories))
            tables = [
                Embedding(n, n_hidden, _weight=torch.empty(n, n_hidden).uniform_(-bound, bound))
                for n in n_categories
            ]
            n_first_in = n_latent
        self.covariates = nn.ModuleList(tables)
        self.n_frozen_rows = [0] * len(tables)
        self.first = nn.Linear(n_first_in, n_hidden)
        self.first_post = _post_linear(n_hidden, dropout_rate)
        self.hidden = nn.Sequential(
            *[
                nn.Sequential(nn.Linear(n_hidden, n_hidden), _post_linear(n_hidden, dropout_rate))
                for _ in range(n_layers - 1)
            ]
        )
        self.scale = nn.Linear(n_hidden, n_output)
        self.dispersion = nn.Linear(n_hidden, n_output) if dispersion else None
        self.zero_inflation = nn.Linear(n_hidden, n_output) if zero_inflation else None

    def freeze_leading_rows(self, counts: Sequence[int]) -> None:
        """Give the first ``counts[i]`` rows of covariate table ``i`` no gradient.

        The rows are detached in the forward pass, which leaves their gradient exactly
        zero, so an Adam step without weight decay keeps them bit-identical; 0 lets every
        row of a table learn. (Not scvi's gradient hook of ``Embedding.extend``: scvi's
        ``Embedding`` replaces its parameter, hooks included, on ``load_state_dict``, as
        when the best weights are restored.)
        """
        counts = [int(n) for n in counts]
        if len(counts) != len(self.covariates) or any(
            not 0 <= n <= t.num_embeddings for n, t in zip(counts, self.covariates, strict=True)
        ):
            sizes = [t.num_embeddings for t in self.covariates]
            raise ValueError(f"counts must be one count per table within {sizes}, got {counts}.")
        self.n_frozen_rows = counts

    def covariate_rows(self, i: int, codes: Tensor) -> Tensor:
        """Rows of covariate table ``i`` for ``codes``, the frozen rows detached."""
        weight, n = self.covariates[i].weight, self.n_frozen_rows[i]
        if n:
            weight = torch.cat([weight[:n].detach(), weight[n:]], dim=0)
        return F.embedding(codes.view(-1).long(), weight)

    def forward(self, z: Tensor, codes: Sequence[Tensor]) -> dict[str, Tensor]:
        """Decode ``z`` given one code tensor per covariate.

        Returns
        -------
        ``{"scale": proportions, "dispersion": theta, "zi_logits": logits}`` (the last two
        only when built), each ``(n_cells, n_output)``.
        """
        if len(codes) != len(self.covariates):
            raise ValueError(f"Expected {len(self.covariates)} covariate codes, got {len(codes)}.")
        rows = [self.covariate_rows(i, c) for i, c in enumerate(codes)]
        if self.representation == "embedding":
            h = self.first(torch.cat([z, *rows], dim=-1))
        else:
            h = self.first(z) + torch.stack(rows).sum(0) if rows else self.first(z)
        h = self.hidden(self.first_post(h))
        out = {"scale": torch.softmax(self.scale(h), dim=-1)}
        if self.dispersion is not None:
            out["dispersion"] = torch.exp(self.dispersion(h).clamp(max=15.0))
        if self.zero_inflation is not None:
            out["zi_logits"] = self.zero_inflation(h)
        return out


def _post_linear(n_hidden: int, dropout_rate: float) -> nn.Sequential:
    # BatchNorm settings of scvi-tools' FCLayers, so encoder and decoder behave alike.
    return nn.Sequential(
        nn.BatchNorm1d(n_hidden, momentum=0.01, eps=1e-3), nn.ReLU(), nn.Dropout(dropout_rate)
    )


def rbf_mmd(x: Tensor, y: Tensor, bandwidths: Sequence[float] = MMD_BANDWIDTHS) -> Tensor:
    """Squared maximum mean discrepancy between samples ``x`` and ``y`` (biased estimate).

    The kernel is a sum of Gaussian kernels ``exp(-||a - b||^2 / (2 * s))`` over the
    ``bandwidths`` ``s``, so no single length scale has to fit every latent geometry.
    """

    def kernel(a: Tensor, b: Tensor) -> Tensor:
        d2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-d2 / (2.0 * s)) for s in bandwidths)

    return kernel(x, x).mean() + kernel(y, y).mean() - 2.0 * kernel(x, y).mean()


def group_mmd(z: Tensor, groups: Tensor, min_cells: int = 2) -> Tensor:
    """Mean MMD between each group's cells and the remaining cells of a minibatch.

    Groups (or complements) with fewer than ``min_cells`` cells are skipped; with fewer than
    two usable groups the result is 0 (with a gradient path, so it can be added to a loss).
    """
    groups = groups.view(-1)
    terms = []
    for g in torch.unique(groups):
        inside = groups == g
        n_in = int(inside.sum())
        if n_in < min_cells or len(groups) - n_in < min_cells:
            continue
        terms.append(rbf_mmd(z[inside], z[~inside]))
    if not terms:
        return z.sum() * 0.0
    return torch.stack(terms).mean()
