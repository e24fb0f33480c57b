"""Small helpers on cells x genes matrices: in memory (dense or sparse) or on disk.

A matrix on disk is an AnnData opened with ``backed="r"`` (an h5py dataset for a dense
``X``, anndata's backed CSR/CSC dataset for a sparse one) or a layer of an
``anndata.experimental.AnnCollection`` seen through scvi-tools' ``CollectionAdapter``.
Such a matrix is only ever read in contiguous blocks of rows
(:func:`iter_row_chunks`), never whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from scipy import sparse

#: Values (rows x columns) of one block read from a matrix on disk, or densified from a
#: sparse matrix in memory: 2**24 float32 values are 64 MiB.
CHUNK_VALUES = 2**24


def row_totals(matrix) -> np.ndarray:
    """Total of each row of a dense or sparse cells x genes matrix, as float64."""
    if not is_in_memory(matrix):
        return np.concatenate(
            [row_totals(block) for _, _, block in iter_row_chunks(matrix, dense=False)]
            or [np.zeros(0)]
        )
    return np.asarray(matrix.sum(axis=1), dtype=np.float64).reshape(-1)


def dense_float32(matrix) -> np.ndarray:
    """A dense float32 copy (or view) of a dense or sparse matrix."""
    return np.asarray(matrix.toarray() if sparse.issparse(matrix) else matrix, dtype=np.float32)


def log1p_scaled_counts(counts, target_sum: float):
    """``log1p(counts / cell total * target_sum)`` as float32, sparse in, sparse out.

    Cells without counts stay at zero.
    """
    totals = row_totals(counts)
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    if sparse.issparse(counts):
        normalised = (sparse.diags(scale) @ sparse.csr_matrix(counts, dtype=np.float64)).tocsr()
        normalised.data = np.log1p(normalised.data)
        return normalised.astype(np.float32)
    return np.log1p(np.asarray(counts, dtype=np.float64) * scale[:, None]).astype(np.float32)


def is_in_memory(matrix) -> bool:
    """Whether ``matrix`` is a numpy array or a scipy sparse matrix held in memory.

    An h5py dataset, anndata's backed sparse dataset and scvi-tools' ``ArrayFakerSparse``
    (a layer of an ``AnnCollection``: a scipy subclass in type only, without stored
    values) are not.
    """
    if isinstance(matrix, np.ndarray):
        return True
    # A real scipy matrix holds its index arrays; scvi's collection layer has none.
    return sparse.issparse(matrix) and (hasattr(matrix, "indptr") or hasattr(matrix, "row"))


def read_row_range(matrix, start: int, stop: int):
    """Rows ``start:stop`` of a matrix in memory or on disk, as stored (a scipy CSR
    matrix for a sparse one).

    A backed CSR dataset is read straight from its ``indptr``, ``indices`` and ``data``
    arrays (three contiguous reads): anndata's own slicing looks up scipy's installed
    version on every call (``importlib.metadata``, about 6 ms here), which cost more
    than the read itself for blocks of a few hundred rows.
    """
    from anndata.abc import CSRDataset

    if not isinstance(matrix, CSRDataset):
        return matrix[start:stop]
    n, n_columns = (int(d) for d in matrix.shape)
    start, stop = max(0, min(start, n)), max(0, min(stop, n))
    stop = max(start, stop)
    group = matrix.group
    indptr = np.asarray(group["indptr"][start : stop + 1], dtype=np.int64)
    if len(indptr) == 0:
        indptr = np.zeros(1, dtype=np.int64)
    first, last = int(indptr[0]), int(indptr[-1])
    return sparse.csr_matrix(
        (group["data"][first:last], group["indices"][first:last], indptr - first),
        shape=(stop - start, n_columns),
    )


def n_rows(matrix) -> int:
    """Number of rows of an in-memory or on-disk matrix (an ``AnnCollection`` layer
    included, which has no ``shape``)."""
    try:
        return int(matrix.shape[0])
    except AttributeError:
        collection = getattr(matrix, "collection", None)
        if collection is None:
            raise TypeError(f"Cannot tell the rows of a {type(matrix).__name__}.") from None
        return len(collection)


def n_columns(matrix) -> int:
    """Number of columns of an in-memory or on-disk matrix."""
    try:
        return int(matrix.shape[1])
    except AttributeError:
        collection = getattr(matrix, "collection", None)
        if collection is None:
            raise TypeError(f"Cannot tell the columns of a {type(matrix).__name__}.") from None
        return int(collection.shape[1])


def default_chunk_size(matrix, dense: bool = True) -> int:
    """Rows per block of :func:`iter_row_chunks`.

    Every row of an in-memory matrix that stays as it is stored (a numpy array, or a
    sparse matrix read without densifying); otherwise as many rows as hold
    :data:`CHUNK_VALUES` values (at least one).
    """
    rows = n_rows(matrix)
    if is_in_memory(matrix) and (not dense or not sparse.issparse(matrix)):
        return max(rows, 1)
    return max(1, CHUNK_VALUES // max(n_columns(matrix), 1))


def _check_rows(rows, n: int) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.ndim != 1 or not (np.issubdtype(rows.dtype, np.integer) or rows.size == 0):
        raise TypeError(
            f"rows must be a 1-d array of row positions, got {rows.dtype} {rows.shape}."
        )
    rows = rows.astype(np.int64)
    if rows.size and (rows[0] < 0 or rows[-1] >= n or np.any(np.diff(rows) <= 0)):
        raise ValueError(
            f"rows must be increasing positions in [0, {n}) without repeats; got "
            f"{rows.size} positions from {rows.min()} to {rows.max()}."
        )
    return rows


def _as_block(block, dense: bool):
    if dense:
        return dense_float32(block)
    return block


def iter_row_chunks(
    matrix,
    chunk_size: int | None = None,
    *,
    rows: np.ndarray | None = None,
    dense: bool = True,
) -> Iterator[tuple[int, int, Any]]:
    """Blocks of consecutive rows of a matrix in memory or on disk.

    A matrix on disk (see the module docstring) is read one contiguous range of rows at a
    time, so no more than ``chunk_size`` rows are ever in memory.

    Parameters
    ----------
    matrix
        Cells x genes: a numpy array, a scipy sparse matrix, an h5py dataset, anndata's
        backed sparse dataset, or an ``AnnCollection`` layer of scvi-tools'
        ``CollectionAdapter``.
    chunk_size
        Rows per block; ``None`` uses :func:`default_chunk_size`.
    rows
        Increasing positions of the rows to read (e.g. the labelled cells); ``None``
        reads every row. On disk, the matrix is read in contiguous ranges of
        ``chunk_size`` rows and the selected rows taken from each (ranges holding none
        are skipped).
    dense
        Yield dense float32 arrays; ``False`` yields blocks as stored (scipy CSR for a
        sparse matrix, a numpy array for a dense one).

    Yields
    ------
    ``(start, stop, block)``: ``block`` holds rows ``start:stop`` of the matrix, or of
    the selection ``rows`` when it is given.
    """
    n = n_rows(matrix)
    if chunk_size is None:
        chunk_size = default_chunk_size(matrix, dense)
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be a whole number >= 1, got {chunk_size!r}.")
    chunk_size = int(chunk_size)
    if rows is None:
        if n <= chunk_size and is_in_memory(matrix):
            yield 0, n, _as_block(matrix, dense)  # the matrix itself, not a copy
            return
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            yield start, stop, _as_block(read_row_range(matrix, start, stop), dense)
        return
    rows = _check_rows(rows, n)
    if is_in_memory(matrix):
        for start in range(0, len(rows), chunk_size):
            stop = min(start + chunk_size, len(rows))
            yield start, stop, _as_block(matrix[rows[start:stop]], dense)
        return
    for first in range(0, n, chunk_size):
        start, stop = np.searchsorted(rows, [first, first + chunk_size])
        if start == stop:
            continue
        block = read_row_range(matrix, first, min(first + chunk_size, n))
        yield int(start), int(stop), _as_block(block[rows[start:stop] - first], dense)
