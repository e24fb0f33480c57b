"""Training plans for celltyper's modules."""

from ._base import (
    CellTyperTrainingPlan,
    OptimizerName,
    loss_terms,
    merge_minibatches,
    warmup_cosine_factor,
)
from ._callbacks import RestoreBestWeights
from ._contrastive import (
    ClassifierHeadTrainingPlan,
    ContrastiveTrainingPlan,
    JointClassifierTrainingPlan,
)
from ._mixmatch import MixMatchTrainingPlan
from ._pretrain import FineTuningTrainingPlan, PseudoLabelTrainingPlan
from ._rankformer import RankformerPretrainingPlan, RankformerTrainingPlan
from ._scatlasvae import SCATLASVAETrainingPlan

__all__ = [
    "CellTyperTrainingPlan",
    "ClassifierHeadTrainingPlan",
    "ContrastiveTrainingPlan",
    "FineTuningTrainingPlan",
    "JointClassifierTrainingPlan",
    "MixMatchTrainingPlan",
    "OptimizerName",
    "PseudoLabelTrainingPlan",
    "RankformerPretrainingPlan",
    "RankformerTrainingPlan",
    "RestoreBestWeights",
    "SCATLASVAETrainingPlan",
    "loss_terms",
    "merge_minibatches",
    "warmup_cosine_factor",
]
