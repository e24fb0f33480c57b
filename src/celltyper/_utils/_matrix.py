"""Small helpers on dense or sparse cells x genes matrices."""

from __future__ import annotations

import numpy as np
from scipy import sparse


def row_totals(matrix) -> np.ndarray:
    """Total of each row of a dense or sparse cells x genes matrix, as float64."""
    return np.asarray(matrix.sum(axis=1), dtype=np.float64).reshape(-1)


def dense_float32(matrix) -> np.ndarray:
    """A dense float32 copy (or view) of a dense or sparse matrix."""
    return np.asarray(matrix.toarray() if sparse.issparse(matrix) else matrix, dtype=np.float32)


def log1p_scaled_counts(counts, target_sum: float):
    """``log1p(counts / cell total * target_sum)`` as float32, sparse in, sparse out.

    Cells without counts stay at zero.
    """
    totals = row_totals(counts)
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    if sparse.issparse(counts):
        normalised = (sparse.diags(scale) @ sparse.csr_matrix(counts, dtype=np.float64)).tocsr()
        normalised.data = np.log1p(normalised.data)
        return normalised.astype(np.float32)
    return np.log1p(np.asarray(counts, dtype=np.float64) * scale[:, None]).astype(np.float32)
