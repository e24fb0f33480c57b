"""Seeding that leaves the caller's random state alone."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Seed python, numpy and torch inside the block, restoring the caller's RNG after."""
    if seed is None:
        yield
        return
    import torch  # here, so that importing the helpers does not load torch

    # The legacy global numpy state is what third-party code (scanpy, sklearn) draws from.
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)  # noqa: NPY002
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)  # noqa: NPY002
