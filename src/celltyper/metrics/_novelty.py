"""Scores for detecting cells of types absent from the reference."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import roc_auc_score

from ._validation import as_1d, check_same_length


def novelty_auroc(scores: ArrayLike, is_novel: ArrayLike) -> float:
    """Area under the ROC curve for separating novel from known cells.

    Parameters
    ----------
    scores
        Novelty score of each cell; higher means more likely novel (for example
        ``1 - confidence`` or an entropy).
    is_novel
        Whether each cell truly belongs to a type absent from the reference (booleans
        or 0/1).

    Returns
    -------
    float
        1.0 when every novel cell scores above every known cell, 0.5 for a score
        unrelated to novelty, 0.0 when the ranking is exactly inverted. Ties count
        half.

    Raises
    ------
    ValueError
        If an input is empty, the lengths differ, a score is not finite, ``is_novel``
        is not boolean/0-1, or only one class (all novel or all known) is present.

    Examples
    --------
    >>> novelty_auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True])
    0.75
    """
    score = as_1d(scores, "scores").astype(float)
    novel = as_1d(is_novel, "is_novel")
    check_same_length([score, novel], ["scores", "is_novel"])
    if not np.all(np.isfinite(score)):
        raise ValueError("`scores` must be finite; found NaN or infinite values")
    if novel.dtype != bool:
        if not np.isin(novel, [0, 1]).all():
            raise ValueError("`is_novel` must be boolean or 0/1")
        novel = novel.astype(bool)
    n_novel = int(novel.sum())
    if n_novel in (0, novel.size):
        kind = "novel" if n_novel else "known"
        raise ValueError(
            f"novelty AUROC needs both novel and known cells, but all {novel.size} cells "
            f"are {kind}"
        )
    return float(roc_auc_score(novel, score))
