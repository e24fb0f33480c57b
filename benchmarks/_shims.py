"""Compatibility shims for the peer tools, kept apart so that nothing else is patched.

- CellTypist 1.7.1 builds ``LogisticRegression(multi_class="ovr", ...)``, an argument
  scikit-learn removed in 1.8. :func:`celltypist_train` swaps, for the duration of one
  call only, the class CellTypist's trainer looks up for one that fits one binary
  logistic regression per class (what ``multi_class="ovr"`` did) and exposes the same
  ``coef_`` / ``intercept_`` / ``classes_`` that CellTypist reads when it predicts.
- scArches 0.6.1 imports ``anndata.read``, removed in anndata 0.12. :func:`import_scpoli`
  aliases it to ``anndata.read_h5ad`` only while scArches is imported, then removes the
  alias again.
- scib-metrics' Benchmarker finds neighbours with pynndescent, whose numba compilation
  costs about 100 s of CPU in every new process, longer than scoring the 1,638 labelled
  Kang cells. :func:`exact_scib_neighbours` swaps in exact neighbours from scikit-learn
  (exact, so no less accurate) for the duration of a ``with`` block.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier


class OneVsRestLogisticRegression(LogisticRegression):
    """Logistic regression fitted one-vs-rest, with the attributes of a single model.

    ``coef_`` has one row per class (one row for two classes, as scikit-learn's own
    binary model), so ``decision_function`` gives the per-class one-vs-rest scores that
    CellTypist turns into probabilities with a sigmoid.
    """

    def fit(self, X, y, sample_weight=None):
        base = LogisticRegression(**self.get_params())
        ovr = OneVsRestClassifier(base, n_jobs=self.n_jobs)
        ovr.fit(X, y)
        self.classes_ = ovr.classes_
        estimators = ovr.estimators_
        self.coef_ = np.vstack([e.coef_ for e in estimators])
        self.intercept_ = np.concatenate([e.intercept_ for e in estimators])
        self.n_features_in_ = X.shape[1]
        self.n_iter_ = np.asarray([int(np.max(e.n_iter_)) for e in estimators])
        return self


def _logistic_regression_factory(*, multi_class: str = "auto", **kwargs) -> LogisticRegression:
    """What CellTypist calls as ``LogisticRegression``: honours ``multi_class="ovr"``."""
    if multi_class == "ovr":
        return OneVsRestLogisticRegression(**kwargs)
    return LogisticRegression(**kwargs)


def celltypist_train(*args, **kwargs):
    """``celltypist.train`` that runs on scikit-learn >= 1.8 (see the module docstring)."""
    import celltypist

    # ``celltypist.train`` is the function; the module that defines it is looked up here.
    ct_train = importlib.import_module("celltypist.train")
    original = ct_train.LogisticRegression
    ct_train.LogisticRegression = _logistic_regression_factory
    try:
        return celltypist.train(*args, **kwargs)
    finally:
        ct_train.LogisticRegression = original


def import_scpoli():
    """Import scArches' ``scPoli`` class through the ``anndata.read`` alias.

    Raises
    ------
    ImportError
        When scArches is not installed or still fails to import; the message says why.
    """
    import anndata

    added = not hasattr(anndata, "read")
    if added:
        anndata.read = anndata.read_h5ad
    root = logging.getLogger()
    level = root.level
    try:
        # scArches warns at import about each optional model it cannot load.
        root.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()):
            module = importlib.import_module("scarches.models.scpoli")
        return module.scPoli
    except ImportError:
        raise
    except Exception as err:  # a broken third-party import can raise anything
        raise ImportError(f"scarches failed to import: {type(err).__name__}: {err}") from err
    finally:
        root.setLevel(level)
        if added:
            del anndata.read


def _exact_neighbours(X: np.ndarray, n_neighbors: int, **_):
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    n = min(n_neighbors, len(X))
    distances, indices = NearestNeighbors(n_neighbors=n).fit(X).kneighbors(X)
    return NeighborsResults(indices=indices, distances=distances)


@contextlib.contextmanager
def exact_scib_neighbours():
    """Inside the block, scib-metrics' Benchmarker uses exact scikit-learn neighbours."""
    core = importlib.import_module("scib_metrics.benchmark._core")
    original = core.pynndescent
    core.pynndescent = _exact_neighbours
    try:
        yield
    finally:
        core.pynndescent = original
