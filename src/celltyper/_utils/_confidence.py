"""Confidence calibration and novelty scores from a classifier's logits and latent space.

Pure functions on arrays, shared by every model (``model.base._confidence``) and the
benchmarks. A novelty score is higher for a cell less like the labelled reference.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, logsumexp
from sklearn.neighbors import NearestNeighbors

#: Temperatures searched by :func:`fit_temperature` (log-uniform bounds).
TEMPERATURE_BOUNDS = (0.01, 100.0)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature ``T`` minimising the negative log-likelihood of ``softmax(logits / T)``.

    Temperature scaling (Guo et al., 2017) keeps every prediction and rescales its
    confidence. ``labels`` are the true class codes (columns of ``logits``).
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=int)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(
            f"logits must be (n_cells, n_classes) with one label per cell, got shapes "
            f"{logits.shape} and {labels.shape}."
        )
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t), axis=1)[rows, labels].mean())

    low, high = np.log(TEMPERATURE_BOUNDS)
    result = minimize_scalar(nll, bounds=(low, high), method="bounded")
    return float(np.exp(result.x))


def energy_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Free energy ``-T logsumexp(logits / T)`` (Liu et al., 2020); higher is more novel."""
    logits = np.asarray(logits, dtype=np.float64)
    return -temperature * logsumexp(logits / temperature, axis=1)


def max_probability_score(probabilities: np.ndarray) -> np.ndarray:
    """``1 - max p``: the classifier's own doubt."""
    return 1.0 - np.asarray(probabilities).max(axis=1)


def knn_index(reference_latent: np.ndarray, n_neighbors: int = 15) -> NearestNeighbors:
    """The neighbour index of :func:`knn_distance_score`, to fit once and reuse."""
    k = min(n_neighbors, len(reference_latent))
    return NearestNeighbors(n_neighbors=k).fit(np.asarray(reference_latent, dtype=np.float32))


def knn_distance_score(
    latent: np.ndarray,
    reference_latent: np.ndarray,
    n_neighbors: int = 15,
    index: NearestNeighbors | None = None,
) -> np.ndarray:
    """Mean Euclidean distance of each cell to its nearest labelled reference cells
    (``index``: :func:`knn_index` of ``reference_latent``, fitted here when ``None``)."""
    if index is None:
        index = knn_index(reference_latent, n_neighbors)
    distances, _ = index.kneighbors(np.asarray(latent, dtype=np.float32))
    return distances.mean(axis=1)


def class_gaussians(
    latent: np.ndarray, labels: np.ndarray, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Class means and the shared (tied) precision matrix of a labelled latent space.

    A class without cells gets the overall mean; the covariance is shrunk slightly
    towards its diagonal so that a degenerate latent dimension stays invertible.
    """
    latent = np.asarray(latent, dtype=np.float64)
    labels = np.asarray(labels, dtype=int)
    overall = latent.mean(axis=0)
    means = np.stack(
        [
            latent[labels == c].mean(axis=0) if (labels == c).any() else overall
            for c in range(n_classes)
        ]
    )
    centred = latent - means[labels]
    covariance = centred.T @ centred / max(len(latent) - 1, 1)
    scale = max(float(np.trace(covariance)) / len(covariance), 1e-6)
    covariance = 0.99 * covariance + 0.01 * scale * np.eye(len(covariance))
    return means, np.linalg.pinv(covariance)


def precision_factor(precision: np.ndarray) -> np.ndarray:
    """``F`` with ``F @ F.T == precision`` (symmetric, positive semi-definite): squared
    Mahalanobis distances become squared Euclidean distances after ``x @ F``."""
    precision = np.asarray(precision, dtype=np.float64)
    values, vectors = np.linalg.eigh(0.5 * (precision + precision.T))
    return vectors * np.sqrt(np.clip(values, 0.0, None))


def mahalanobis_score(
    latent: np.ndarray,
    means: np.ndarray,
    precision: np.ndarray,
    factor: np.ndarray | None = None,
) -> np.ndarray:
    """Squared Mahalanobis distance to the closest class (Lee et al., 2018).

    Computed as Euclidean distances after one product with :func:`precision_factor`
    (``factor``, computed here when ``None``): a matrix product per cell instead of one
    per cell and class.
    """
    if factor is None:
        factor = precision_factor(precision)
    projected = np.asarray(latent, dtype=np.float64) @ factor
    centres = np.asarray(means, dtype=np.float64) @ factor
    # |p - c|^2 = |p|^2 - 2 p.c + |c|^2: one product for every class at once.
    squared = (centres * centres).sum(axis=1) - 2.0 * (projected @ centres.T)
    best = squared.min(axis=1) + np.einsum("nd,nd->n", projected, projected)
    return np.clip(best, 0.0, None)


def _tail_transform(reference_scores: np.ndarray):
    """log(x + eps) for scores that are never negative (distances, 1 - max p), else x.

    Distances grow multiplicatively under a batch shift; on a log scale the shift of a
    batch's bulk is nearly a translation.
    """
    if reference_scores.min() < 0:
        return (lambda x: x), (lambda x: x)
    eps = max(1e-3 * float(np.median(reference_scores)), 1e-9)
    return (lambda x: np.log(np.asarray(x, dtype=np.float64) + eps)), (lambda x: np.exp(x) - eps)


def _median_and_upper_spread(scores: np.ndarray) -> tuple[float, float]:
    median, q75 = np.quantile(scores, [0.5, 0.75])
    return float(median), float(max(q75 - median, 1e-12))


def shift_adapted_thresholds(
    scores: np.ndarray,
    groups: np.ndarray,
    threshold: float,
    reference_scores: np.ndarray,
    min_group_size: int = 50,
) -> np.ndarray:
    """Per-cell novelty thresholds that follow each group's shift from the reference.

    A query batch from another technology or condition scores higher as a whole, so a
    ``threshold`` calibrated on held-out reference cells (``reference_scores``) flags
    most of it. Each group (batch) of at least ``min_group_size`` cells moves the
    threshold with the shift of its bulk and stretches its margin with the group's
    spread: ``median_g + (threshold - median_ref) * max(1, spread_g / spread_ref)``,
    with spread the 75th percentile minus the median, on a log scale for scores that
    are never negative; never below ``threshold``. A type the reference lacks that
    makes up a fraction ``f`` of its batch moves the batch's quartile to the known
    cells' ``0.75 / (1 - f)`` quantile: up to about a tenth of the batch its cells stay
    flagged, a larger share raises the threshold towards them (their scores still
    rank them). Smaller groups keep ``threshold``.
    """
    reference_scores = np.asarray(reference_scores, dtype=np.float64)
    forward, inverse = _tail_transform(reference_scores)
    transformed = forward(scores)
    cut = float(forward(threshold))
    location, spread = _median_and_upper_spread(forward(reference_scores))
    out = np.full(len(transformed), float(threshold))
    for group in np.unique(groups):
        members = groups == group
        if members.sum() < min_group_size:
            continue
        group_location, group_spread = _median_and_upper_spread(transformed[members])
        adapted = group_location + (cut - location) * max(1.0, group_spread / spread)
        out[members] = max(float(threshold), float(inverse(adapted)))
    return out
