"""Reading the reference and the query, and joining them into one training AnnData.

Only the checks that need the two files apart live here (a file exists and reads, a column
is in one file, the two share genes and hold the same kind of values); what a model checks
on its training data (label counts, matrix values, ...) is left to the model.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata
import numpy as np
import pandas as pd

from celltyper._utils import (
    check_matrix_values,
    columns_holding,
    gene_identifier_type,
    gene_kind_advice,
    gene_names,
)

from ._common import (
    DEFAULT_LABELS_KEY,
    DEMO_BATCH_KEY,
    LOW_GENE_OVERLAP,
    ROLE_KEY,
    TRAIN_LABELS_KEY,
    CliError,
    Inputs,
    say,
    shape,
)


def _read_h5ad(path: str | Path, what: str) -> anndata.AnnData:
    path = Path(path)
    if not path.is_file():
        raise CliError(f"{what} file {str(path)!r} does not exist")
    try:
        adata = anndata.read_h5ad(path)
    except Exception as err:  # h5py and anndata raise many kinds; all mean "unreadable"
        raise CliError(f"could not read {what} file {str(path)!r} as h5ad: {err}") from err
    # The model sees the two files joined; an empty query would pass its checks unnoticed.
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise CliError(f"{what} file {str(path)!r} is empty ({shape(adata)})")
    if not adata.var_names.is_unique:
        n_dup = int(adata.var_names.duplicated().sum())
        say("Genes", f"{what}: {n_dup} duplicated gene names made unique (var_names_make_unique)")
        adata.var_names_make_unique()
    return adata


def _query_labels(
    query: anndata.AnnData, labels_key: str, unlabeled_category: str
) -> pd.Series | None:
    """The query's labels with unlabelled cells as NaN, or None when it has none."""
    if labels_key not in query.obs.columns:
        return None
    labels = query.obs[labels_key].astype(object)
    labels = labels.where(labels.notna() & (labels.astype(str) != unlabeled_category))
    labels = labels.map(lambda v: v if pd.isna(v) else str(v))
    return labels if labels.notna().any() else None


def load_inputs(
    reference: str | Path | None = None,
    query: str | Path | None = None,
    labels_key: str | None = None,
    batch_key: str | None = None,
    unlabeled_category: str = "Unknown",
    *,
    reference_gene_column: str | None = None,
    query_gene_column: str | None = None,
) -> Inputs:
    """Read the reference and query, or split the bundled demo into the two.

    Parameters
    ----------
    reference, query
        Paths of ``.h5ad`` files; both ``None`` uses :func:`celltyper.datasets.kang_pbmc`
        (reference: ``split == "reference"`` cells, query: ``split == "query"`` cells).
    labels_key
        Label column of the reference; defaults to ``"cell_type"``.
    batch_key
        Batch column, needed in both objects. Defaults to ``"condition"`` for the demo and
        to ``None`` (the reference/query role) for files.
    unlabeled_category
        Label of unlabelled cells.
    reference_gene_column, query_gene_column
        A ``var`` column of that object holding the gene names to join on instead of its
        ``var_names`` (e.g. ``"gene_ids"``); the objects themselves keep their names.

    Returns
    -------
    The :class:`Inputs`; the query's own labels, if any, are in ``query_labels``.

    Raises
    ------
    CliError
        For a missing or unreadable file, only one of the two paths, or a missing column
        (of ``obs``, or of ``var`` for a gene column).
    """
    labels_key = labels_key or DEFAULT_LABELS_KEY
    if (reference is None) != (query is None):
        raise CliError("give both --reference and --query, or neither to run the demo")
    if reference is None:
        from celltyper.datasets import kang_pbmc

        demo = kang_pbmc()
        is_reference = (demo.obs["split"] == "reference").to_numpy()
        ref, qry = demo[is_reference].copy(), demo[~is_reference].copy()
        batch_key = batch_key or DEMO_BATCH_KEY
        description = "Kang et al. (2018) PBMC demo (celltyper.datasets.kang_pbmc)"
        say("Loading", f"{description}: reference {shape(ref)}, query {shape(qry)}")
    else:
        ref = _read_h5ad(reference, "reference")
        qry = _read_h5ad(query, "query")
        description = f"reference {reference}, query {query}"
        say("Loading", f"reference {reference} ({shape(ref)})")
        say("", f"query {query} ({shape(qry)})")

    # The model sees only the joined columns; these name the file a column is missing from.
    if labels_key not in ref.obs.columns:
        raise CliError(
            f"--labels-key {labels_key!r} is not a column of the reference's obs; "
            f"available columns: {list(ref.obs.columns)}"
        )
    if batch_key is not None:
        for name, adata in (("reference", ref), ("query", qry)):
            if batch_key not in adata.obs.columns:
                raise CliError(
                    f"--batch-key {batch_key!r} is not a column of the {name}'s obs; "
                    f"available columns: {list(adata.obs.columns)}"
                )
            # Joining casts the batches to strings, which would turn NaN into a batch "nan".
            if adata.obs[batch_key].isna().any():
                raise CliError(f"the {name}'s obs[{batch_key!r}] has missing values")
    for flag, column, adata, name in (
        ("--reference-gene-column", reference_gene_column, ref, "reference"),
        ("--query-gene-column", query_gene_column, qry, "query"),
    ):
        if column is not None and column not in adata.var.columns:
            raise CliError(
                f"{flag} {column!r} is not a column of the {name}'s var; available "
                f"columns: {list(adata.var.columns)}"
            )
    truth = _query_labels(qry, labels_key, unlabeled_category)
    if truth is not None:
        say("", f"query labels in obs[{labels_key!r}] kept aside for scoring only")
    return Inputs(
        reference=ref,
        query=qry,
        labels_key=labels_key,
        batch_key=batch_key,
        unlabeled_category=unlabeled_category,
        query_labels=truth,
        description=description,
        reference_gene_column=reference_gene_column,
        query_gene_column=query_gene_column,
    )


