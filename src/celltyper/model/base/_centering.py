"""Centring each batch on its own mean input: shared by the log-expression models."""

from __future__ import annotations

import numpy as np
import torch
from scipy import sparse
from scvi import REGISTRY_KEYS

from celltyper._utils import iter_row_chunks, log1p_scaled_counts, n_columns


def batch_log_means(
    matrix, batch_codes: np.ndarray, n_batch: int, target_sum: float | None
) -> np.ndarray:
    """Mean model input of each batch, ``(n_batch, n_genes)``; rows of absent batches are 0.

    The input is ``log1p(x / total * target_sum)`` of counts, or the values as they are
    when ``target_sum`` is ``None``. A sparse matrix stays sparse: the per-batch sums are
    one product with a sparse batch indicator per block of rows. A matrix on disk
    (backed AnnData, ``AnnCollection``) is read in blocks of consecutive rows; one in
    memory is one block.
    """
    sums = np.zeros((n_batch, n_columns(matrix)), dtype=np.float64)
    for start, stop, block in iter_row_chunks(matrix, dense=False):
        x = block if target_sum is None else log1p_scaled_counts(block, target_sum)
        n_cells = stop - start
        indicator = sparse.csr_matrix(
            (np.ones(n_cells), (batch_codes[start:stop], np.arange(n_cells))),
            shape=(n_batch, n_cells),
        )
        part = indicator @ x
        sums += part.toarray() if sparse.issparse(part) else np.asarray(part, dtype=np.float64)
    counts = np.bincount(batch_codes, minlength=n_batch)
    return (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)


class BatchCenteringMixin:
    """``batch_centering`` for models whose module is a
    :class:`~celltyper.module.LogExpressionClassifier`.

    The model passes ``batch_centering`` to ``_init_data_checks`` (which calls
    :meth:`_check_batch_centering`) before building its module and
    :meth:`_init_batch_centering` after; query surgery then fills in the means of the
    query's new batches (:meth:`_after_query_surgery`).
    """

    def _check_batch_centering(self) -> None:
        if self.n_batches < 2:
            raise ValueError(
                "batch_centering=True centres each batch on its own mean, which needs a "
                "batch_key with at least 2 batches in setup_anndata."
            )

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
