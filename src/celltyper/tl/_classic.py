"""Classic scikit-learn classifiers on a celltyper model's representation."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from anndata import AnnData
from mudata import MuData
from scvi import REGISTRY_KEYS
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin, clone
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.svm import SVC

ClassifierKind = Literal["lr", "rf", "svm"]


class LatentTransformer(TransformerMixin, BaseEstimator):
    """scikit-learn transformer: AnnData/MuData -> the model's latent representation.

    Parameters
    ----------
    model
        Any celltyper model (only ``get_latent_representation`` is used).
    batch_size
        Minibatch size of the embedding.
    """

    def __init__(self, model: Any, batch_size: int | None = None):
        self.model = model
        self.batch_size = batch_size

    def fit(self, X: AnnData | MuData, y=None) -> LatentTransformer:
        # Nothing to learn: the representation belongs to the model.
        return self

    def transform(self, X: AnnData | MuData) -> np.ndarray:
        if not isinstance(X, AnnData | MuData):
            raise TypeError(
                f"LatentTransformer transforms AnnData or MuData objects, got {type(X).__name__}."
            )
        return self.model.get_latent_representation(X, batch_size=self.batch_size)

    def __sklearn_is_fitted__(self) -> bool:
        return True


def _estimator(kind: str, random_state: int, **kwargs) -> ClassifierMixin:
    if kind == "lr":
        return LogisticRegression(**{"max_iter": 1000, "random_state": random_state, **kwargs})
    if kind == "rf":
        params = {"n_estimators": 200, "random_state": random_state, "n_jobs": 1, **kwargs}
        return RandomForestClassifier(**params)
    if kind == "svm":
        return SVC(**{"probability": True, "random_state": random_state, **kwargs})
    raise ValueError(f"kind must be 'lr', 'rf' or 'svm', got {kind!r}.")


def classic_classifier(
    model: Any,
    adata: AnnData | MuData | None = None,
    labels_key: str | None = None,
    kind: ClassifierKind = "lr",
    *,
    unlabeled_category: str | None = None,
    random_state: int = 0,
    batch_size: int | None = None,
    **estimator_kwargs,
) -> Pipeline:
    """Fit a scikit-learn classifier on a model's representation of labelled cells.

    The use of a pretrained representation that scPretrain demonstrates: cells are
    embedded with ``model.get_latent_representation`` and a logistic regression
    (``"lr"``), random forest (``"rf"``) or RBF support vector machine (``"svm"``, with
    probability estimates) learns the labels.

    Parameters
    ----------
    model
        Any celltyper model (trained, or for SCPRETRAIN just pretrained).
    adata
        Cells to learn from; ``None`` uses the model's own data.
    labels_key
        Column of ``adata.obs`` with the labels; ``None`` uses the model's registered
        labels (only with ``adata=None``).
    kind
        ``"lr"``, ``"rf"`` or ``"svm"``.
    unlabeled_category
        Label of unlabelled cells, left out of the fit (as are missing values);
        defaults to the model's ``unlabeled_category``.
    random_state
        Seed of the estimator.
    batch_size
        Minibatch size of the embedding.
    **estimator_kwargs
        Passed to the scikit-learn estimator (e.g. ``C=0.1``, ``n_estimators=500``).

    Returns
    -------
    A fitted :class:`sklearn.pipeline.Pipeline` (``LatentTransformer`` -> estimator):
    ``predict(new_adata)`` and ``predict_proba(new_adata)`` embed new data with the model
    (genes aligned by it) and classify them; ``pipeline[-1]`` is the fitted estimator and
    ``pipeline.classes_`` its classes.

    Examples
    --------
    >>> clf = celltyper.tl.classic_classifier(model, adata, "cell_type", kind="lr")
    >>> clf.predict(other_adata)
    """
    if adata is None and labels_key is None:
        names = np.asarray([*model.cell_types, None], dtype=object)
        codes = np.asarray(model.get_from_registry(model.adata, REGISTRY_KEYS.LABELS_KEY)).reshape(
            -1
        )
        labels = names[np.minimum(codes, len(model.cell_types))]
    else:
        target = model.adata if adata is None else adata
        if labels_key is None or labels_key not in target.obs.columns:
            raise KeyError(f"labels_key={labels_key!r} is not a column of adata.obs.")
        labels = target.obs[labels_key].astype(object).to_numpy()
    if unlabeled_category is None:
        unlabeled_category = model.registration.unlabeled_category
    keep = np.array([v is not None and v == v and v != unlabeled_category for v in labels])
    if len(np.unique(labels[keep].astype(str))) < 2:
        raise ValueError(
            f"classic_classifier needs at least two labelled classes in {labels_key!r}, "
            f"found {sorted(set(labels[keep].astype(str)))}."
        )
    transformer = LatentTransformer(model, batch_size=batch_size)
    latent = model.get_latent_representation(adata, batch_size=batch_size)
    estimator = clone(_estimator(kind, random_state, **estimator_kwargs))
    estimator.fit(latent[keep], labels[keep].astype(str))
    return Pipeline([("latent", transformer), ("classifier", estimator)])
