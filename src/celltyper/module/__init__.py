"""Torch modules (scvi-tools ``BaseModuleClass`` subclasses), one per method."""

from ._base import CellTyperModule, LogExpressionClassifier
from ._cellular import CELLULARModule
from ._scnym import SCNYMModule

__all__ = [
    "CELLULARModule",
    "CellTyperModule",
    "LogExpressionClassifier",
    "SCNYMModule",
]
