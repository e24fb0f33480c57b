"""Training plans for celltyper's modules."""

from ._base import (
    CellTyperTrainingPlan,
    ClassifierTrainingPlan,
    ModulePlan,
    OptimizerName,
    loss_terms,
    merge_minibatches,
)
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
    "CellTyperTrainingPlan",
    "OptimizerName",
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
    "loss_terms",
    "merge_minibatches",
    "warmup_cosine_factor",
]
