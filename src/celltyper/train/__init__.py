"""Training plans for celltyper's modules."""

from ._base import ClassifierTrainingPlan, ModulePlan, make_optimizer
from ._callbacks import RestoreBestWeights
from ._contrastive import (
    ClassifierHeadTrainingPlan,
    ContrastiveTrainingPlan,
    JointClassifierTrainingPlan,
    warmup_cosine_factor,
)
from ._mixmatch import MixMatchTrainingPlan
from ._pretrain import FineTuningTrainingPlan, PseudoLabelDataModule, PseudoLabelTrainingPlan
from ._rankformer import RankformerTrainingPlan
from ._scatlasvae import AllCellsSplitter, SCATLASVAETrainingPlan

__all__ = [
    "AllCellsSplitter",
    "ClassifierHeadTrainingPlan",
    "ClassifierTrainingPlan",
    "ContrastiveTrainingPlan",
    "FineTuningTrainingPlan",
    "JointClassifierTrainingPlan",
    "MixMatchTrainingPlan",
    "ModulePlan",
    "PseudoLabelDataModule",
    "PseudoLabelTrainingPlan",
    "RankformerTrainingPlan",
    "RestoreBestWeights",
    "SCATLASVAETrainingPlan",
    "make_optimizer",
    "warmup_cosine_factor",
]
