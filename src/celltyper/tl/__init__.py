"""Tools on top of a trained model: classic classifiers on its representation.

- :func:`classic_classifier`: a scikit-learn classifier (logistic regression, random
  forest or SVM) fitted on a model's latent representation of labelled cells.
- :func:`knn_transfer`: label transfer by nearest labelled neighbours in a model's latent
  space, with an uncertainty.
"""

from ._classic import LatentTransformer, classic_classifier
from ._knn import knn_transfer

__all__ = ["LatentTransformer", "classic_classifier", "knn_transfer"]
