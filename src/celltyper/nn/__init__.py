"""Layers and functions shared by celltyper's modules and training plans."""

from ._contrastive import batch_mixing_loss, centroid_distance_loss, supervised_soft_nn_loss
from ._functional import (
    CPM_TARGET_SUM,
    drop_values_augmentation,
    grad_reverse,
    linear_ramp,
    log1p_normalize,
    mixup,
    sample_dominant_mixup_lambda,
    sharpen,
    sigmoid_ramp,
    soft_cross_entropy,
)
from ._layers import DomainAdversary, GradientReversal

__all__ = [
    "CPM_TARGET_SUM",
    "DomainAdversary",
    "GradientReversal",
    "batch_mixing_loss",
    "centroid_distance_loss",
    "drop_values_augmentation",
    "grad_reverse",
    "linear_ramp",
    "log1p_normalize",
    "mixup",
    "sample_dominant_mixup_lambda",
    "sharpen",
    "sigmoid_ramp",
    "soft_cross_entropy",
    "supervised_soft_nn_loss",
]
