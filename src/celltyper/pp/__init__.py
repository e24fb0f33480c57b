"""Preprocessing in scanpy's functional style."""

from ._cellular import auto_preprocess, normalize_cellular
from ._normalize import log1p_cpm

__all__ = ["auto_preprocess", "log1p_cpm", "normalize_cellular"]
