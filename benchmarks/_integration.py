"""scib-metrics scores for several embeddings of the same cells, measured in one run."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
from scipy import sparse

#: Summary columns that scib-metrics' Benchmarker appends to the per-metric columns.
SUMMARY_COLUMNS = ["Batch correction", "Bio conservation", "Total"]


def _log_normalised(x) -> np.ndarray:
    """Dense log1p(CP10k) of a counts matrix: the unintegrated baseline scib's PCR needs."""
    x = sparse.csr_matrix(x, dtype=np.float32)
    totals = np.asarray(x.sum(axis=1)).reshape(-1)
    scale = 1e4 / np.maximum(totals, 1.0)
    return np.log1p(sparse.diags(scale) @ x).toarray()


def scib_scores(
    adata: ad.AnnData,
    embeddings: dict[str, np.ndarray],
    batch_key: str,
    label_key: str,
    mask: np.ndarray | None = None,
    n_jobs: int = 1,
    counts: bool = True,
    n_pcs: int = 50,
) -> pd.DataFrame:
    """Score embeddings with scib-metrics' default bio-conservation and batch metrics.

    Parameters
    ----------
    adata
        Cells x genes; ``X`` holds raw counts (``counts=True``) or log-normalised values.
        Only used for the unintegrated PCA that the PCR-comparison metric needs.
    embeddings
        Name -> ``(adata.n_obs, d)`` array, each learned on all cells of ``adata``.
    batch_key, label_key
        Columns of ``adata.obs``.
    mask
        Cells to score (e.g. the labelled ones); all cells when ``None``.
    n_jobs
        Threads for the neighbour search.
    counts
        Whether ``X`` holds counts (log-normalised here) or already normalised values.
    n_pcs
        Components of the unintegrated PCA.

    Returns
    -------
    One row per embedding; columns are the metrics (unscaled, so that scores of
    different runs stay comparable) followed by ``SUMMARY_COLUMNS``
    (Total = 0.4 batch correction + 0.6 bio conservation, as in scIB).
    """
    from scib_metrics.benchmark import Benchmarker

    if not embeddings:
        raise ValueError("`embeddings` is empty: pass at least one name -> array.")
    keep = np.ones(adata.n_obs, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if keep.shape != (adata.n_obs,):
        raise ValueError(f"`mask` has shape {keep.shape}; expected ({adata.n_obs},).")
    x = (
        _log_normalised(adata.X)
        if counts
        else np.asarray(
            adata.X.toarray() if sparse.issparse(adata.X) else adata.X, dtype=np.float32
        )
    )
    base = ad.AnnData(x[keep], obs=adata.obs.loc[keep, [batch_key, label_key]].copy())
    for column in (batch_key, label_key):
        base.obs[column] = base.obs[column].astype(str).astype("category")
    sc.pp.pca(base, n_comps=min(n_pcs, base.n_obs - 1, base.n_vars - 1))
    for name, emb in embeddings.items():
        emb = np.asarray(emb, dtype=np.float32)
        if emb.shape[0] != adata.n_obs:
            raise ValueError(
                f"Embedding {name!r} has {emb.shape[0]} rows; expected {adata.n_obs}."
            )
        if not np.isfinite(emb).all():
            raise ValueError(f"Embedding {name!r} contains NaN or inf values.")
        base.obsm[name] = emb[keep]
    bench = Benchmarker(
        base,
        batch_key=batch_key,
        label_key=label_key,
        embedding_obsm_keys=list(embeddings),
        pre_integrated_embedding_obsm_key="X_pca",
        n_jobs=n_jobs,
        progress_bar=False,
    )
    bench.benchmark()
    table = bench.get_results(min_max_scale=False)
    table = table.drop(index="Metric Type").astype(float)
    return table.loc[list(embeddings)]
