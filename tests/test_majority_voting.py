"""Over-clustering and majority voting (CellTypist's refinement), by hand."""

from __future__ import annotations

import numpy as np

from celltyper._utils._clusters import (
    default_over_clustering_resolution,
    majority_vote,
    over_cluster,
)


def test_majority_vote_by_hand():
    labels = np.array(["A", "A", "B", "B", "B", "C", "A", "B"])
    clusters = np.array(["0", "0", "0", "1", "1", "1", "2", "2"])
    # Cluster 2 ties A/B: the first label in sorted order wins.
    expected = ["A", "A", "A", "B", "B", "B", "A", "A"]
    np.testing.assert_array_equal(majority_vote(labels, clusters), expected)


def test_over_clusters_separate_groups_and_repeat_with_the_seed():
    rng = np.random.default_rng(0)
    centres = np.repeat(np.eye(4) * 20, 60, axis=0)
    latent = centres + rng.normal(0, 1, centres.shape)
    clusters = over_cluster(latent, resolution=1.0)
    truth = np.repeat(np.arange(4), 60)
    # No cluster mixes two groups.
    for cluster in np.unique(clusters):
        assert len(np.unique(truth[clusters == cluster])) == 1
    np.testing.assert_array_equal(clusters, over_cluster(latent, resolution=1.0))


def test_majority_voting_fixes_isolated_errors():
    rng = np.random.default_rng(1)
    latent = np.repeat(np.eye(2) * 20, 100, axis=0) + rng.normal(0, 1, (200, 2))
    truth = np.repeat(["A", "B"], 100)
    noisy = truth.copy()
    noisy[rng.choice(200, 20, replace=False)] = "C"
    voted = majority_vote(noisy, over_cluster(latent, resolution=0.5))
    assert (voted == truth).mean() > (noisy == truth).mean()
    assert (voted == truth).all()


def test_resolution_grows_with_the_cells():
    sizes = [1_000, 10_000, 30_000, 50_000, 150_000, 1_000_000]
    resolutions = [default_over_clustering_resolution(n) for n in sizes]
    assert resolutions == sorted(resolutions) and resolutions[0] == 5.0
