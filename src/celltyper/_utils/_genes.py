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


def gene_names(
    var_names: pd.Index,
    var: pd.DataFrame,
    gene_column: str | None,
    what: str = "query",
    argument: str = "gene_column",
) -> pd.Index:
    """The gene names to align on: ``var_names``, or the ``var`` column ``gene_column``.

    Nothing is written back: the names are a new index, so the caller's object keeps its
    own ``var_names``.

    Parameters
    ----------
    var_names, var
        The data's ``var_names`` and ``var`` table.
    gene_column
        A column of ``var`` holding the gene names to use (e.g. ``"gene_ids"`` with Ensembl
        IDs, ``"gene_symbols"``); ``None`` uses ``var_names``.
    what
        Name of the data in messages.
    argument
        Name of the option in messages (``"gene_column"``, ``"--query-gene-column"``).

    Returns
    -------
    One name per gene. Duplicated names are made unique (``"A"``, ``"A-1"``, as
    ``var_names_make_unique`` does) and genes without a name get one that matches no
    other gene, each with a warning.

    Raises
    ------
    KeyError
        If ``gene_column`` is not a column of ``var``; the message lists the columns.
    """
    if gene_column is None:
        return pd.Index(var_names)
    if gene_column not in var.columns:
        raise KeyError(
            f"{argument}={gene_column!r} is not a column of the {what}'s var (its columns: "
            f"{list(var.columns)}); name the var column that holds the gene names."
        )
    values = var[gene_column].astype(object)
    missing = values.isna().to_numpy()
    names = values.astype(str).to_numpy(dtype=object)
    if missing.any():
        warnings.warn(
            f"{int(missing.sum())} genes of the {what} have no name in var[{gene_column!r}]; "
            "they match no gene of the other side.",
            UserWarning,
            stacklevel=3,
        )
        # Names that cannot match anything: the genes stay, but are never aligned.
        names[missing] = [f"<no name in var[{gene_column!r}] #{i}>" for i in range(missing.sum())]
    index = pd.Index(names, dtype=object)
    if index.has_duplicates:
        n_dup = int(index.duplicated().sum())
        warnings.warn(
            f"var[{gene_column!r}] of the {what} repeats {n_dup} gene names; they are made "
            "unique ('A', 'A-1', ...) for the alignment.",
            UserWarning,
            stacklevel=3,
        )
        index = _unique_names(index)
    return index


def _unique_names(names: pd.Index) -> pd.Index:
    """Repeated names suffixed ``-1``, ``-2``, ... (anndata's ``make_index_unique``)."""
    from anndata.utils import make_index_unique

    return make_index_unique(pd.Index(names, dtype=object))


def columns_holding(var: pd.DataFrame, kind: Literal["ensembl", "symbol"]) -> list[str]:
    """Text columns of ``var`` whose values look like ``kind`` of gene names."""
    found = []
    for column in var.columns:
        values = var[column]
        if not (
            pd.api.types.is_object_dtype(values)
            or pd.api.types.is_string_dtype(values)
            or isinstance(values.dtype, pd.CategoricalDtype)
        ):
            continue
        text = values.dropna().astype(str)
        # A column of a few repeated words (e.g. feature_types) is no gene name column.
        if len(text) and text.nunique() > len(text) // 2:
            if gene_identifier_type(pd.Index(text)) == kind:
                found.append(str(column))
    return found


def gene_kind_advice(
    kind_wanted: Literal["ensembl", "symbol"],
    var: pd.DataFrame | None,
    what: str,
    argument: str = "gene_column",
) -> str:
    """How to give ``what`` gene names of ``kind_wanted``: the option and a column for it."""
    wanted = _describe(kind_wanted)
    candidates = columns_holding(var, kind_wanted) if var is not None else []
    if candidates:
        return (
            f"The {what}'s var[{candidates[0]!r}] holds {wanted}: pass "
            f"{_option(argument, candidates[0])} to align on it."
        )
    columns = list(var.columns) if var is not None else []
    return (
        f"Pass {_option(argument, '<column>')} naming a var column of the {what} with "
        f"{wanted} (its var columns: {columns}), or convert its var_names to {wanted} first."
    )


def _option(argument: str, value: str) -> str:
    """``gene_column='x'`` for a keyword, ``--query-gene-column x`` for a flag."""
    return f"{argument} {value}" if argument.startswith("--") else f"{argument}={value!r}"


def align_genes(
    matrix,
    genes: pd.Index,
    reference_genes: pd.Index,
    min_overlap: float = 0.5,
    what: str = "query",
    var: pd.DataFrame | None = None,
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
    var
        The data's ``var`` table, searched for a column of the model's kind of gene
        names when the two kinds differ, so that the error names it.

    Returns
    -------
    The aligned matrix (the input object itself when the genes already match) and the
    :class:`GeneOverlap`.
    """
    positions, overlap = gene_positions(genes, reference_genes, min_overlap, what, var)
    if positions is None:
        return matrix, overlap
    return select_gene_columns(matrix, positions), overlap


def gene_positions(
    genes: pd.Index,
    reference_genes: pd.Index,
    min_overlap: float = 0.5,
    what: str = "query",
    var: pd.DataFrame | None = None,
) -> tuple[np.ndarray | None, GeneOverlap]:
    """Where each reference gene sits among ``genes``, checked as in :func:`align_genes`.

    Returns
    -------
    For each of ``reference_genes``, its position in ``genes`` (-1: missing), or ``None``
    when the genes already match; and the :class:`GeneOverlap`. Aligning a block of rows
    is then :func:`select_gene_columns` of it, so data read in chunks are checked once.
    """
    genes, reference_genes = pd.Index(genes), pd.Index(reference_genes)
    if genes.equals(reference_genes):
        n = len(genes)
        return None, GeneOverlap(n, n, n)
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
            f"{_describe(kind_new)} (e.g. {reference_genes[0]!r} vs {genes[0]!r}). "
            + gene_kind_advice(kind_ref, var, what)
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
            stacklevel=4,
        )
    return positions, overlap


def _describe(kind: str) -> str:
    return "Ensembl IDs" if kind == "ensembl" else "gene symbols"


def select_gene_columns(matrix, positions: np.ndarray):
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
