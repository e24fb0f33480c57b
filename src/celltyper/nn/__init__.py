"""Layers and functions shared by celltyper's modules and training plans."""

from ._contrastive import batch_mixing_loss, centroid_distance_loss, supervised_soft_nn_loss
from ._functional import (
    CPM_TARGET_SUM,
    drop_values_augmentation,
    grad_reverse,
    labelled_cross_entropy,
    linear_ramp,
    log1p_normalize,
    mixup,
    sample_dominant_mixup_lambda,
    sharpen,
    sigmoid_ramp,
    soft_cross_entropy,
)
from ._kmeans import KMeansResult, kmeans
from ._layers import DomainAdversary, GradientReversal
from ._transformer import MultiHeadSelfAttention, TransformerEncoder, TransformerEncoderLayer
from ._vae import CovariateDecoder, group_mmd, rbf_mmd

__all__ = [
    "CPM_TARGET_SUM",
    "CovariateDecoder",
    "DomainAdversary",
    "GradientReversal",
    "KMeansResult",
    "MultiHeadSelfAttention",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "batch_mixing_loss",
    "centroid_distance_loss",
    "drop_values_augmentation",
    "grad_reverse",
    "group_mmd",
    "kmeans",
    "labelled_cross_entropy",
    "linear_ramp",
    "log1p_normalize",
    "mixup",
    "rbf_mmd",
    "sample_dominant_mixup_lambda",
    "sharpen",
    "sigmoid_ramp",
    "soft_cross_entropy",
    "supervised_soft_nn_loss",
]
