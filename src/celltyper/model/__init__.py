"""User-facing models. Every class in ``__all__`` follows the shared contract."""

from ._cellular import CELLULAR
from ._scnym import SCNYM

__all__ = ["CELLULAR", "SCNYM"]
