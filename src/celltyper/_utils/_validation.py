"""Input checks shared by every model: clear errors, and the user's object left untouched."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse
from scvi.dataloaders import CollectionAdapter

from ._matrix import is_in_memory, iter_row_chunks

InputKind = Literal["counts", "normalized"]

_N_ROWS_SAMPLED = 5000


def get_matrix(adata: AnnData, layer: str | None, what: str = "adata"):
    """``adata.layers[layer]`` or ``adata.X``, with a clear error when it is missing.

    scvi-tools' ``CollectionAdapter`` of an ``AnnCollection`` has no ``X`` and only
    sparse layers; both limits are reported with the way out.
    """
    collection = _is_collection_adapter(adata)
    if layer is None:
        if collection:
            raise ValueError(
                f"{what} is an AnnCollection (through scvi-tools' CollectionAdapter), which "
                "has no X; pass layer= naming a sparse counts layer of its files, e.g. "
                "setup_anndata(adapter, layer='counts') (new data given to a model need "
                "the layer the model was set up with)."
            )
        if adata.X is None:
            raise ValueError(f"{what}.X is empty (None); pass layer= naming the counts layer.")
        return adata.X
    names = list(adata.layers.keys())
    if layer not in names:
        raise KeyError(f"layer={layer!r} is not in {what}.layers (available: {names}).")
    try:
        return adata.layers[layer]
    except TypeError as error:  # scvi-tools' adapter reads sparse layers only
        if not collection:
            raise
        raise TypeError(
            f"layer={layer!r} of the AnnCollection {what} is dense; scvi-tools' "
            "CollectionAdapter reads sparse layers only: store the layer as CSR in each "
            f"file ({error})."
        ) from error


def _is_collection_adapter(adata) -> bool:
    """Whether ``adata`` is scvi-tools' ``CollectionAdapter`` (posing as an AnnData)."""
    return type(adata) is CollectionAdapter


def _stored_values(matrix) -> np.ndarray:
    if sparse.issparse(matrix):
        return np.asarray(matrix.data)
    return np.asarray(matrix).reshape(-1)


def check_not_empty(adata: AnnData, what: str = "adata") -> None:
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(
            f"{what} is empty ({adata.n_obs} cells x {adata.n_vars} genes); nothing to model."
        )


def check_matrix_values(matrix, what: str = "adata.X") -> InputKind:
    """Reject NaN, infinite and negative values; tell raw counts from normalised data.

    A matrix on disk (a backed AnnData, an ``AnnCollection`` layer) is read in blocks of
    consecutive rows (:func:`~celltyper._utils.iter_row_chunks`), never whole.

    Returns
    -------
    ``"counts"`` when every value (in a sample of up to 5,000 cells) is a non-negative
    integer, else ``"normalized"``.
    """
    if not is_in_memory(matrix):
        return _check_chunked_values(matrix, what)
    values = _stored_values(matrix)
    _check_values(values, what)
    _raise_bad_values(*_bad_value_counts(values), what)
    rows = matrix[:_N_ROWS_SAMPLED]
    return _kind_of(_stored_values(rows))


def sampled_input_kind(matrix) -> InputKind:
    """Counts or normalised values, from the first 5,000 rows only (no value check).

    For a matrix on disk whose values :func:`check_matrix_values` has already read; the
    rows are read in blocks like everything else.
    """
    for start, stop, block in iter_row_chunks(matrix, dense=False):
        sampled = block[: _N_ROWS_SAMPLED - start] if stop > _N_ROWS_SAMPLED else block
        sample = _stored_values(sampled)
        if _kind_of(sample[np.isfinite(sample)]) == "normalized":
            return "normalized"
        if stop >= _N_ROWS_SAMPLED:
            break
    return "counts"


def _check_values(values: np.ndarray, what: str) -> None:
    if not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"{what} holds non-numeric values ({values.dtype}).")


def _bad_value_counts(values: np.ndarray) -> tuple[int, int, float]:
    """NaN count, infinite count and smallest finite value (``inf`` when none)."""
    n_bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if n_bad:  # reported before any other problem
        n_nan = int(np.isnan(values).sum())
        return n_nan, n_bad - n_nan, np.inf
    return 0, 0, float(values.min()) if values.size else np.inf


