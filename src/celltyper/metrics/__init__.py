"""Metrics for cell-type annotation, as pure functions on arrays.

- :func:`classification_scores`: accuracy, balanced accuracy, macro F1 and Cohen's kappa.
- :func:`expected_calibration_error`: gap between prediction confidence and accuracy.
- :func:`novelty_auroc`: how well a novelty score separates unseen cell types from known ones.
- :func:`format_scores`: one-line text summary of a score dictionary.
- :func:`evaluation_scores`: accuracy, kappa, macro AUPRC and AUROC of soft predictions.
"""

from ._classification import classification_scores, expected_calibration_error, format_scores
from ._evaluation import evaluation_scores
from ._novelty import novelty_auroc

__all__ = [
    "classification_scores",
    "evaluation_scores",
    "expected_calibration_error",
    "format_scores",
    "novelty_auroc",
]
