"""Training plans for celltyper's modules."""

from ._base import ClassifierTrainingPlan, make_optimizer
from ._callbacks import RestoreBestWeights
from ._mixmatch import MixMatchTrainingPlan

__all__ = [
    "ClassifierTrainingPlan",
    "MixMatchTrainingPlan",
    "RestoreBestWeights",
    "make_optimizer",
]
