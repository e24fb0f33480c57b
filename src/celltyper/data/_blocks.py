"""Training minibatches of cells on disk, read in runs of consecutive rows.

From a file opened with ``backed="r"`` (or an AnnCollection of such files), scvi-tools'
``AnnDataLoader`` fancy-indexes a minibatch of scattered rows per step: one small h5
read per run of rows. On the 100,000-cell scale benchmark that reads about 8,000 cells/s,
more than half of an SCNYM epoch, where a contiguous read of a few thousand rows runs at
several hundred thousand cells/s. :class:`BlockShuffledLoader` shuffles blocks of
consecutive cells instead (block shuffling with a shuffle buffer): each pass takes the
blocks in a random order, ``blocks_per_buffer`` at a time, reads each with one
contiguous read and shuffles the buffer's cells, so a minibatch mixes cells of up to
``blocks_per_buffer`` places of the file.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from scipy import sparse
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.dataloaders import AnnDataLoader

from celltyper._utils import RowSource, default_chunk_size, dense_tensors, on_disk

#: Blocks read per shuffle buffer; a minibatch mixes cells of up to this many places.
BLOCKS_PER_BUFFER = 16
#: A block whose rows span more than this many times its cells is read row by row (a
#: contiguous read of its span would cost more than the scattered reads).
_MAX_SPAN_PER_CELL = 8


def registered_on_disk(adata_manager: AnnDataManager) -> bool:
    """Whether the registered expression is read from a file (``backed="r"``, an
    AnnCollection of backed files)."""
    return on_disk(adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY))


def default_block_cells(matrix, blocks_per_buffer: int = BLOCKS_PER_BUFFER) -> int:
    """Cells per block: a buffer of ``blocks_per_buffer`` blocks holds as many cells as
    one chunk of :func:`~celltyper._utils.iter_row_chunks` (about
    :data:`~celltyper._utils.CHUNK_VALUES` values) on disk."""
    return max(1, default_chunk_size(matrix) // blocks_per_buffer)


def _read_rows(source: RowSource, rows: np.ndarray) -> dict:
    """The fields of increasing ``rows`` (repeats allowed): one contiguous read of
    their span, or scattered reads where the span is much longer than the block."""
    span = int(rows[-1]) - int(rows[0]) + 1
    if span <= _MAX_SPAN_PER_CELL * len(rows):
        return source.read(rows)
    unique, inverse = np.unique(rows, return_inverse=True)
    return {key: array[unique][inverse] for key, array in source.arrays.items()}


def _concat(parts: Sequence) -> object:
    if sparse.issparse(parts[0]):
        return sparse.vstack(parts, format="csr")
    return np.concatenate([np.asarray(p) for p in parts])


class BlockShuffledLoader:
    """Minibatches of ``indices`` read from disk by blocks of consecutive cells.

    Each pass is a random order of the cells in which each run of ``blocks_per_buffer``
    blocks (``block_cells`` consecutive cells of the increasing ``indices`` each) comes
    together, shuffled; ``shuffle=False`` gives the cells in increasing row order. Yields
    the minibatch dicts scvi-tools' ``AnnDataLoader`` yields (registry key -> tensor).
    At most two buffers are held, matrices sparse as stored; each minibatch is densified
    on its own.

    Parameters
    ----------
    adata_manager
        The model's :class:`~scvi.data.AnnDataManager`.
    indices
        Positions of the cells (repeats allowed, as in class-balanced resampling).
    batch_size
        Cells per minibatch.
    shuffle
        Shuffle the blocks and the cells of each buffer anew every pass (draws from
        torch's global generator, so ``train(seed=...)`` fixes them).
    drop_last
        Drop a trailing minibatch smaller than ``batch_size``.
    block_cells
        Cells per block; ``None``: :func:`default_block_cells`.
    blocks_per_buffer
        Blocks shuffled together.
    data_and_attributes
        Registry keys to load; ``None``: every registered field.
    """

    def __init__(
        self,
        adata_manager: AnnDataManager,
        indices: np.ndarray,
        *,
        batch_size: int,
        shuffle: bool,
        drop_last: bool = False,
        block_cells: int | None = None,
        blocks_per_buffer: int = BLOCKS_PER_BUFFER,
        data_and_attributes: Sequence[str] | dict | None = None,
    ):
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}.")
        source = RowSource.from_manager(adata_manager)
        if data_and_attributes is not None:
            keys = list(data_and_attributes)
            source = RowSource({k: source.arrays[k] for k in keys}, source.obs_names)
        self.source = source
        self.indices = np.sort(np.asarray(indices, dtype=np.int64).reshape(-1))
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        if block_cells is None:
            matrix = adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
            block_cells = default_block_cells(matrix, blocks_per_buffer)
        self.block_cells = int(block_cells)
        self.blocks_per_buffer = int(blocks_per_buffer)

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _buffers(self) -> list[np.ndarray]:
        """Positions (into ``indices``) of each buffer's cells, blocks in pass order."""
        starts = np.arange(0, len(self.indices), self.block_cells)
        if self.shuffle:
            starts = starts[torch.randperm(len(starts)).numpy()]
        buffers = []
        for first in range(0, len(starts), self.blocks_per_buffer):
            blocks = [
                np.arange(s, min(s + self.block_cells, len(self.indices)))
                for s in starts[first : first + self.blocks_per_buffer]
            ]
            buffers.append(blocks)
        return buffers

    def _load(self, blocks: list[np.ndarray]) -> tuple[dict, np.ndarray]:
        """A buffer's fields (one read per block) and the pass order of its cells."""
        reads = [_read_rows(self.source, self.indices[b]) for b in blocks]
        fields = {key: _concat([r[key] for r in reads]) for key in reads[0]}
        n = sum(len(b) for b in blocks)
        order = torch.randperm(n).numpy() if self.shuffle else np.arange(n)
        return fields, order

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        pending: list[dict] = []  # parts of the minibatch being filled
        n_pending = 0
        n_left = len(self)
        for blocks in self._buffers():
            fields, order = self._load(blocks)
            start = 0
            while start < len(order) and n_left:
                take = order[start : start + self.batch_size - n_pending]
                start += len(take)
                pending.append({key: value[take] for key, value in fields.items()})
                n_pending += len(take)
                if n_pending == self.batch_size:
                    yield self._minibatch(pending)
                    pending, n_pending, n_left = [], 0, n_left - 1
        if pending and n_left:
            yield self._minibatch(pending)

    @staticmethod
    def _minibatch(parts: list[dict]) -> dict[str, torch.Tensor]:
        if len(parts) == 1:
            return dense_tensors(parts[0])
        return dense_tensors({key: _concat([p[key] for p in parts]) for key in parts[0]})


def cell_loader(
    adata_manager: AnnDataManager,
    indices: np.ndarray,
    *,
    batch_size: int,
    shuffle: bool,
    drop_last: bool = False,
    **loader_kwargs,
) -> AnnDataLoader | BlockShuffledLoader:
    """Minibatches of ``indices``: a :class:`BlockShuffledLoader` when the registered
    expression is on disk, scvi-tools' ``AnnDataLoader`` otherwise (and whenever
    ``loader_kwargs`` ask for ``DataLoader`` options such as ``num_workers``)."""
    block_kwargs = {k: v for k, v in loader_kwargs.items() if k != "data_and_attributes"}
    if registered_on_disk(adata_manager) and not block_kwargs:
        return BlockShuffledLoader(
            adata_manager,
            indices,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            data_and_attributes=loader_kwargs.get("data_and_attributes"),
        )
    return AnnDataLoader(
        adata_manager,
        indices=indices,
        shuffle=shuffle,
        batch_size=batch_size,
        drop_last=drop_last,
        **loader_kwargs,
    )
