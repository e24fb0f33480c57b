"""Turning a user's AnnData/MuData into the registered object a model computes on.

New data (a query, or any object passed to ``predict``/``annotate``) is never registered
as is: the model builds a light object that shares the (gene-aligned) expression matrix
and carries only the columns it needs. The user's object thus never gains ``_scvi_*``
columns, label fills or reordered genes, and values outside the reference (new batches,
cell types the reference never saw) are handled here, in one place.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from mudata import MuData
from scvi import REGISTRY_KEYS

from celltyper._utils import (
    AlignedRows,
    InputKind,
    RowSource,
    align_genes,
    check_matrix_values,
    check_not_empty,
    gene_names,
    gene_positions,
    get_matrix,
    is_in_memory,
    take_rows,
)

#: Rows whose values tell counts from normalised data (as :func:`check_matrix_values`).
_KIND_SAMPLE_ROWS = 5000

QUERY_BATCH = "query"


@dataclass(frozen=True)
class Registration:
    """What a model's registry says about the data it was set up with."""

    is_mudata: bool
    layer: str | None
    rna_modality: str | None
    genes: pd.Index
    batch_key: str | None
    batches: list
    labels_key: str | None
    cell_types: list
    unlabeled_category: str

    @classmethod
    def from_registry(cls, registry: dict) -> Registration:
        args = registry["setup_args"]
        fields = registry["field_registries"]
        is_mudata = registry.get("setup_method_name") == "setup_mudata"
        x_state = fields[REGISTRY_KEYS.X_KEY]["state_registry"]
        labels_state = fields[REGISTRY_KEYS.LABELS_KEY]["state_registry"]
        unlabeled = labels_state.get("unlabeled_category", args.get("unlabeled_category"))
        mapping = list(labels_state["categorical_mapping"])
        return cls(
            is_mudata=is_mudata,
            layer=args.get("rna_layer") if is_mudata else args.get("layer"),
            rna_modality=(args.get("modalities") or {}).get("rna_layer") if is_mudata else None,
            genes=pd.Index(x_state["column_names"]),
            batch_key=args.get("batch_key"),
            batches=list(fields[REGISTRY_KEYS.BATCH_KEY]["state_registry"]["categorical_mapping"]),
            labels_key=args.get("labels_key"),
            cell_types=[c for c in mapping if c != unlabeled],
            unlabeled_category=unlabeled,
        )


def split_modality(data: AnnData | MuData, modality: str | None) -> tuple[AnnData, pd.DataFrame]:
    """The expression AnnData and the obs table holding the cell annotations."""
    if isinstance(data, MuData):
        if modality is None or modality not in data.mod:
            raise KeyError(
                f"modality {modality!r} is not in the MuData (modalities: {list(data.mod)})."
            )
        rna = data.mod[modality]
        return rna, data.obs.loc[rna.obs_names]
    if not isinstance(data, AnnData):
        raise TypeError(f"Expected an AnnData or MuData, got {type(data).__name__}.")
    return data, data.obs


def check_input_kind(kind: InputKind, expected: InputKind, model_name: str, what: str) -> None:
    """New data must come in the form (counts or normalised) the model was trained on."""
    if kind == expected:
        return
    if expected == "counts":
        raise ValueError(
            f"{model_name} was trained on raw counts, but {what} holds non-integer values (it "
            "looks normalised). Pass the raw counts (e.g. a 'counts' layer)."
        )
    raise ValueError(
        f"{model_name} was trained on log-normalised data, but {what} holds raw counts. "
        "Normalise it the same way as the reference first."
    )


