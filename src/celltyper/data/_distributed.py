"""Minibatches under a distributed strategy: every process loads its shard of an epoch.

Lightning's default answer to several processes is to wrap a data loader's sampler in a
``DistributedSampler`` and rebuild the loader, which breaks the loaders of scvi-tools and
celltyper (their samplers yield whole minibatches). The splitters of celltyper build
their loaders sharded themselves instead: each one draws the same permutation on every
process (seeded by the training seed and the epoch) and gives each process its own
slice of it, so the processes together see every cell of an epoch, and each process
the same number of minibatches (DDP needs the processes to step together).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from scvi import settings
from scvi.data import AnnDataManager
from scvi.dataloaders._samplers import BatchDistributedSampler
from torch.utils.data import DataLoader

#: Keywords of ``AnnDataManager.create_torch_dataset``, the rest going to ``DataLoader``.
_DATASET_KEYWORDS = ("data_and_attributes", "load_sparse_tensor")


def replica(datamodule) -> tuple[int, int]:
    """``(rank, world_size)`` of the process a data module loads for.

    ``(0, 1)`` unless the module is attached to a Lightning trainer that runs several
    processes (``strategy="ddp..."`` with several devices or nodes).
    """
    trainer = getattr(datamodule, "trainer", None)
    if trainer is None:
        return 0, 1
    return int(trainer.global_rank), int(trainer.world_size)


def drops_single_cell(n_cells: int, batch_size: int, world_size: int = 1) -> bool:
    """Whether each process's last minibatch of an epoch over ``n_cells`` would hold one
    cell (which breaks BatchNorm in training mode) and is therefore dropped."""
    per_rank = math.ceil(n_cells / world_size)
    return per_rank > batch_size and per_rank % batch_size == 1


def sharded_loader(
    adata_manager: AnnDataManager,
    indices: Sequence[int] | np.ndarray,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    rank: int,
    world_size: int,
    drop_last: bool | None = None,
    **loader_kwargs,
) -> DataLoader:
    """Minibatches of this process's shard of ``indices`` (cells of the registered data).

    Every process draws the same order of ``indices`` (a permutation seeded by ``seed``
    and the epoch, which Lightning sets through the sampler's ``set_epoch``, when
    ``shuffle``), pads it to a multiple of ``world_size`` by repeating its first cells,
    and takes every ``world_size``-th cell from position ``rank``. Each minibatch is read
    with one call to the dataset, as scvi-tools' ``AnnDataLoader`` does.

    Parameters
    ----------
    adata_manager
        The model's :class:`~scvi.data.AnnDataManager`.
    indices
        Cells to load.
    batch_size
        Cells per minibatch on each process (the step of DDP sees ``world_size`` times
        as many).
    shuffle
        A new order every epoch; ``False`` keeps the order of ``indices``.
    seed
        Seed of the order, the same on every process.
    rank, world_size
        This process and the number of processes.
    drop_last
        Drop the last minibatch of each process when it is incomplete; ``None`` drops it
        only when it would hold a single cell.
    **loader_kwargs
        ``data_and_attributes`` and ``load_sparse_tensor`` of the dataset, and keywords of
        :class:`~torch.utils.data.DataLoader` (``num_workers``, ``pin_memory``, ...).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}.")
    indices = np.asarray(indices)
    if drop_last is None:
        drop_last = drops_single_cell(len(indices), batch_size, world_size)
    dataset_kwargs = {k: loader_kwargs.pop(k) for k in _DATASET_KEYWORDS if k in loader_kwargs}
    dataset = adata_manager.create_torch_dataset(indices=indices, **dataset_kwargs)
    sampler = BatchDistributedSampler(
        dataset,
        batch_size=batch_size,
        drop_last=drop_last,
        shuffle=shuffle,
        seed=seed,
        num_replicas=world_size,
        rank=rank,
    )
    loader_kwargs.setdefault("num_workers", settings.dl_num_workers)
    loader_kwargs.setdefault("persistent_workers", settings.dl_persistent_workers)
    # The sampler yields whole minibatches: no automatic batching.
    return DataLoader(dataset, sampler=sampler, batch_size=None, **loader_kwargs)


class ShardedConcatLoader:
    """``[minibatch of set 0, minibatch of set 1, ...]`` from sharded loaders of several
    sets of cells, as scvi-tools' ``ConcatDataLoader`` yields them on one process.

    An epoch is a pass over this process's shard of the largest set; the other sets
    cycle, each pass over them in a new order (drawn alike on every process). It is a
    plain iterable, not a ``DataLoader``, so Lightning leaves its samplers alone; it
    counts its epochs itself.

    Parameters
    ----------
    loaders
        Loaders of :func:`sharded_loader`, one per set of cells.
    """

    def __init__(self, loaders: Sequence[DataLoader]):
        if not loaders:
            raise ValueError("ShardedConcatLoader needs at least one loader, got none.")
        self.loaders = list(loaders)
        self._longest = int(np.argmax([len(loader) for loader in self.loaders]))
        self._epoch = 0
        self._passes = [0] * len(self.loaders)

    def __len__(self) -> int:
        return len(self.loaders[self._longest])

    def _pass(self, i: int) -> Iterator:
        """A new pass over loader ``i``, its order the next of the stream."""
        sampler = self.loaders[i].sampler
        sampler.set_epoch(self._epoch if i == self._longest else self._passes[i])
        self._passes[i] += 1
        return iter(self.loaders[i])

    def __iter__(self) -> Iterator[list]:
        iterators = [self._pass(i) for i in range(len(self.loaders))]
        self._epoch += 1
        for _ in range(len(self)):
            batches = []
            for i, iterator in enumerate(iterators):
                try:
                    batches.append(next(iterator))
                except StopIteration:  # only a shorter set runs out: it starts again
                    iterators[i] = self._pass(i)
                    batches.append(next(iterators[i]))
            yield batches


class OnEveryProcess:
    """A loader that every process reads whole, hidden from Lightning's sharding.

    The validation cells are few: each process scores all of them, so the logged
    validation values are those of one process, the same on every process (no padding
    repeats cells, no process lacks a value to reduce), and early stopping or
    best-weight restoring decide alike everywhere.

    Parameters
    ----------
    loader
        The loader one process would use.
    """

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        return iter(self.loader)
