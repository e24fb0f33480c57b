"""CELLULAR's preprocessing: mean-total normalisation, QC filters and HVG selection."""

from __future__ import annotations

import numpy as np
import scanpy as sc
from anndata import AnnData

from celltyper._utils import check_matrix_values, get_matrix, require_counts

from ._normalize import log1p_scaled_counts


def normalize_cellular(
    adata: AnnData,
    layer: str | None = None,
    key_added: str = "cellular",
    mean_total: float | None = None,
) -> float:
    """Store ``log1p(x / total * mean_total)`` of raw counts in ``adata.layers[key_added]``.

    The input CELLULAR works on (the model also computes it itself from raw counts). The
    counts are left unchanged.

    Parameters
    ----------
    adata
        Cells x genes with raw counts.
    layer
        Layer holding the counts; ``None`` uses ``X``.
    key_added
        Layer to write.
    mean_total
        Total each cell is scaled to; ``None`` uses the mean total of ``adata``'s cells.
        Pass the reference's value to normalise a query like its reference.

    Returns
    -------
    The ``mean_total`` used.
    """
    counts = get_matrix(adata, layer)
    require_counts(check_matrix_values(counts), "normalize_cellular", "the counts")
    totals = np.asarray(counts.sum(axis=1), dtype=np.float64).reshape(-1)
    mean_total = float(totals.mean()) if mean_total is None else float(mean_total)
    adata.layers[key_added] = log1p_scaled_counts(counts, mean_total)
    return mean_total


def auto_preprocess(
    adata: AnnData,
    n_top_genes: int = 2000,
    min_genes: int = 200,
    min_cells: int = 3,
    layer_added: str = "cellular",
    layer: str | None = None,
) -> AnnData:
    """QC filters, CELLULAR normalisation and highly variable genes, on a copy.

    Cells with fewer than ``min_genes`` detected genes and genes detected in fewer than
    ``min_cells`` cells are removed; ``log1p(x / total * mean_total)`` is stored in
    ``layers[layer_added]``; the ``n_top_genes`` highly variable genes are selected with
    scanpy's ``seurat_v3`` flavour on the counts and the result is subset to them. The
    counts (``X`` or ``layers[layer]``) are never overwritten.

    Parameters
    ----------
    adata
        Cells x genes with raw counts; left unchanged (the function returns a filtered
        copy, since filtering cannot be done in place without changing the user's cells).
    n_top_genes
        Number of highly variable genes kept (all genes when there are fewer).
    min_genes
        Smallest number of detected genes of a kept cell.
    min_cells
        Smallest number of cells in which a kept gene is detected.
    layer_added
        Layer receiving the normalised values.
    layer
        Layer holding the counts; ``None`` uses ``X``.

    Returns
    -------
    The filtered copy, with ``var["highly_variable"]`` and ``uns["cellular_mean_total"]``.
    """
    counts = get_matrix(adata, layer)
    require_counts(check_matrix_values(counts), "auto_preprocess", "the counts")
    detected = counts > 0
    genes_per_cell = np.asarray(detected.sum(axis=1)).reshape(-1)
    cells_per_gene = np.asarray(detected.sum(axis=0)).reshape(-1)
    out = adata[genes_per_cell >= min_genes, cells_per_gene >= min_cells].copy()
    if out.n_obs == 0 or out.n_vars == 0:
        raise ValueError(
            f"QC removed everything ({out.n_obs} cells x {out.n_vars} genes left); lower "
            "min_genes or min_cells."
        )
    mean_total = normalize_cellular(out, layer=layer, key_added=layer_added)
    out.uns["cellular_mean_total"] = mean_total
    if out.n_vars > n_top_genes:
        sc.pp.highly_variable_genes(
            out, n_top_genes=n_top_genes, flavor="seurat_v3", layer=layer, subset=True
        )
    else:
        out.var["highly_variable"] = True
    return out
