"""User-facing models. Every class in ``__all__`` follows the shared contract."""

from ._scnym import SCNYM

__all__ = ["SCNYM"]
