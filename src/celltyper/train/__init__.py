"""Training plans for celltyper's modules."""

from ._base import ClassifierTrainingPlan, make_optimizer
from ._callbacks import RestoreBestWeights
from ._contrastive import (
    ClassifierHeadTrainingPlan,
    ContrastiveTrainingPlan,
    warmup_cosine_factor,
)
from ._mixmatch import MixMatchTrainingPlan

__all__ = [
    "ClassifierHeadTrainingPlan",
    "ClassifierTrainingPlan",
    "ContrastiveTrainingPlan",
    "MixMatchTrainingPlan",
    "RestoreBestWeights",
    "make_optimizer",
    "warmup_cosine_factor",
]
