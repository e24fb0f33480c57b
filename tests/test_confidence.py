"""Temperature scaling, novelty scores and the shift-adapted threshold, by hand."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import log_softmax

from celltyper._utils._confidence import (
    class_gaussians,
    energy_score,
    fit_temperature,
    knn_distance_score,
    mahalanobis_score,
    max_probability_score,
    shift_adapted_thresholds,
)


def _nll(logits, labels, temperature):
    return -log_softmax(logits / temperature, axis=1)[np.arange(len(labels)), labels].mean()


def test_fit_temperature_minimises_the_nll_and_softens_overconfidence():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 400)
    # Right 70 % of the time, with logits that claim ~100 %: overconfident.
    predicted = np.where(rng.random(400) < 0.7, labels, (labels + 1) % 3)
    logits = 10.0 * np.eye(3)[predicted] + rng.normal(0, 0.1, (400, 3))
    temperature = fit_temperature(logits, labels)
    assert temperature > 2.0
    grid = np.exp(np.linspace(np.log(0.01), np.log(100), 2001))
    best = grid[np.argmin([_nll(logits, labels, t) for t in grid])]
    assert temperature == pytest.approx(best, rel=0.01)
    # Predictions are unchanged.
    np.testing.assert_array_equal((logits / temperature).argmax(1), logits.argmax(1))


def test_fit_temperature_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"logits must be .* got shapes \(3, 2\) and \(2,\)"):
        fit_temperature(np.zeros((3, 2)), np.zeros(2, int))


def test_energy_and_max_probability_by_hand():
    logits = np.array([[0.0, np.log(3.0)], [0.0, 0.0]])
    np.testing.assert_allclose(energy_score(logits), [-np.log(4.0), -np.log(2.0)])
    np.testing.assert_allclose(energy_score(logits, temperature=2.0), -2 * np.log([1 + 3**0.5, 2]))
    np.testing.assert_allclose(max_probability_score(np.array([[0.25, 0.75]])), [0.25])


def test_knn_distance_by_hand():
    reference = np.array([[0.0], [1.0], [10.0]])
    scores = knn_distance_score(np.array([[0.0], [5.0]]), reference, n_neighbors=2)
    np.testing.assert_allclose(scores, [0.5, 4.5])


def test_mahalanobis_is_the_distance_to_the_closest_class():
    latent = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 0.0], [12.0, 0.0]])
    means, precision = class_gaussians(latent, np.array([0, 0, 1, 1]), 2)
    np.testing.assert_allclose(means, [[1.0, 0.0], [11.0, 0.0]])
    # Identity precision: the squared Euclidean distance to the closest mean.
    scores = mahalanobis_score(np.array([[1.0, 3.0], [9.0, 0.0]]), means, np.eye(2))
    np.testing.assert_allclose(scores, [9.0, 4.0])
    # A degenerate latent dimension (all zeros) stays invertible.
    assert np.isfinite(precision).all()


def test_shift_adapted_threshold_follows_a_shifted_batch_only():
    rng = np.random.default_rng(1)
    # Distances: log-normal, a shifted batch multiplies them (on a log scale: +3, x2).
    reference = np.exp(rng.normal(0, 1, 2000))
    threshold = float(np.quantile(reference, 0.95))
    same = np.exp(rng.normal(0, 1, 1000))
    shifted = np.exp(rng.normal(3, 2, 1000))
    small = np.exp(rng.normal(3, 1, 20))
    scores = np.concatenate([same, shifted, small])
    groups = np.repeat([0, 1, 2], [1000, 1000, 20])
    thresholds = shift_adapted_thresholds(scores, groups, threshold, reference)
    flagged = scores > thresholds
    assert flagged[groups == 0].mean() == pytest.approx(0.05, abs=0.02)
    assert flagged[groups == 1].mean() == pytest.approx(0.05, abs=0.03)
    # A group too small to estimate its shift keeps the reference threshold.
    np.testing.assert_allclose(thresholds[groups == 2], threshold)
    # A type the reference lacks, a tenth of a shifted batch, stays flagged.
    novel = np.exp(rng.normal(3 + 2 * 4, 1, 111))
    mixed = np.concatenate([shifted, novel])
    flags = mixed > shift_adapted_thresholds(mixed, np.zeros(len(mixed)), threshold, reference)
    assert flags[1000:].mean() > 0.9 and flags[:1000].mean() < 0.1
    # Scores that may be negative (energies) shift without the log scale.
    energies = rng.normal(-10, 1, 2000)
    cut = float(np.quantile(energies, 0.95))
    moved = shift_adapted_thresholds(energies + 5, np.zeros(2000), cut, energies)
    assert ((energies + 5) > moved).mean() == pytest.approx(0.05, abs=0.02)
    # The threshold never drops below the calibrated one.
    lower = shift_adapted_thresholds(scores / 100, groups, threshold, reference)
    np.testing.assert_allclose(lower, threshold)
