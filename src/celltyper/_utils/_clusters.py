"""Over-clustering of a latent space and majority voting, as CellTypist refines labels."""

from __future__ import annotations

import numpy as np
import pandas as pd


def default_over_clustering_resolution(n_cells: int) -> float:
    """Leiden resolution that over-clusters ``n_cells`` cells (CellTypist's scale)."""
    for limit, resolution in ((5_000, 5.0), (20_000, 10.0), (40_000, 15.0), (100_000, 20.0)):
        if n_cells < limit:
            return resolution
    return 25.0 if n_cells < 200_000 else 30.0


def over_cluster(
    latent: np.ndarray,
    resolution: float | None = None,
    n_neighbors: int = 15,
    seed: int = 0,
) -> np.ndarray:
    """Leiden clusters (scanpy, igraph backend) of the cells' latent kNN graph.

    Parameters
    ----------
    latent
        ``(n_cells, n_latent)`` embedding.
    resolution
        Leiden resolution; ``None`` scales with the number of cells
        (:func:`default_over_clustering_resolution`), so that clusters are smaller than
        cell types.
    n_neighbors
        Neighbours of each cell in the graph.
    seed
        Seed of Leiden.

    Returns
    -------
    Cluster code of each cell (strings ``"0"``, ``"1"``, ...).
    """
    import anndata as ad
    import scanpy as sc
    from sklearn.neighbors import kneighbors_graph

    latent = np.asarray(latent, dtype=np.float32)
    if len(latent) <= n_neighbors:
        return np.zeros(len(latent), dtype=int).astype(str)
    if resolution is None:
        resolution = default_over_clustering_resolution(len(latent))
    # A symmetric kNN graph from scikit-learn: scanpy's UMAP weights compile numba code
    # that changes how later torch kernels split their sums (results differ in the last
    # digits), which would break a user's run-to-run reproducibility.
    graph = kneighbors_graph(latent, n_neighbors=n_neighbors, mode="connectivity")
    graph = graph.maximum(graph.T).tocsr()
    work = ad.AnnData(np.zeros((len(latent), 0), dtype=np.float32))
    sc.tl.leiden(
        work,
        resolution=resolution,
        adjacency=graph,
        flavor="igraph",
        n_iterations=2,
        directed=False,
        random_state=seed,
    )
    return work.obs["leiden"].astype(str).to_numpy()


def majority_vote(labels: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """Each cell's cluster's most frequent label (ties: the first in sorted order)."""
    frame = pd.DataFrame({"label": np.asarray(labels, dtype=object), "cluster": clusters})
    counts = frame.groupby(["cluster", "label"], observed=True).size().reset_index(name="n")
    counts = counts.sort_values(["cluster", "n", "label"], ascending=[True, False, True])
    winners = counts.drop_duplicates("cluster").set_index("cluster")["label"]
    return winners.loc[frame["cluster"]].to_numpy()
