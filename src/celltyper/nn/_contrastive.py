"""CELLULAR's contrastive losses (Andrekson & Mercado), as pure functions of a minibatch.

Every function takes the embeddings ``z`` (cells x dimensions) of one minibatch and
integer codes (cell types, batches) of its cells, and returns a scalar tensor that is
differentiable with respect to ``z`` (zero, still attached to ``z``, when nothing in the
minibatch qualifies, so a training step never has to special-case it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _zero(z: Tensor) -> Tensor:
    # Attached to the graph, so backward() works on a minibatch where nothing qualifies.
    return z.sum() * 0.0


def _cosine_logits(z: Tensor, temperature: float | Tensor) -> Tensor:
    """Cosine similarities divided by the temperature, self-pairs set to ``-inf``."""
    unit = F.normalize(z, dim=1)
    logits = unit @ unit.T / temperature
    self_pair = torch.eye(len(z), dtype=torch.bool, device=z.device)
    return logits.masked_fill(self_pair, float("-inf"))


def _inverse_frequency(groups: Tensor) -> Tensor:
    """Per-element weight ``1 / count(group)``, normalised to mean 1."""
    _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    weights = 1.0 / counts[inverse].float()
    return weights / weights.mean()


def _log_ratio(logits: Tensor, positive: Tensor, candidate: Tensor) -> Tensor:
    """``log(sum_pos exp(s) / sum_candidates exp(s))`` per row (rows need a positive)."""
    neg_inf = torch.full_like(logits, float("-inf"))
    log_pos = torch.logsumexp(torch.where(positive, logits, neg_inf), dim=1)
    log_all = torch.logsumexp(torch.where(candidate, logits, neg_inf), dim=1)
    return log_pos - log_all


def supervised_soft_nn_loss(
    z: Tensor,
    labels: Tensor,
    temperature: float | Tensor,
    class_weights: Tensor | None = None,
) -> Tensor:
    """Supervised soft-nearest-neighbour loss: cells of a type pull together.

    With ``s_ij = cos(z_i, z_j) / temperature``, the loss of anchor ``i`` is

    ``l_i = -log( sum_{j != i, y_j = y_i} exp(s_ij) / sum_{k != i} exp(s_ik) )``.

    Anchors without another cell of their type in the minibatch are skipped. Anchor ``i``
    is weighted by ``w_{y_i}``, by default the inverse frequency of its type among the
    anchors used (so rare types weigh as much as common ones); the weights are normalised
    to mean 1 over those anchors and the loss is ``mean_i(w_i l_i)``.

    Parameters
    ----------
    z
        Embeddings, ``(n, d)``.
    labels
        Cell-type codes, ``(n,)``.
    temperature
        Divides the cosine similarities; smaller values sharpen the neighbourhoods.
    class_weights
        Weight per cell-type code, ``(n_types,)``; ``None`` uses inverse frequencies.

    Returns
    -------
    Scalar loss (0 when no anchor has a positive).
    """
    labels = labels.view(-1)
    logits = _cosine_logits(z, temperature)
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(z), dtype=torch.bool, device=z.device)
    anchors = positive.any(dim=1)
    if not anchors.any():
        return _zero(z)
    candidate = ~torch.eye(len(z), dtype=torch.bool, device=z.device)
    losses = -_log_ratio(logits[anchors], positive[anchors], candidate[anchors])
    if class_weights is None:
        weights = _inverse_frequency(labels[anchors])
    else:
        weights = class_weights.to(z.device)[labels[anchors]].float()
        weights = weights / weights.mean()
    return (weights * losses).mean()


def batch_mixing_loss(
    z: Tensor,
    labels: Tensor,
    batches: Tensor,
    temperature: float | Tensor = 0.5,
    batch_weights: Tensor | None = None,
) -> Tensor:
    """Batch-mixing loss: within a cell type, a cell's batch should not be recognisable.

    Only cells of one type are compared. For anchor ``i`` of type ``c``, the positives are
    the other cells of ``c`` from the anchor's batch and the candidates are all other cells
    of ``c``; ``r_i = sum_pos exp(s_ij) / sum_candidates exp(s_ik)`` is the soft-NN
    same-batch ratio (``s`` as in :func:`supervised_soft_nn_loss`). If batches were
    indistinguishable, ``r_i`` would be the share of same-batch cells among the
    candidates, ``pi_i = n_pos / n_candidates``. The loss of the anchor is the hinge

    ``l_i = max(0, log r_i - log pi_i)``,

    i.e. how much more its own batch attracts it than chance. This inverts the soft-NN
    loss (``-log r_i``) so that minimising mixes batches, and it was chosen over the plain
    ``log r_i`` (minus the soft-NN loss) and ``1 / soft-NN``: the plain log-ratio keeps
    rewarding the pushing apart of same-batch cells past the mixed state (its optimum is
    an anti-clustering of batches), and ``1 / soft-NN`` diverges as the soft-NN loss goes
    to 0, with exploding gradients exactly when batches are well separated. The hinge is
    0 once a type is mixed, bounded by ``log(1 / pi_i)``, and its gradient has the scale
    of the soft-NN loss's.

    Anchors with no same-batch partner of their type are skipped, as are cell types seen
    in a single batch. Anchors are weighted by the inverse frequency of their batch among
    the anchors used (or by ``batch_weights``), normalised to mean 1; the result is the
    weighted mean.

    Parameters
    ----------
    z
        Embeddings, ``(n, d)``.
    labels
        Cell-type codes, ``(n,)``.
    batches
        Batch codes, ``(n,)``.
    temperature
        Divides the cosine similarities.
    batch_weights
        Weight per batch code; ``None`` uses inverse frequencies.

    Returns
    -------
    Scalar loss (0 when no cell type has two batches in the minibatch).
    """
    labels, batches = labels.view(-1), batches.view(-1)
    logits = _cosine_logits(z, temperature)
    not_self = ~torch.eye(len(z), dtype=torch.bool, device=z.device)
    same_type = (labels[:, None] == labels[None, :]) & not_self
    same_batch = batches[:, None] == batches[None, :]
    positive = same_type & same_batch
    other_batch = same_type & ~same_batch
    anchors = positive.any(dim=1) & other_batch.any(dim=1)
    if not anchors.any():
        return _zero(z)
    log_r = _log_ratio(logits[anchors], positive[anchors], same_type[anchors])
    n_pos = positive[anchors].sum(dim=1).float()
    n_candidates = same_type[anchors].sum(dim=1).float()
    losses = torch.relu(log_r - torch.log(n_pos / n_candidates))
    if batch_weights is None:
        weights = _inverse_frequency(batches[anchors])
    else:
        weights = batch_weights.to(z.device)[batches[anchors]].float()
        weights = weights / weights.mean()
    return (weights * losses).mean()


def _pairwise_distances(points: Tensor) -> Tensor:
    """Euclidean distances of the unordered pairs ``i < j`` (upper triangle, row-major)."""
    rows, cols = torch.triu_indices(len(points), len(points), offset=1, device=points.device)
    diff = points[rows] - points[cols]
    # The epsilon keeps the gradient finite when two centroids coincide.
    return torch.sqrt((diff**2).sum(dim=1) + 1e-12)


def centroid_distance_loss(
    z: Tensor, labels: Tensor, target_distances: Tensor, present: Tensor | None = None
) -> Tensor:
    """Centroid-distance loss: keep the layout of cell types that PCA of the input shows.

    The centroids of the cell types present in the minibatch are computed in ``z``; their
    pairwise Euclidean distances (each unordered pair once) are divided by their maximum,
    the target distances of the same pairs are divided by theirs, and the loss is the
    mean squared difference. Dividing both by their maximum makes the loss blind to the
    overall scale of either space, which is arbitrary, and compares only the layout.

    Parameters
    ----------
    z
        Embeddings, ``(n, d)``.
    labels
        Cell-type codes, ``(n,)``, in ``[0, n_types)``.
    target_distances
        Target distances between all cell types, ``(n_types, n_types)`` (e.g. between
        centroids in the PCA of the log-normalised reference).
    present
        Codes of the types to compare; ``None`` takes those in ``labels``.

    Returns
    -------
    Scalar loss (0 with fewer than two types).
    """
    labels = labels.view(-1)
    types = torch.unique(labels) if present is None else torch.unique(present.view(-1))
    types = types[(labels[:, None] == types[None, :]).any(dim=0)]
    if len(types) < 2:
        return _zero(z)
    members = (labels[None, :] == types[:, None]).float()
    centroids = members @ z / members.sum(dim=1, keepdim=True)
    distances = _pairwise_distances(centroids)
    target = target_distances.to(z)[types][:, types]
    rows, cols = torch.triu_indices(len(types), len(types), offset=1, device=z.device)
    target = target[rows, cols]
    distances = distances / distances.max().clamp_min(1e-12)
    target = target / target.max().clamp_min(1e-12)
    return ((distances - target) ** 2).mean()