def genes_to_join(adata: anndata.AnnData, gene_column: str | None, what: str) -> pd.Index:
    """The gene names of ``adata`` to join on: ``var_names`` or ``var[gene_column]``.

    Duplicated or missing names in the column are reported on a progress line; ``adata``
    keeps its ``var_names``.
    """
    flag = f"--{what}-gene-column"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            names = gene_names(adata.var_names, adata.var, gene_column, what, argument=flag)
        except KeyError as err:
            raise CliError(str(err.args[0])) from err
    for warning in caught:
        say("Genes", str(warning.message))
    return names


def shared_genes(
    reference: anndata.AnnData,
    query: anndata.AnnData,
    reference_gene_column: str | None = None,
    query_gene_column: str | None = None,
) -> pd.Index:
    """Genes of both objects, in the reference's order, with a printed overlap report.

    Parameters
    ----------
    reference, query
        The two objects.
    reference_gene_column, query_gene_column
        ``var`` columns to take each side's gene names from instead of its ``var_names``.

    Raises
    ------
    CliError
        If the two share no gene; when one side has Ensembl IDs and the other symbols,
        the message says which option and column fixes it.
    """
    ref_names = genes_to_join(reference, reference_gene_column, "reference")
    query_names = genes_to_join(query, query_gene_column, "query")
    return _shared_names(ref_names, query_names, reference.var, query.var)


def _shared_names(
    ref_names: pd.Index, query_names: pd.Index, ref_var: pd.DataFrame, query_var: pd.DataFrame
) -> pd.Index:
    shared = ref_names[ref_names.isin(query_names)]
    n_ref, n_query, n = len(ref_names), len(query_names), len(shared)
    say(
        "Genes",
        f"{n:,} shared: {n / n_ref:.1%} of the reference's {n_ref:,}, "
        f"{n / n_query:.1%} of the query's {n_query:,}",
    )
    if n == 0:
        kinds = gene_identifier_type(ref_names), gene_identifier_type(query_names)
        hint = ""
        if kinds[0] != kinds[1]:
            hint = (
                f" (the reference uses {kinds[0]} names, the query {kinds[1]} names). "
                + _gene_kind_fix(kinds[0], kinds[1], ref_var, query_var)
            )
        raise CliError(f"the reference and the query have no gene in common{hint}")
    if n < LOW_GENE_OVERLAP * min(n_ref, n_query):
        say("", f"warning: low gene overlap; only the {n:,} shared genes are used")
    return shared