def _raise_bad_values(n_nan: int, n_inf: int, smallest: float, what: str) -> None:
    if n_nan or n_inf:
        raise ValueError(
            f"{what} contains {n_nan} NaN and {n_inf} infinite values; remove or impute them "
            "before setting up the model."
        )
    if smallest < 0:
        raise ValueError(
            f"{what} contains negative values (min {smallest:.3g}): it looks scaled or "
            "centred. Give raw counts (or log-normalised values for models that accept them)."
        )


def _kind_of(sample: np.ndarray) -> InputKind:
    if sample.size == 0 or np.all(np.abs(sample - np.round(sample)) < 1e-6):
        return "counts"
    return "normalized"


def _check_chunked_values(matrix, what: str) -> InputKind:
    """:func:`check_matrix_values` of a matrix on disk, one block of rows at a time."""
    n_nan = n_inf = 0
    smallest = np.inf
    kind: InputKind = "counts"
    for start, stop, block in iter_row_chunks(matrix, dense=False):
        values = _stored_values(block)
        _check_values(values, what)
        nan, inf, low = _bad_value_counts(values)
        n_nan, n_inf, smallest = n_nan + nan, n_inf + inf, min(smallest, low)
        if start < _N_ROWS_SAMPLED and kind == "counts":
            sampled = block[: _N_ROWS_SAMPLED - start] if stop > _N_ROWS_SAMPLED else block
            sample = _stored_values(sampled)
            kind = _kind_of(sample[np.isfinite(sample)])
    _raise_bad_values(n_nan, n_inf, smallest, what)
    return kind


def require_counts(kind: InputKind, model_name: str, what: str = "adata.X") -> None:
    """Raise when a model that models counts is given normalised data."""
    if kind != "counts":
        raise ValueError(
            f"{model_name} needs raw counts, but {what} holds non-integer values (it looks "
            "log-normalised). Register the raw counts, e.g. setup_anndata(adata, "
            "layer='counts')."
        )


def check_obs_key(obs: pd.DataFrame, key: str | None, argument: str, what: str = "adata"):
    """Raise a KeyError naming the argument when ``key`` is not a column of ``obs``."""
    if key is not None and key not in obs.columns:
        shown = ", ".join(map(repr, list(obs.columns)[:15]))
        raise KeyError(f"{argument}={key!r} is not a column of {what}.obs (columns: {shown}).")


def check_labels(
    obs: pd.DataFrame, labels_key: str, unlabeled_category: str, what: str = "adata"
) -> list[str]:
    """Check a label column for missing values and at least two labelled classes.

    Returns the labelled classes.
    """
    labels = obs[labels_key]
    values = labels.cat.categories if isinstance(labels.dtype, pd.CategoricalDtype) else labels
    if pd.api.types.is_numeric_dtype(values.dtype) or pd.api.types.is_bool_dtype(values.dtype):
        # scvi-tools matches labels to categories as strings; numbers fail deep inside it.
        raise TypeError(
            f"{what}.obs[{labels_key!r}] holds {values.dtype} values; cell types must be "
            f"strings, e.g. adata.obs[{labels_key!r}] = adata.obs[{labels_key!r}].astype(str)."
        )
    n_missing = int(labels.isna().sum())
    if n_missing:
        raise ValueError(
            f"{what}.obs[{labels_key!r}] has {n_missing} missing (NaN) labels. Mark unlabelled "
            f"cells with unlabeled_category={unlabeled_category!r} instead, e.g. "
            f"adata.obs[{labels_key!r}] = adata.obs[{labels_key!r}].astype(object)"
            f".fillna({unlabeled_category!r})."
        )
    classes = sorted({str(v) for v in labels.unique()} - {str(unlabeled_category)})
    if len(classes) < 2:
        raise ValueError(
            f"{what}.obs[{labels_key!r}] has {len(classes)} labelled class(es) {classes}; a "
            "classifier needs at least two (cells labelled "
            f"{unlabeled_category!r} count as unlabelled)."
        )
    return classes
