"""Reading the reference and the query, and joining them into one training AnnData.

Only the checks that need the two files apart live here (a file exists and reads, a column
is in one file, the two share genes and hold the same kind of values); what a model checks
on its training data (label counts, matrix values, ...) is left to the model.
"""

from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pandas as pd

from celltyper._utils import check_matrix_values, gene_identifier_type

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

    Returns
    -------
    The :class:`Inputs`; the query's own labels, if any, are in ``query_labels``.

    Raises
    ------
    CliError
        For a missing or unreadable file, only one of the two paths, or a missing column.
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
    )


def shared_genes(reference: anndata.AnnData, query: anndata.AnnData) -> pd.Index:
    """Genes of both objects, in the reference's order, with a printed overlap report.

    Raises
    ------
    CliError
        If the two share no gene.
    """
    shared = reference.var_names[reference.var_names.isin(query.var_names)]
    n_ref, n_query, n = reference.n_vars, query.n_vars, len(shared)
    say(
        "Genes",
        f"{n:,} shared: {n / n_ref:.1%} of the reference's {n_ref:,}, "
        f"{n / n_query:.1%} of the query's {n_query:,}",
    )
    if n == 0:
        kinds = gene_identifier_type(reference.var_names), gene_identifier_type(query.var_names)
        hint = (
            f" (the reference uses {kinds[0]} names, the query {kinds[1]} names)"
            if kinds[0] != kinds[1]
            else ""
        )
        raise CliError(f"the reference and the query have no gene in common{hint}")
    if n < LOW_GENE_OVERLAP * min(n_ref, n_query):
        say("", f"warning: low gene overlap; only the {n:,} shared genes are used")
    return shared


def _expression_kind(adata: anndata.AnnData, what: str) -> str:
    try:
        return check_matrix_values(adata.X, f"{what}.X")
    except ValueError as err:
        raise CliError(str(err)) from err


def _context_layers(
    adata: anndata.AnnData, genes: pd.Index, context_layer: str | None, what: str
) -> dict | None:
    """``{context_layer: counts}`` of ``adata`` on ``genes``, or None without a layer."""
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
    genes = shared_genes(ref, qry)

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
        light = anndata.AnnData(
            X=adata[:, genes].X,
            obs=obs,
            var=pd.DataFrame(index=genes.copy()),
            layers=_context_layers(adata, genes, context_layer, role),
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
