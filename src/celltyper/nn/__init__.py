"""Layers and functions shared by celltyper's modules and training plans."""

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
    "drop_values_augmentation",
    "grad_reverse",
    "linear_ramp",
    "log1p_normalize",
    "mixup",
    "sample_dominant_mixup_lambda",
    "sharpen",
    "sigmoid_ramp",
    "soft_cross_entropy",
]
