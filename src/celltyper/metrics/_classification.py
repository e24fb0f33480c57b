"""Accuracy-family scores and calibration for cell-type predictions."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score, recall_score

from ._validation import as_1d, check_same_length

_DISPLAY_NAMES = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "macro_f1": "macro F1",
    "cohen_kappa": "Cohen's kappa",
    "ece": "ECE",
    "novelty_auroc": "novelty AUROC",
}


def classification_scores(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float]:
    """Score predicted cell-type labels against the true ones.

    Parameters
    ----------
    y_true
        True labels, one per cell (strings or integers).
    y_pred
        Predicted labels, one per cell. May contain labels that never occur in
        ``y_true`` (for example ``"Unknown"`` for rejected cells); such predictions
        count as errors.

    Returns
    -------
    dict[str, float]
        ``accuracy``
            Fraction of cells whose prediction equals the true label.
        ``balanced_accuracy``
            Mean over the true classes of the per-class recall.
        ``macro_f1``
            Unweighted mean over the true classes of the per-class F1 score; a true
            class that is never predicted scores 0.
        ``cohen_kappa``
            Cohen's kappa between the two labelings over all labels that occur in
            either; ``nan`` when both contain the same single label (kappa is then
            undefined).

    Raises
    ------
    ValueError
        If an input is empty, not one-dimensional, or the lengths differ.

    Notes
    -----
    The classes averaged over in ``balanced_accuracy`` and ``macro_f1`` are the labels
    present in ``y_true``, so a query with fewer types than the reference is not
    penalised for classes it does not contain.

    Examples
    --------
    >>> scores = classification_scores(["B", "B", "NK", "NK"], ["B", "NK", "NK", "NK"])
    >>> round(scores["accuracy"], 2), round(scores["balanced_accuracy"], 2)
    (0.75, 0.75)
    """
    true = as_1d(y_true, "y_true")
    pred = as_1d(y_pred, "y_pred")
    check_same_length([true, pred], ["y_true", "y_pred"])
    # Comparing as strings avoids sklearn refusing mixed types, e.g. integer-coded truth
    # against predictions that include "Unknown".
    if true.dtype.kind != pred.dtype.kind:
        true, pred = true.astype(str), pred.astype(str)
    labels = np.unique(true)

    if np.unique(np.concatenate([labels, np.unique(pred)])).size == 1:
        # Chance agreement is 1, so kappa is 0/0; sklearn would warn and return nan anyway.
        kappa = float("nan")
    else:
        kappa = float(cohen_kappa_score(true, pred))
    return {
        "accuracy": float(accuracy_score(true, pred)),
        # Macro recall over the true classes is balanced accuracy; computing it this way
        # keeps predicted-only classes (e.g. "Unknown") out of the average without a
        # warning.
        "balanced_accuracy": float(
            recall_score(true, pred, labels=labels, average="macro", zero_division=0)
        ),
        "macro_f1": float(f1_score(true, pred, labels=labels, average="macro", zero_division=0)),
        "cohen_kappa": kappa,
    }


def expected_calibration_error(
    confidence: ArrayLike, correct: ArrayLike, n_bins: int = 15
) -> float:
    """Expected calibration error (ECE) of prediction confidences.

    Confidences are grouped into ``n_bins`` equal-width bins on ``[0, 1]``; the ECE is
    the average over bins of ``|accuracy(bin) - mean confidence(bin)|``, weighted by the
    fraction of cells in the bin. Bins are closed on the right, ``(lo, hi]``, except the
    first, which also holds a confidence of exactly 0.

    Parameters
    ----------
    confidence
        Confidence of each prediction, in ``[0, 1]`` (e.g. the maximum class
        probability).
    correct
        Whether each prediction was right (booleans or 0/1).
    n_bins
        Number of equal-width bins.

    Returns
    -------
    float
        The ECE, between 0 (perfectly calibrated) and 1.

    Raises
    ------
    ValueError
        If an input is empty, the lengths differ, a confidence is outside ``[0, 1]`` or
        not finite, ``correct`` is not boolean/0-1, or ``n_bins < 1``.

    Examples
    --------
    >>> round(expected_calibration_error([0.9, 0.9, 0.6, 0.6], [1, 1, 1, 0], n_bins=10), 3)
    0.1
    """
    conf = as_1d(confidence, "confidence").astype(float)
    hit = as_1d(correct, "correct")
    check_same_length([conf, hit], ["confidence", "correct"])
    if isinstance(n_bins, bool) or int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"`n_bins` must be a positive integer, got {n_bins!r}")
    if not np.all(np.isfinite(conf)) or conf.min() < 0 or conf.max() > 1:
        raise ValueError(
            "`confidence` must hold finite values in [0, 1], found range "
            f"[{np.nanmin(conf)}, {np.nanmax(conf)}]; pass probabilities, not logits"
        )
    if hit.dtype != bool:
        if not np.isin(hit, [0, 1]).all():
            raise ValueError("`correct` must be boolean or 0/1")
        hit = hit.astype(bool)

    edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    # Counting inner edges strictly below each confidence gives (lo, hi] bins, using the
    # same float edges everywhere so boundary values land consistently.
    bin_index = np.searchsorted(edges[1:-1], conf, side="left")
    counts = np.bincount(bin_index, minlength=n_bins)
    conf_sum = np.bincount(bin_index, weights=conf, minlength=n_bins)
    hit_sum = np.bincount(bin_index, weights=hit.astype(float), minlength=n_bins)
    # |sum(hit) - sum(conf)| / N per bin equals the bin-size weighted gap and needs no
    # division by empty bins.
    return float(np.abs(hit_sum - conf_sum).sum() / counts.sum())


def format_scores(scores: Mapping[str, float], digits: int = 3) -> str:
    """Format a dictionary of scores as one readable line.

    Parameters
    ----------
    scores
        Score names and values, e.g. the output of :func:`classification_scores`.
    digits
        Decimal places shown for each value.

    Returns
    -------
    str
        The scores in their input order, e.g.
        ``"accuracy 0.912 | balanced accuracy 0.905 | macro F1 0.880 | Cohen's kappa 0.870"``.

    Examples
    --------
    >>> format_scores({"accuracy": 0.91234, "macro_f1": 0.5})
    'accuracy 0.912 | macro F1 0.500'
    """
    parts = []
    for key, value in scores.items():
        name = _DISPLAY_NAMES.get(key, key.replace("_", " "))
        if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.number):
            shown = str(value)
        elif isinstance(value, int | np.integer):
            shown = str(int(value))
        else:
            shown = f"{float(value):.{digits}f}"
        parts.append(f"{name} {shown}")
    return " | ".join(parts)
