"""Tools on top of a trained model: classic classifiers on its representation.

- :func:`classic_classifier`: a scikit-learn classifier (logistic regression, random
  forest or SVM) fitted on a model's latent representation of labelled cells.
"""

from ._classic import LatentTransformer, classic_classifier

__all__ = ["LatentTransformer", "classic_classifier"]
