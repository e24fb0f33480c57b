"""Centring each batch on its own mean input: shared by the log-expression models."""

from __future__ import annotations

import numpy as np
import torch
from scipy import sparse
from scvi import REGISTRY_KEYS


def row_totals(matrix) -> np.ndarray:
    """Total of each row of a dense or sparse cells x genes matrix, as float64."""
    return np.asarray(matrix.sum(axis=1), dtype=np.float64).reshape(-1)


def dense_float32(matrix) -> np.ndarray:
    return np.asarray(matrix.toarray() if sparse.issparse(matrix) else matrix, dtype=np.float32)


def log_normalize_matrix(matrix, target_sum: float) -> np.ndarray:
    """Dense ``log1p(x / total * target_sum)`` of a cells x genes matrix (zero rows stay 0)."""
    totals = row_totals(matrix)
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    if sparse.issparse(matrix):
        scaled = sparse.diags(scale) @ sparse.csr_matrix(matrix, dtype=np.float64)
        return np.log1p(scaled.toarray()).astype(np.float32)
    return np.log1p(np.asarray(matrix, dtype=np.float64) * scale[:, None]).astype(np.float32)


def batch_log_means(
    matrix, batch_codes: np.ndarray, n_batch: int, target_sum: float | None, chunk: int = 4096
) -> np.ndarray:
    """Mean model input of each batch, ``(n_batch, n_genes)``; rows of absent batches are 0.

    The input is ``log1p(x / total * target_sum)`` of counts, or the values as they are
    when ``target_sum`` is ``None``. Dense in chunks of ``chunk`` cells only.
    """
    sums = np.zeros((n_batch, matrix.shape[1]))
    for start in range(0, matrix.shape[0], chunk):
        block = matrix[start : start + chunk]
        x = dense_float32(block) if target_sum is None else log_normalize_matrix(block, target_sum)
        indicator = np.eye(n_batch)[batch_codes[start : start + chunk]]
        sums += indicator.T @ x
    counts = np.bincount(batch_codes, minlength=n_batch)
    return (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)


class BatchCenteringMixin:
    """``batch_centering`` for models whose module is a
    :class:`~celltyper.module.LogExpressionClassifier`.

    The model calls :meth:`_check_batch_centering` before building its module and
    :meth:`_init_batch_centering` after; query surgery then fills in the means of the
    query's new batches (:meth:`_after_query_surgery`).
    """

    def _check_batch_centering(self) -> None:
        if self.n_batches < 2:
            raise ValueError(
                "batch_centering=True centres each batch on its own mean, which needs a "
                "batch_key with at least 2 batches in setup_anndata."
            )

    def _batch_codes(self) -> np.ndarray:
        codes = np.asarray(self.get_from_registry(self.adata, REGISTRY_KEYS.BATCH_KEY))
        return codes.reshape(-1).astype(int)

    def _batch_means(self) -> np.ndarray:
        return self.module.batch_means.detach().cpu().numpy()

    def _computed_batch_means(self) -> np.ndarray:
        """Per-batch mean inputs of every registered cell, labelled or not."""
        target_sum = self.module.target_sum() if self.module.normalize_counts else None
        matrix = self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        return batch_log_means(matrix, self._batch_codes(), self.n_batches, target_sum)

    def _init_batch_centering(self) -> None:
        self.module.init_batch_centering(self.n_batches, self.summary_stats.n_vars)
        self.module.set_batch_means(torch.as_tensor(self._computed_batch_means()))

    def _after_query_surgery(self, n_reference_batches: int) -> None:
        # The query model's own means were computed before the reference's state (such
        # as a normalisation constant) was loaded: compute its new batches' means again
        # and keep the reference's for the batches it knows.
        if not getattr(self.module, "batch_centering", False):
            return
        means = self._computed_batch_means()
        means[:n_reference_batches] = self._batch_means()[:n_reference_batches]
        self.module.set_batch_means(torch.as_tensor(means))
