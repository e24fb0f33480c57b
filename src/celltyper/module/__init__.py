"""Torch modules (scvi-tools ``BaseModuleClass`` subclasses), one per method."""

from ._base import CellTyperModule
from ._cellular import CELLULARModule
from ._scnym import SCNYMModule

__all__ = ["CELLULARModule", "CellTyperModule", "SCNYMModule"]
