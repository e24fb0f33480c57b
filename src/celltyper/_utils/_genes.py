"""Aligning the genes of new data to a model's reference genes."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from scipy import sparse

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")


@dataclass(frozen=True)
class GeneOverlap:
    """How the genes of new data cover a model's reference genes."""

    n_reference: int
    n_query: int
    n_shared: int

    @property
    def n_missing(self) -> int:
        """Reference genes the new data lack (zero-filled)."""
        return self.n_reference - self.n_shared

    @property
    def n_extra(self) -> int:
        """Genes of the new data the model does not use (dropped)."""
        return self.n_query - self.n_shared

    @property
    def fraction(self) -> float:
        """Share of the reference genes present in the new data."""
        return self.n_shared / self.n_reference if self.n_reference else 0.0


def gene_identifier_type(names: pd.Index) -> Literal["ensembl", "symbol"]:
    """Whether most names look like Ensembl gene IDs or like gene symbols."""
    if len(names) == 0:
        return "symbol"
    sample = names[: min(len(names), 2000)]
    share = np.mean([bool(_ENSEMBL.match(str(n))) for n in sample])
    return "ensembl" if share > 0.5 else "symbol"


def align_genes(
    matrix,
    genes: pd.Index,
    reference_genes: pd.Index,
    min_overlap: float = 0.5,
    what: str = "query",
):
    """Reorder the columns of ``matrix`` to ``reference_genes``, zero-filling missing genes.

    Parameters
    ----------
    matrix
        Cells x ``genes`` (dense or sparse).
    genes
        Gene names of ``matrix``.
    reference_genes
        Gene names (and order) the model was trained on.
    min_overlap
        Smallest accepted share of reference genes present in ``genes``.
    what
        Name of the data in messages.

    Returns
    -------
    The aligned matrix (the input object itself when the genes already match) and the
    :class:`GeneOverlap`.
    """
    genes, reference_genes = pd.Index(genes), pd.Index(reference_genes)
    if genes.equals(reference_genes):
        n = len(genes)
        return matrix, GeneOverlap(n, n, n)
    if genes.has_duplicates:
        dup = genes[genes.duplicated()].unique()[:5].tolist()
        raise ValueError(
            f"{what} has duplicated gene names (e.g. {dup}); make them unique first "
            "(adata.var_names_make_unique())."
        )
    kind_ref, kind_new = gene_identifier_type(reference_genes), gene_identifier_type(genes)
    if kind_ref != kind_new:
        raise ValueError(
            f"The model's genes are {_describe(kind_ref)} but the {what}'s are "
            f"{_describe(kind_new)} (e.g. {reference_genes[0]!r} vs {genes[0]!r}); convert one "
            "to the other (e.g. through var['gene_ids'] or var['gene_symbols']) first."
        )
    positions = genes.get_indexer(reference_genes)
    overlap = GeneOverlap(len(reference_genes), len(genes), int((positions >= 0).sum()))
    if overlap.fraction < min_overlap:
        raise ValueError(
            f"Only {overlap.n_shared} of the model's {overlap.n_reference} genes "
            f"({overlap.fraction:.1%}) are in the {what}, below min_gene_overlap="
            f"{min_overlap:.0%}. Check that both use the same gene naming and species."
        )
    if overlap.n_missing:
        warnings.warn(
            f"{overlap.n_missing} of the model's {overlap.n_reference} genes are missing from "
            f"the {what} ({overlap.fraction:.1%} present) and are set to zero.",
            UserWarning,
            stacklevel=3,
        )
    return _select_columns(matrix, positions), overlap


def _describe(kind: str) -> str:
    return "Ensembl IDs" if kind == "ensembl" else "gene symbols"


def _select_columns(matrix, positions: np.ndarray):
    """Columns ``positions`` of ``matrix``; position -1 gives a column of zeros."""
    present = np.flatnonzero(positions >= 0)
    n_out = len(positions)
    if sparse.issparse(matrix):
        # A 0/1 selection matrix maps old columns to new ones without densifying.
        selector = sparse.csr_matrix(
            (np.ones(len(present), dtype=matrix.dtype), (positions[present], present)),
            shape=(matrix.shape[1], n_out),
        )
        return sparse.csr_matrix(matrix @ selector)
    dense = np.asarray(matrix)
    out = np.zeros((dense.shape[0], n_out), dtype=dense.dtype)
    out[:, present] = dense[:, positions[present]]
    return out