def _gene_kind_fix(
    ref_kind: str, query_kind: str, ref_var: pd.DataFrame, query_var: pd.DataFrame
) -> str:
    """Which option and ``var`` column give both sides the same kind of gene names."""
    if columns_holding(ref_var, query_kind) and not columns_holding(query_var, ref_kind):
        return gene_kind_advice(query_kind, ref_var, "reference", "--reference-gene-column")
    advice = gene_kind_advice(ref_kind, query_var, "query", "--query-gene-column")
    if columns_holding(query_var, ref_kind):
        return advice
    # Neither side has a column of the other's kind: both ways out are worth naming.
    return f"{advice} Or name a reference var column with --reference-gene-column."


def _expression_kind(adata: anndata.AnnData, what: str) -> str:
    try:
        return check_matrix_values(adata.X, f"{what}.X")
    except ValueError as err:
        raise CliError(str(err)) from err


def _context_layers(
    adata: anndata.AnnData, genes: np.ndarray, context_layer: str | None, what: str
) -> dict | None:
    """``{context_layer: counts}`` of ``adata`` on the genes at positions ``genes``, or
    None without a layer."""
    if context_layer is None:
        return None
    if context_layer not in adata.layers:
        raise CliError(
            f"--context-layer {context_layer!r} is not a layer of the {what} (layers: "
            f"{list(adata.layers)})"
        )
    return {context_layer: adata[:, genes].layers[context_layer]}


def build_training_data(inputs: Inputs, context_layer: str | None = None) -> anndata.AnnData:
    """One AnnData of reference and query cells for transductive training.

    The objects are joined on their shared genes (:func:`anndata.concat`, inner join).
    ``obs`` holds ``celltyper_role`` (``"reference"``/``"query"``), the training labels
    ``celltyper_train_label`` (the reference labels; every query cell, and every reference
    cell without a label, is the unlabelled category) and the batch column
    (:attr:`Inputs.training_batch_key`). With ``context_layer`` (``--context-layer``)
    that layer of both objects, on the shared genes, is joined too.

    Raises
    ------
    CliError
        If the objects share no gene or hold different kinds of values (raw counts and
        normalised), or one lacks ``context_layer``. Whether the labels suit the model is
        checked by the model.
    """
    ref, qry = inputs.reference, inputs.query
    # Counts joined with normalised values would look "normalised" to the model as a whole
    # and be silently mis-scaled; only the two files apart tell.
    kinds = _expression_kind(ref, "reference"), _expression_kind(qry, "query")
    if kinds[0] != kinds[1]:
        raise CliError(
            f"the reference's X holds {kinds[0]} values but the query's {kinds[1]}; give both "
            "as raw counts (or both normalised the same way)"
        )
    names = {
        "reference": genes_to_join(ref, inputs.reference_gene_column, "reference"),
        "query": genes_to_join(qry, inputs.query_gene_column, "query"),
    }
    genes = _shared_names(names["reference"], names["query"], ref.var, qry.var)

    unlabeled = inputs.unlabeled_category
    labels = ref.obs[inputs.labels_key].astype(object)
    n_missing = int(labels.isna().sum())
    if n_missing:
        say("", f"{n_missing:,} reference cells without a label are treated as unlabelled")
    labels = labels.where(labels.notna(), unlabeled).astype(str)

    batch_key = inputs.training_batch_key
    parts = []
    for role, adata, train_labels in (
        ("reference", ref, labels.to_numpy()),
        ("query", qry, np.full(qry.n_obs, unlabeled, dtype=object)),
    ):
        obs = pd.DataFrame(
            {ROLE_KEY: role, TRAIN_LABELS_KEY: train_labels}, index=adata.obs_names.copy()
        )
        if inputs.batch_key is not None:
            obs[batch_key] = adata.obs[batch_key].astype(str).to_numpy()
        # By position: the names joined on may come from a var column, not var_names.
        positions = names[role].get_indexer(genes)
        light = anndata.AnnData(
            X=adata[:, positions].X,
            obs=obs,
            var=pd.DataFrame(index=genes.copy()),
            layers=_context_layers(adata, positions, context_layer, role),
        )
        parts.append(light)
    duplicated = parts[0].obs_names.isin(parts[1].obs_names).any()
    combined = anndata.concat(
        parts,
        join="inner",
        keys=["reference", "query"] if duplicated else None,
        index_unique="-" if duplicated else None,
    )
    for key in dict.fromkeys([ROLE_KEY, TRAIN_LABELS_KEY, batch_key]):
        combined.obs[key] = combined.obs[key].astype("category")
    return combined
