"""Input checks shared by the metric functions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike


def as_1d(values: ArrayLike, name: str) -> np.ndarray:
    """Return ``values`` as a 1-D array, or raise a ``ValueError`` naming ``name``."""
    # pandas Categorical/Series convert cleanly through np.asarray; a bare list of str too.
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"`{name}` must be one-dimensional, got an array of shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"`{name}` is empty; the metric needs at least one cell")
    return array


def check_same_length(arrays: Sequence[np.ndarray], names: Sequence[str]) -> None:
    """Raise a ``ValueError`` if the arrays do not all have the same length."""
    lengths = {name: len(array) for array, name in zip(arrays, names, strict=True)}
    if len(set(lengths.values())) > 1:
        found = ", ".join(f"len({name})={n}" for name, n in lengths.items())
        raise ValueError(f"inputs must have the same length, got {found}")
