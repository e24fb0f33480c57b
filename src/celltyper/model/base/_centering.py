"""Centring each batch on its own mean input: shared by the log-expression models."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Literal

import numpy as np
import pandas as pd
import torch
from scipy import sparse
from scvi import REGISTRY_KEYS

from celltyper._utils import iter_row_chunks, log1p_scaled_counts, n_columns

from ._data import split_modality


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


#: A gene with no count in a batch is unmeasured there when the other batches' share of
#: the gene predicts at least this many counts in it: a Poisson chance of e^-10 of zero.
MIN_EXPECTED_COUNTS = 10.0


def batch_gene_sums(matrix, batch_codes: np.ndarray, n_batch: int) -> np.ndarray:
    """Per-gene totals of each batch's values, ``(n_batch, n_genes)`` (read in blocks of
    rows, as by :func:`batch_log_means`)."""
    cells = np.bincount(batch_codes, minlength=n_batch)
    sums = batch_log_means(matrix, batch_codes, n_batch, None).astype(np.float64)
    return sums * cells[:, None]


def zero_against_expected(
    sums: np.ndarray, expected_profile: np.ndarray, min_expected: float = MIN_EXPECTED_COUNTS
) -> np.ndarray:
    """Genes with no count in ``sums`` (one group of cells' per-gene totals) although
    ``expected_profile``'s share of each gene, times the group's total, expects
    ``min_expected`` or more; all false when either total is 0."""
    profile_total, group_total = float(expected_profile.sum()), float(sums.sum())
    if profile_total <= 0 or group_total <= 0:
        return np.zeros(sums.shape, dtype=bool)
    expected = expected_profile / profile_total * group_total
    return (sums == 0) & (expected >= min_expected)


def unmeasured_genes(
    counts, batch_codes: np.ndarray, n_batch: int, min_expected: float = MIN_EXPECTED_COUNTS
) -> np.ndarray:
    """Genes a batch did not measure (zero-filled, e.g. absent from its gene panel),
    ``(n_batch, n_genes)`` booleans.

    A gene is unmeasured in batch ``b`` when it has no count in ``b`` although its share
    of the other batches' counts, times ``b``'s total count, expects ``min_expected`` or
    more (:func:`zero_against_expected`); a gene merely too rare to be seen in a small
    batch counts as measured. With a single batch nothing is unmeasured. ``counts`` is
    read in blocks of rows, as by :func:`batch_log_means`.
    """
    sums = batch_gene_sums(counts, batch_codes, n_batch)
    missing = np.zeros(sums.shape, dtype=bool)
    if n_batch < 2:
        return missing
    total = sums.sum(axis=0)
    for b in range(n_batch):
        missing[b] = zero_against_expected(sums[b], total - sums[b], min_expected)
    return missing


class UnmeasuredGenesMixin:
    """``skip_unmeasured_genes`` for models whose module is a
    :class:`~celltyper.module.EncoderGeneMask`: the encoder leaves out the genes some
    registered batch did not measure (:func:`unmeasured_genes`).

    The model calls :meth:`_init_encoder_genes` once its module is built, before
    anything computed from the encoder's input (batch means are masked where used).
    Query surgery keeps the reference's mask: it is a buffer of the module.
    """

    def _init_encoder_genes(self, skip_unmeasured_genes: bool) -> None:
        if not isinstance(skip_unmeasured_genes, bool | np.bool_):
            raise TypeError(
                f"skip_unmeasured_genes must be True or False, got {skip_unmeasured_genes!r}."
            )
        if skip_unmeasured_genes:
            counts = self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
            missing = unmeasured_genes(counts, self._batch_codes(), self.n_batches)
            self.module.set_encoder_genes(torch.as_tensor(~missing.any(axis=0)))

    def _read_genes(self) -> np.ndarray:
        """One boolean per registered gene: whether the encoder reads it."""
        return self.module.encoder_genes.detach().cpu().numpy() > 0

    @property
    def unread_genes(self) -> list[str]:
        """Genes the encoder leaves out (``skip_unmeasured_genes``): unmeasured in some
        batch of the data the model was built on."""
        return [str(g) for g in self.registration.genes[~self._read_genes()]]

    _zero_filled_advice = (
        "Train one model on the reference and these data together, each dataset with "
        "its own batch (as `celltyper annotate` does): skip_unmeasured_genes then leaves "
        "such genes out."
    )

    def _unread_genes_summary(self) -> str:
        """The model summary's note on the genes left out (empty when none is)."""
        n_unread = int((~self._read_genes()).sum())
        return f", encoder skips {n_unread} genes unmeasured in a batch" if n_unread else ""


class BatchCenteringMixin:
    """``batch_centering`` for models whose module is a
    :class:`~celltyper.module.LogExpressionClassifier`.

    The model passes ``batch_centering`` to ``_init_data_checks`` (which calls
    :meth:`_check_batch_centering`) before building its module and
    :meth:`_init_batch_centering` after; query surgery then fills in the means of the
    query's new batches (:meth:`_after_query_surgery`).
    """

    def _resolved_batch_centering(self, batch_centering: bool | Literal["auto"]) -> bool:
        """``batch_centering`` as a bool: ``"auto"`` centres when the registered data
        hold 2 or more batches."""
        if isinstance(batch_centering, str) and batch_centering == "auto":
            return self.n_batches > 1
        if not isinstance(batch_centering, bool | np.bool_):
            raise ValueError(
                f"batch_centering must be True, False or 'auto', got {batch_centering!r}."
            )
        return bool(batch_centering)

    @contextmanager
    def _model_data(self, adata=None, what: str = "adata", gene_column=None, chunked=True):
        if adata is not None and adata is not self.adata:
            self._warn_unseen_batches(adata, what)
        with super()._model_data(adata, what, gene_column, chunked) as data:
            yield data

    def _warn_unseen_batches(self, adata, what: str) -> None:
        """Warn that cells of batches the model never saw are centred on the first
        reference batch's mean (new data keep no batch of their own outside query
        surgery), so their own batch shift stays in their input."""
        registration = self.registration
        key = registration.batch_key
        if not getattr(self.module, "batch_centering", False) or key is None:
            return
        obs = split_modality(adata, registration.rna_modality)[1]
        if key in obs.columns:
            values = obs[key].astype(object).to_numpy()
            unseen = pd.Index(registration.batches).get_indexer(values) < 0
            found = f"obs[{key!r}]: {', '.join(sorted(map(str, pd.unique(values[unseen])))[:5])}"
        else:
            unseen = np.ones(len(obs), dtype=bool)
            found = f"no obs[{key!r}]"
        if not unseen.any():
            return
        warnings.warn(
            f"{int(unseen.sum())} cells of the {what} are in batches the model never saw "
            f"({found}). Batch centring centres them on the mean "
            f"of the reference batch {registration.batches[0]!r}, which leaves their own "
            "batch shift in place. To centre a new batch on its own mean, map the data "
            "with load_query_data, or train with it (as `celltyper annotate` does).",
            UserWarning,
            stacklevel=4,
        )

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
