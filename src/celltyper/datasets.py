"""Demo datasets bundled with celltyper, loadable without network access, and the
synthetic paired-profile task of RANKFORMER's paired mode.

This module is the user-facing name for the loaders in :mod:`celltyper.data`.
"""

from celltyper.data import kang_pbmc, planted_state_changes

__all__ = ["kang_pbmc", "planted_state_changes"]
