"""Torch modules (scvi-tools ``BaseModuleClass`` subclasses), one per method."""

from ._base import CellTyperModule, ClassifierModule, EncoderGeneMask, LogExpressionClassifier
from ._cellular import CELLULARModule
from ._rankformer import CONTEXT_KEY, TOKENS_KEY, RANKFORMERModule
from ._scatlasvae import SCATLASVAEModule
from ._scnym import SCNYMModule
from ._scpretrain import PseudoLabelHeads, SCPRETRAINModule

__all__ = [
    "CONTEXT_KEY",
    "TOKENS_KEY",
    "CELLULARModule",
    "CellTyperModule",
    "ClassifierModule",
    "EncoderGeneMask",
    "LogExpressionClassifier",
    "PseudoLabelHeads",
    "RANKFORMERModule",
    "SCATLASVAEModule",
    "SCNYMModule",
    "SCPRETRAINModule",
]