def build_model_data(
    data: AnnData | MuData,
    registration: Registration,
    *,
    input_kind: InputKind,
    model_name: str,
    min_gene_overlap: float = 0.5,
    keep_new_batches: bool = False,
    what: str = "query",
    extra_columns: Callable[[pd.DataFrame], dict[str, np.ndarray]] | None = None,
    extra_layers: Callable[[AnnData], dict[str, Any]] | None = None,
    gene_column: str | None = None,
) -> AnnData | MuData:
    """A registered-ready copy of ``data`` aligned to the model's genes and categories.

    Parameters
    ----------
    data
        The user's object (left unchanged).
    registration
        The model's :class:`Registration`.
    input_kind
        Whether the model was trained on counts or normalised data.
    model_name
        Name used in messages.
    min_gene_overlap
        Smallest share of the model's genes that ``data`` must contain.
    keep_new_batches
        Keep batch categories the reference never saw (query surgery learns them); else
        they are mapped to the first reference batch, which only matters to modules whose
        inference reads the batch (batch centring does: see ``BatchCenteringMixin``).
    what
        Name of the data in messages.
    extra_columns
        ``obs -> {column: values}`` for obs columns a model registers beyond the batch and
        the labels (e.g. further covariates); called with the user's obs table.
    extra_layers
        ``rna -> {layer: matrix}`` for layers a model registers beyond its expression
        (e.g. RANKFORMER's context profiles), in the genes of ``rna``; called with the
        user's expression AnnData. They are aligned to the model's genes like the
        expression.
    gene_column
        A ``var`` column of ``data``'s expression holding gene names of the kind the model
        was trained on (e.g. ``"gene_ids"`` for Ensembl IDs), aligned on instead of its
        ``var_names``; ``data`` itself is not changed.
    """
    rna, obs = split_modality(data, registration.rna_modality)
    check_not_empty(rna, what)
    matrix = get_matrix(rna, registration.layer, what)
    layer_name = f"layers[{registration.layer!r}]" if registration.layer else "X"
    kind = check_matrix_values(matrix, f"{what}.{layer_name}")
    check_input_kind(kind, input_kind, model_name, f"{what}.{layer_name}")
    genes = gene_names(rna.var_names, rna.var, gene_column, what)
    aligned, _ = align_genes(
        matrix, genes, registration.genes, min_gene_overlap, what=what, var=rna.var
    )

    columns = _registered_columns(obs, registration, keep_new_batches, what, extra_columns)
    cell_obs = pd.DataFrame(columns, index=rna.obs_names.copy())

    var = pd.DataFrame(index=registration.genes.copy())
    layers = {registration.layer: aligned} if registration.layer else {}
    for name, matrix in (extra_layers(rna) if extra_layers is not None else {}).items():
        layers[name] = _aligned_like_expression(matrix, genes, registration.genes)
    x = None if registration.layer else aligned
    if not registration.is_mudata:
        return AnnData(X=x, obs=cell_obs, var=var, layers=layers)
    modality = AnnData(X=x, obs=pd.DataFrame(index=cell_obs.index), var=var, layers=layers)
    mdata = MuData({registration.rna_modality: modality})
    for key, values in cell_obs.items():
        mdata.obs[key] = values.to_numpy()
    return mdata


def model_data_source(
    data: AnnData | MuData,
    registry: dict,
    *,
    input_kind: InputKind,
    model_name: str,
    min_gene_overlap: float = 0.5,
    what: str = "query",
    extra_columns: Callable[[pd.DataFrame], dict[str, np.ndarray]] | None = None,
    gene_column: str | None = None,
) -> RowSource | None:
    """The chunked path of :func:`build_model_data`: ``data`` as a :class:`RowSource`.

    Nothing is copied up front: the genes are matched once (same checks and messages as
    :func:`build_model_data`), the registered obs fields become category codes of the
    model's registry, and each block of rows is read from the user's matrix (in memory,
    or on disk for an AnnData opened with ``backed="r"``) and aligned as it is needed.
    Values are checked block by block on disk (NaN, infinite and negative values), and
    counts vs. normalised data on the first rows, before any block is computed.

    Parameters
    ----------
    data
        The user's object (left unchanged).
    registry
        The model's registry (``model.registry_``).
    input_kind, model_name, min_gene_overlap, what, extra_columns, gene_column
        As in :func:`build_model_data`.

    Returns
    -------
    The source, or ``None`` when the registry holds a field this path does not read
    (further layers, such as a paired RANKFORMER's context): use
    :func:`build_model_data` then.
    """
    registration = Registration.from_registry(registry)
    fields = registry["field_registries"]
    if any(
        f["data_registry"].get("attr_name") == "layers"
        and f["data_registry"].get("attr_key") != registration.layer
        for f in fields.values()
    ):
        return None
    rna, obs = split_modality(data, registration.rna_modality)
    check_not_empty(rna, what)
    matrix = get_matrix(rna, registration.layer, what)
    layer_name = f"layers[{registration.layer!r}]" if registration.layer else "X"
    where = f"{what}.{layer_name}"
    check_rows = None
    if is_in_memory(matrix):
        kind = check_matrix_values(matrix, where)
    else:
        first = take_rows(matrix, slice(0, min(rna.n_obs, _KIND_SAMPLE_ROWS)))
        kind = check_matrix_values(first, where)

        def check_rows(block) -> None:
            check_matrix_values(block, where)

    check_input_kind(kind, input_kind, model_name, where)
    genes = gene_names(rna.var_names, rna.var, gene_column, what)
    positions, _ = gene_positions(
        genes, registration.genes, min_gene_overlap, what=what, var=rna.var
    )

    columns = _registered_columns(obs, registration, False, what, extra_columns)
    arrays = {}
    n_obs = rna.n_obs
    for key, field in fields.items():
        place, state = field["data_registry"], field["state_registry"]
        attr = place.get("attr_name")
        if not place:
            continue
        if attr in ("X", "layers"):
            arrays[key] = AlignedRows(matrix, positions, check_rows)
        elif attr == "obs" and "categorical_mapping" in state:
            codes = _category_codes(columns, state.get("original_key"), state, n_obs)
            if codes is None:
                return None
            arrays[key] = codes.reshape(-1, 1)
        elif attr == "obsm" and "mappings" in state:
            parts = [
                _category_codes(columns, k, {"categorical_mapping": state["mappings"][k]}, n_obs)
                for k in state["field_keys"]
            ]
            if any(p is None for p in parts):
                return None
            arrays[key] = np.stack(parts, axis=1) if parts else np.zeros((n_obs, 0), np.int64)
        else:
            return None
    return RowSource(arrays, rna.obs_names.copy())


