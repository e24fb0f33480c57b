"""Normalisation functions."""

from __future__ import annotations

from anndata import AnnData

from celltyper._utils import check_matrix_values, get_matrix, log1p_scaled_counts, require_counts


def log1p_cpm(
    adata: AnnData,
    layer: str | None = None,
    key_added: str = "log1p_cpm",
    target_sum: float = 1e6,
) -> None:
    """Store log1p(counts per million) of raw counts in ``adata.layers[key_added]``.

    The input that SCNYM works on (SCNYM also computes it itself from raw counts, so this is
    only needed to inspect or reuse the values). The counts are left unchanged.

    Parameters
    ----------
    adata
        Cells x genes with raw counts.
    layer
        Layer holding the counts; ``None`` uses ``X``.
    key_added
        Layer to write.
    target_sum
        Total each cell is scaled to before ``log1p``.
    """
    counts = get_matrix(adata, layer)
    require_counts(check_matrix_values(counts), "log1p_cpm", "the counts")
    adata.layers[key_added] = log1p_scaled_counts(counts, target_sum)
