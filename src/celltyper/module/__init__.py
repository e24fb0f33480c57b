"""Torch modules (scvi-tools ``BaseModuleClass`` subclasses), one per method."""

from ._base import CellTyperModule
from ._scnym import SCNYMModule

__all__ = ["CellTyperModule", "SCNYMModule"]