def _category_codes(columns: dict, key: str | None, state: dict, n_obs: int) -> np.ndarray | None:
    """Codes of ``columns[key]`` in the registry's mapping, as scvi-tools registers them
    (all 0 for a field without a column); ``None`` when a value is not in the mapping."""
    mapping = pd.Index(state["categorical_mapping"])
    if key is None or (key.startswith("_scvi_") and key not in columns):
        # No obs column was given at setup: scvi-tools registers one category, code 0.
        return np.zeros(n_obs, dtype=np.int64)
    if key not in columns:
        return None
    codes = mapping.get_indexer(pd.Index(np.asarray(columns[key], dtype=object)))
    if (codes < 0).any():
        return None
    return codes.astype(np.int64)


def _aligned_like_expression(matrix, genes: pd.Index, reference_genes: pd.Index):
    """``matrix`` aligned to the model's genes; the expression's alignment already
    checked the overlap and reported the missing genes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        aligned, _ = align_genes(matrix, genes, reference_genes, min_overlap=0.0)
    return aligned


def _registered_columns(obs, registration, keep_new_batches, what, extra_columns) -> dict:
    """The batch, label and extra obs columns of new data, coded as registered."""
    columns = {}
    if registration.batch_key is not None:
        columns[registration.batch_key] = _batch_column(obs, registration, keep_new_batches, what)
    if registration.labels_key is not None:
        columns[registration.labels_key] = _labels_column(obs, registration, what)
    if extra_columns is not None:
        columns.update(extra_columns(obs))
    return columns


def _batch_column(
    obs: pd.DataFrame, registration: Registration, keep_new: bool, what: str
) -> np.ndarray:
    key = registration.batch_key
    if key not in obs.columns:
        if keep_new:
            warnings.warn(
                f"The {what} has no obs[{key!r}] (the reference's batch_key); its cells are "
                f"treated as one new batch {QUERY_BATCH!r}.",
                UserWarning,
                stacklevel=4,
            )
            return np.full(len(obs), QUERY_BATCH, dtype=object)
        return np.full(len(obs), registration.batches[0], dtype=object)
    values = obs[key].astype(object).to_numpy()
    if np.any(pd.isna(values)):
        raise ValueError(f"{what}.obs[{key!r}] has missing values; fill them first.")
    if keep_new:
        return values
    known = pd.Index(registration.batches)
    return np.where(known.get_indexer(values) >= 0, values, registration.batches[0])


def _labels_column(obs: pd.DataFrame, registration: Registration, what: str) -> np.ndarray:
    key, unlabeled = registration.labels_key, registration.unlabeled_category
    if key not in obs.columns:
        return np.full(len(obs), unlabeled, dtype=object)
    values = obs[key].astype(object).to_numpy()
    missing = pd.isna(values)
    values = np.where(missing, unlabeled, values)
    known = pd.Index([*registration.cell_types, unlabeled])
    new = known.get_indexer(values) < 0
    if new.any():
        names = sorted(map(str, pd.unique(values[new])))[:10]
        warnings.warn(
            f"{int(new.sum())} cells of the {what} carry labels the reference never saw "
            f"({', '.join(names)}); they are treated as unlabelled.",
            UserWarning,
            stacklevel=4,
        )
        values = np.where(new, unlabeled, values)
    return values
