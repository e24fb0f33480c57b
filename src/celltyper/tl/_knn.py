"""Label transfer by nearest neighbours in a model's latent space."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from mudata import MuData
from sklearn.neighbors import KNeighborsClassifier


def knn_transfer(
    model: Any,
    query: AnnData | MuData,
    reference: AnnData | MuData | None = None,
    labels_key: str | None = None,
    n_neighbors: int = 15,
    weighting: Literal["distance", "uniform"] = "distance",
    *,
    unlabeled_category: str | None = None,
    batch_size: int | None = None,
) -> pd.DataFrame:
    """Label transfer by nearest neighbours in a model's latent space.

    Cells are embedded with ``model.get_latent_representation`` (any celltyper model);
    each query cell takes the label most frequent among its ``n_neighbors`` nearest
    labelled reference cells (Euclidean distance, scikit-learn's
    :class:`~sklearn.neighbors.KNeighborsClassifier`). With ``"distance"`` weighting a
    neighbour at distance ``d`` votes ``1 / d`` (a neighbour at distance 0 outvotes the
    others).

    Parameters
    ----------
    model
        A trained celltyper model.
    query
        Cells to label (genes aligned by the model).
    reference
        Labelled cells; ``None`` uses the model's own data.
    labels_key
        Label column of ``reference.obs`` (or of the model's data when ``reference`` is
        ``None``); defaults to the model's registered labels.
    n_neighbors
        Neighbours consulted (at most the number of labelled reference cells).
    weighting
        ``"distance"`` or ``"uniform"`` votes.
    unlabeled_category
        Label of unlabelled reference cells, left out (as are missing values); defaults
        to the model's ``unlabeled_category``.
    batch_size
        Minibatch size of the embedding.

    Returns
    -------
    DataFrame indexed by the query's ``obs_names``: ``prediction``, ``probability`` (the
    winning label's share of the vote) and ``uncertainty`` (``1 - probability``).

    Examples
    --------
    >>> knn = celltyper.tl.knn_transfer(model, query, n_neighbors=15)
    >>> knn["prediction"], knn["uncertainty"]
    """
    if n_neighbors < 1:
        raise ValueError(f"n_neighbors must be >= 1, got {n_neighbors}.")
    if weighting not in ("distance", "uniform"):
        raise ValueError(f"weighting must be 'distance' or 'uniform', got {weighting!r}.")
    labels = _reference_labels(model, reference, labels_key)
    if unlabeled_category is None:
        unlabeled_category = model.registration.unlabeled_category
    labelled = ~pd.isna(labels) & (labels != unlabeled_category)
    if not labelled.any():
        raise ValueError("The reference has no labelled cell to transfer labels from.")
    reference_latent = model.get_latent_representation(
        reference, indices=np.flatnonzero(labelled), batch_size=batch_size
    )
    classifier = KNeighborsClassifier(
        n_neighbors=min(n_neighbors, int(labelled.sum())), weights=weighting
    )
    classifier.fit(reference_latent, labels[labelled].astype(str))
    query_latent = model.get_latent_representation(query, batch_size=batch_size)
    scores = classifier.predict_proba(query_latent)
    best = scores.argmax(axis=1)
    probability = scores[np.arange(len(best)), best]
    return pd.DataFrame(
        {
            "prediction": classifier.classes_[best],
            "probability": probability,
            "uncertainty": 1.0 - probability,
        },
        index=_obs(query, model)[0].obs_names.copy(),
    )


def _obs(data: AnnData | MuData, model: Any) -> tuple[AnnData, pd.DataFrame]:
    """The expression AnnData of ``data`` and the obs table with its annotations."""
    if isinstance(data, MuData):
        rna = data.mod[model.registration.rna_modality]
        return rna, data.obs.loc[rna.obs_names]
    return data, data.obs


def _reference_labels(model: Any, reference, labels_key: str | None) -> np.ndarray:
    """Label of every reference cell (unlabelled ones included), as objects."""
    if reference is None and labels_key is None:
        return np.asarray(model._registered_labels(), dtype=object)
    key = labels_key or model.registration.labels_key
    data = model.adata if reference is None else reference
    _, obs = _obs(data, model)
    if key is None or key not in obs.columns:
        where = "the model's data" if reference is None else "reference.obs"
        raise KeyError(f"labels_key={key!r} is not a column of {where}.")
    return obs[key].astype(object).to_numpy()
