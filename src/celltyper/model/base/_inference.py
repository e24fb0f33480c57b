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

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import sparse
from scvi.data._utils import registry_key_to_default_dtype

from celltyper._utils import CHUNK_VALUES, is_in_memory, select_gene_columns

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


def _on_disk(array) -> bool:
    if isinstance(array, AlignedRows):
        return array.on_disk
    return not (isinstance(array, np.ndarray) or is_in_memory(array))


def take_rows(array, rows: slice | np.ndarray):
    """Rows of an in-memory or on-disk array; on disk, increasing ``rows`` are read as
    the one contiguous block that spans them (the caller keeps that span short)."""
    if isinstance(rows, slice) or not _on_disk(array) or isinstance(array, AlignedRows):
        return array[rows]
    if len(rows) == 0:
        return array[0:0]
    first = int(rows[0])
    block = array[first : int(rows[-1]) + 1]
    return block[rows - first]


class AlignedRows:
    """A user's matrix (in memory or on disk) seen in the model's gene order, row blocks
    read on demand: missing genes are zero columns, extra genes are dropped.

    Parameters
    ----------
    matrix
        Cells x the user's genes.
    positions
        For each model gene, its column in ``matrix`` (-1: missing); ``None`` when the
        genes already match.
    check
        Called with each block as read (in the user's genes), e.g. to reject NaN values.
    """

    def __init__(
        self,
        matrix,
        positions: np.ndarray | None,
        check: Callable[[Any], None] | None = None,
    ):
        self.matrix = matrix
        self.positions = positions
        self.check = check
        self.on_disk = _on_disk(matrix)
        n_genes = matrix.shape[1] if positions is None else len(positions)
        self.shape = (int(matrix.shape[0]), int(n_genes))

    def __getitem__(self, rows):
        block = take_rows(self.matrix, rows)
        if self.check is not None:
            self.check(block)
        if self.positions is None:
            return block
        return select_gene_columns(block, self.positions)


class RowSource:
    """The registered fields of the cells a model computes on, read by blocks of rows.

    Parameters
    ----------
    arrays
        Registry key -> an array with one row per cell: a numpy array, a scipy sparse
        matrix, a matrix on disk (h5py dataset, anndata's backed sparse dataset) or an
        :class:`AlignedRows`.
    obs_names
        The cells' names.
    """

    def __init__(self, arrays: dict[str, Any], obs_names: pd.Index):
        self.arrays = {
            key: value.to_numpy() if isinstance(value, pd.DataFrame | pd.Series) else value
            for key, value in arrays.items()
        }
        self.obs_names = pd.Index(obs_names)
        self.on_disk = any(_on_disk(a) for a in self.arrays.values())

    @classmethod
    def from_manager(cls, manager) -> RowSource:
        """Every field of an AnnData registered by ``manager``."""
        arrays = {key: manager.get_from_registry(key) for key in manager.data_registry}
        return cls(arrays, manager.adata.obs_names)

    @property
    def n_obs(self) -> int:
        return len(self.obs_names)

    def read(self, rows: slice | np.ndarray) -> dict[str, Any]:
        """The fields of ``rows`` as stored (matrices dense or scipy sparse)."""
        return {key: take_rows(array, rows) for key, array in self.arrays.items()}

    def selectors(
        self, indices: np.ndarray | None, chunk_size: int
    ) -> Iterator[slice | np.ndarray]:
        """Row selections of at most ``chunk_size`` cells, in increasing row order.

        Without ``indices``: consecutive ranges. With (increasing) ``indices``: on disk,
        the selected rows of each range of ``chunk_size`` rows, so no read spans more;
        in memory, ``chunk_size`` of them at a time.
        """
        n = self.n_obs
        if indices is None:
            for start in range(0, n, chunk_size):
                yield slice(start, min(start + chunk_size, n))
            return
        if not self.on_disk:
            for start in range(0, len(indices), chunk_size):
                yield indices[start : start + chunk_size]
            return
        for first in range(0, n, chunk_size):
            start, stop = np.searchsorted(indices, [first, first + chunk_size])
            if start < stop:
                yield indices[start:stop]


def dense_tensors(block: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A chunk's fields as tensors: matrices densified once, each registry key in the
    dtype scvi-tools' ``AnnDataLoader`` gives it (float32, int64 for categories), obs
    fields as ``(n, 1)`` columns."""
    tensors = {}
    for key, value in block.items():
        dtype = np.dtype(registry_key_to_default_dtype(key))
        array = value.toarray() if sparse.issparse(value) else np.asarray(value)
        array = array.astype(dtype, copy=False)
        if array.ndim == 1:
            array = array.reshape(-1, 1)
        tensors[key] = torch.from_numpy(np.ascontiguousarray(array))
    return tensors


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
