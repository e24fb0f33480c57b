"""Preprocessing in scanpy's functional style."""

from ._normalize import log1p_cpm

__all__ = ["log1p_cpm"]
