"""Rows of the registered fields, read in blocks from memory or from disk.

A :class:`RowSource` holds the fields a model computes on, by registry key; its reads
take a contiguous block of rows also from a file opened with ``backed="r"`` (one h5
read, where a fancy index of scattered rows costs one read per run of rows).
:func:`dense_tensors` gives a block the dtypes scvi-tools' ``AnnDataLoader`` gives.
Shared by the inference loop and the training loaders.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import sparse
from scvi.data._utils import registry_key_to_default_dtype

from ._genes import select_gene_columns
from ._matrix import is_in_memory, n_rows, read_row_range


def on_disk(array) -> bool:
    """Whether ``array`` is read from a file (or through one, as an :class:`AlignedRows`)."""
    if isinstance(array, AlignedRows):
        return array.on_disk
    return not (isinstance(array, np.ndarray) or is_in_memory(array))


def take_rows(array, rows: slice | np.ndarray):
    """Rows of an in-memory or on-disk array; on disk, increasing ``rows`` are read as
    the one contiguous block that spans them (the caller keeps that span short)."""
    if not on_disk(array) or isinstance(array, AlignedRows):
        return array[rows]
    if isinstance(rows, slice):
        if rows.step not in (None, 1):
            return array[rows]
        start, stop, _ = rows.indices(n_rows(array))
        return read_row_range(array, start, stop)
    if len(rows) == 0:
        return read_row_range(array, 0, 0)
    first = int(rows[0])
    block = read_row_range(array, first, int(rows[-1]) + 1)
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
        self.on_disk = on_disk(matrix)
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
        self.on_disk = any(on_disk(a) for a in self.arrays.values())

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
