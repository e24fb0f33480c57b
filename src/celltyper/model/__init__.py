"""User-facing models. Every class in ``__all__`` follows the shared contract."""

from ._cellular import CELLULAR
from ._rankformer import RANKFORMER
from ._scatlasvae import SCATLASVAE
from ._scnym import SCNYM
from ._scpretrain import SCPRETRAIN

__all__ = ["CELLULAR", "RANKFORMER", "SCATLASVAE", "SCNYM", "SCPRETRAIN"]
