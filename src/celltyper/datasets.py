"""Demo datasets bundled with celltyper, loadable without network access.

This module is the user-facing name for the loaders in :mod:`celltyper.data`.
"""

from celltyper.data import kang_pbmc

__all__ = ["kang_pbmc"]
