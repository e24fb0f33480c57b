"""A warning when new data hold genes the model reads that look unmeasured there."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from scvi import REGISTRY_KEYS

from celltyper._utils import (
    gene_names,
    gene_positions,
    get_matrix,
    is_in_memory,
    iter_row_chunks,
    n_columns,
    n_rows,
)
from celltyper._utils._matrix import read_row_range

from ._centering import MIN_EXPECTED_COUNTS, batch_gene_sums, zero_against_expected
from ._data import split_modality

#: Cells the check reads: the first ones of data on disk (one contiguous read), evenly
#: spaced ones of data in memory. A zero-filled gene has no count in any of them, and
#: this many cells of a batch expect many counts of a panel's genes.
ZERO_FILLED_SAMPLE_ROWS = 20_000
#: Share of the reference's cells with a count that a gene needs to be checked: genes
#: switched off by a condition (e.g. interferon-induced ones in Kang's control cells) are
#: seen in few reference cells, a panel's broadly expressed genes in many.
MIN_REFERENCE_DETECTION = 0.05
#: Genes named in the warning.
_EXAMPLES = 5


class ZeroFilledGenesMixin:
    """Warn when new data have no count of a gene where the reference predicts many.

    ``train()`` stores the per-gene totals of the data the model learned from
    (``reference_gene_sums_``; a query model keeps its reference's). Whenever the model
    computes on other data (``predict``, ``annotate``, ``load_query_data``, ...), each of
    their batches (``obs[batch_key]``, or all cells when the column is absent) is checked:
    a gene the model reads with no count in a batch, although the reference's share of
    the gene times the batch's total expects :data:`MIN_EXPECTED_COUNTS` or more (a
    Poisson chance of e^-10 of a zero) and at least :data:`MIN_REFERENCE_DETECTION` of
    the reference's cells have a count of it, was most likely not measured, e.g. a
    smaller gene panel filled with zeros. The model would read its zeros as no
    expression. Genes absent from the data's ``var`` are left to the gene alignment's
    own warning.

    On the shared data: none of Kang's 14,053 genes in either direction between control
    and stimulated cells (130 and 81 with the expected counts alone: genes the condition
    switches off); 27 for a mouse reference predicting the human Baron cells; 763 of 980
    for Xin predicting Wang's zero-filled panel.
    """

    #: Per-gene totals of the registered expression the model was trained on (``None``
    #: on models saved before the check existed: they are not checked).
    reference_gene_sums_: np.ndarray | None = None
    #: Share of those cells with a count of each gene.
    reference_gene_detection_: np.ndarray | None = None

    #: What to do about such genes, said in the warning.
    _zero_filled_advice: ClassVar[str] = (
        "Train on the genes both datasets measured (subset the reference and these data "
        "to them) to keep them out of the model."
    )

    def _record_reference_genes(self) -> None:
        """Store the per-gene totals and detection rates of the registered expression."""
        matrix = self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        self.reference_gene_sums_, self.reference_gene_detection_ = gene_sums_and_detection(matrix)

    def _read_genes(self) -> np.ndarray:
        """One boolean per registered gene: whether the model reads it (every gene)."""
        return np.ones(self.summary_stats.n_vars, dtype=bool)

    def _warn_zero_filled_genes(self, data, what: str, gene_column: str | None = None) -> None:
        """Warn about the genes of ``data`` that look unmeasured (see the class)."""
        reference, detection = self.reference_gene_sums_, self.reference_gene_detection_
        if reference is None or detection is None:
            return
        registration = self.registration
        rna, obs = split_modality(data, registration.rna_modality)
        matrix = get_matrix(rna, registration.layer, what)
        with warnings.catch_warnings():
            # The data were already aligned, with these warnings, before this check.
            warnings.simplefilter("ignore", UserWarning)
            genes = gene_names(rna.var_names, rna.var, gene_column, what)
            positions, _ = gene_positions(genes, registration.genes, 0.0, what, rna.var)
        if positions is None:
            positions = np.arange(len(registration.genes))
        matrix, rows = _checked_rows(matrix, rna.n_obs)
        if len(rows) == 0:
            return
        codes, names = _batch_groups(obs, registration.batch_key, rows)
        sums = batch_gene_sums(matrix, codes, len(names))
        checked = (positions >= 0) & self._read_genes() & (detection >= MIN_REFERENCE_DETECTION)
        flagged = {}
        for group, name in enumerate(names):
            zero = zero_against_expected(
                sums[group, positions[checked]], reference[checked], MIN_EXPECTED_COUNTS
            )
            if zero.any():
                flagged[name] = registration.genes[checked][zero]
        if flagged:
            self._warn_zero_filled(flagged, what, registration.batch_key)

    def _warn_zero_filled(self, flagged: dict, what: str, batch_key: str | None) -> None:
        genes = pd.Index(np.concatenate([g.to_numpy() for g in flagged.values()])).unique()
        examples = ", ".join(map(str, genes[:_EXAMPLES]))
        if None in flagged:
            where = f"every cell of the {what}"
        else:
            batches = ", ".join(repr(str(b)) for b in list(flagged)[:3])
            more = f" and {len(flagged) - 3} more" if len(flagged) > 3 else ""
            where = f"every cell of batch {batches}{more} (obs[{batch_key!r}]) of the {what}"
        warnings.warn(
            f"{len(genes)} genes the model reads have no count in {where}, although the "
            f"reference's expression predicts {MIN_EXPECTED_COUNTS:g} or more there (e.g. "
            f"{examples}). They look unmeasured (zero-filled, as when datasets with "
            "different gene panels are merged), unless no cell here expresses them; the "
            "model reads their zeros as no expression, which can shift its predictions. "
            + self._zero_filled_advice,
            UserWarning,
            stacklevel=5,
        )


def gene_sums_and_detection(matrix) -> tuple[np.ndarray, np.ndarray]:
    """Per-column totals and share of the rows with a nonzero value (both float32), in
    one pass over blocks of rows (a matrix on disk is read once)."""
    sums = np.zeros(n_columns(matrix), dtype=np.float64)
    detected = np.zeros(n_columns(matrix), dtype=np.int64)
    for _, _, block in iter_row_chunks(matrix, dense=False):
        sums += np.asarray(block.sum(axis=0), dtype=np.float64).ravel()
        detected += np.asarray((block != 0).sum(axis=0)).ravel().astype(np.int64)
    share = detected / max(n_rows(matrix), 1)
    return sums.astype(np.float32), share.astype(np.float32)


def _checked_rows(matrix, n_obs: int) -> tuple[Any, np.ndarray]:
    """The rows the check reads (see :data:`ZERO_FILLED_SAMPLE_ROWS`) and their positions."""
    n = min(n_obs, ZERO_FILLED_SAMPLE_ROWS)
    if n == n_obs:
        return matrix, np.arange(n_obs)
    if not is_in_memory(matrix):
        return read_row_range(matrix, 0, n), np.arange(n)
    rows = np.unique(np.linspace(0, n_obs - 1, n).astype(np.int64))
    return matrix[rows], rows


def _batch_groups(
    obs: pd.DataFrame, batch_key: str | None, rows: np.ndarray
) -> tuple[np.ndarray, list]:
    """Group codes of the cells at ``rows`` by ``obs[batch_key]``, and the group names
    (``[None]``: one group of every cell, when the data have no such column)."""
    if batch_key is None or batch_key not in obs.columns:
        return np.zeros(len(rows), dtype=np.int64), [None]
    codes, names = pd.factorize(obs[batch_key].astype(str).to_numpy()[rows])
    return codes.astype(np.int64), list(names)
