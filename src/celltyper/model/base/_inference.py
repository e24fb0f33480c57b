"""The one inference loop of every model: cells read in large chunks of consecutive rows.

scvi-tools' ``AnnDataLoader`` reads a minibatch at a time: an AnnData view, a fancy-index
of the sparse matrix and a densification per minibatch of 128 cells. Here the cells a
model computes on are a :class:`RowSource` (the registered fields, by registry key), read
in chunks of :data:`~celltyper._utils.CHUNK_VALUES` values (about 8,000 cells at 2,000
genes): one read (a contiguous block of rows, also from a file opened with
``backed="r"``), one gene alignment and one sparse-to-dense conversion per chunk, then
the module's outputs on views of the chunk under ``torch.inference_mode``.

A model turns a chunk into its module's inputs with ``_chunk_inputs`` (see
:class:`~celltyper.model.base.AnnotationMixin`); the default densifies the matrices and
gives each registry key its scvi-tools dtype, so ``module.embed(tensors)`` and
``module.classify(tensors)`` receive what ``AnnDataLoader`` would give them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from celltyper._utils import CHUNK_VALUES

#: Minibatch of a module call at inference when the caller gives none: large enough for
#: efficient matrix products, small enough that the elementwise steps (normalisation,
#: activations) stay in the CPU's cache (measured fastest of 256 to 8,192 on 2 cores).
DEFAULT_INFERENCE_BATCH = 1024


def chunk_rows_for(n_genes: int, chunk_size: int | None = None) -> int:
    """Cells per chunk: ``chunk_size``, or as many as hold ``CHUNK_VALUES`` values."""
    if chunk_size is None:
        return max(1, CHUNK_VALUES // max(int(n_genes), 1))
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be a whole number >= 1, got {chunk_size!r}.")
    return int(chunk_size)


def check_batch_size(batch_size: int | None) -> None:
    """A minibatch size is ``None`` or a whole number >= 1."""
    if batch_size is not None and (
        isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a whole number >= 1 or None, got {batch_size!r}.")


def split_minibatches(inputs: dict[str, Any], batch_size: int) -> Iterator[dict[str, Any]]:
    """Views of consecutive ``batch_size`` cells of every input (tensors or anything
    that slices by rows, such as :class:`~celltyper.data.RankTokens`)."""
    n = len(next(iter(inputs.values())))
    for start in range(0, n, batch_size):
        yield {key: value[start : start + batch_size] for key, value in inputs.items()}


def sorted_indices(indices, n_obs: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``indices`` as increasing positions and the permutation back to the given order
    (``None`` when they were increasing already)."""
    if indices is None:
        return None, None
    positions = np.asarray(indices)
    if positions.dtype == bool:
        raise TypeError("indices must be cell positions, not a boolean mask.")
    positions = positions.astype(np.int64).reshape(-1)
    if len(positions) and (positions.min() < -n_obs or positions.max() >= n_obs):
        raise IndexError(
            f"indices must be positions in [0, {n_obs}); got values from "
            f"{positions.min()} to {positions.max()}."
        )
    positions = np.where(positions < 0, positions + n_obs, positions)
    if len(positions) < 2 or np.all(np.diff(positions) >= 0):
        return positions, None
    order = np.argsort(positions, kind="stable")
    return positions[order], np.argsort(order, kind="stable")
