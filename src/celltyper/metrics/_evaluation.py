"""Scores of soft cell-type predictions: accuracy, kappa, macro AUPRC and AUROC."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import average_precision_score, roc_auc_score

from ._classification import classification_scores
from ._validation import as_1d, check_same_length


def evaluation_scores(
    y_true: ArrayLike, probabilities: ArrayLike, classes: Sequence[str]
) -> dict[str, float]:
    """Score class probabilities against true labels (scPretrain's evaluation).

    Parameters
    ----------
    y_true
        True label of each cell.
    probabilities
        ``(n_cells, n_classes)`` predicted probabilities, column ``j`` for
        ``classes[j]``.
    classes
        Class names of the columns of ``probabilities``.

    Returns
    -------
    dict[str, float]
        ``accuracy`` and ``cohen_kappa`` of the most probable class (and
        ``balanced_accuracy``, see :func:`classification_scores`); ``macro_auprc`` and
        ``macro_auroc``: the unweighted means over the classes present in ``y_true`` of
        the one-vs-rest average precision and area under the ROC curve of that class's
        probability. A class without negatives (every cell has it) has no AUROC and is
        left out of that mean; ``nan`` when no class qualifies. True labels missing from
        ``classes`` count as errors and as negatives of every class.

    Raises
    ------
    ValueError
        If the inputs are empty, of different lengths, or ``probabilities`` does not have
        one column per class.

    Examples
    --------
    >>> scores = evaluation_scores(
    ...     ["B", "B", "NK"], [[0.9, 0.1], [0.4, 0.6], [0.2, 0.8]], ["B", "NK"]
    ... )
    >>> round(scores["accuracy"], 3), scores["macro_auroc"]
    (0.667, 1.0)
    """
    true = as_1d(y_true, "y_true").astype(str)
    probs = np.asarray(probabilities, dtype=float)
    classes = [str(c) for c in classes]
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise ValueError(
            f"`probabilities` must have shape (n_cells, {len(classes)}) to match `classes`, "
            f"got {probs.shape}"
        )
    check_same_length([true, probs], ["y_true", "probabilities"])
    if not np.all(np.isfinite(probs)):
        raise ValueError("`probabilities` holds NaN or infinite values")
    predicted = np.asarray(classes, dtype=object)[probs.argmax(axis=1)].astype(str)
    scores = classification_scores(true, predicted)
    auprc, auroc = [], []
    for j, name in enumerate(classes):
        positive = true == name
        if not positive.any():
            continue
        auprc.append(average_precision_score(positive, probs[:, j]))
        if not positive.all():
            auroc.append(roc_auc_score(positive, probs[:, j]))
    return {
        "accuracy": scores["accuracy"],
        "balanced_accuracy": scores["balanced_accuracy"],
        "cohen_kappa": scores["cohen_kappa"],
        "macro_auprc": float(np.mean(auprc)) if auprc else float("nan"),
        "macro_auroc": float(np.mean(auroc)) if auroc else float("nan"),
    }
