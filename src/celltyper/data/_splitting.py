"""Data splitting for semi-supervised training."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import lightning.pytorch as pl
import numpy as np
import torch
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.dataloaders import AnnDataLoader, ConcatDataLoader

from ._blocks import cell_loader, registered_on_disk
from ._distributed import OnEveryProcess, ShardedConcatLoader, replica, sharded_loader


def stratified_split(
    labels: np.ndarray, validation_size: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Positions of a per-class split of ``labels`` into (train, validation).

    Every class keeps at least one training cell; a class with a single cell gives no
    validation cell.
    """
    if not 0.0 <= validation_size < 1.0:
        raise ValueError(f"validation_size must be in [0, 1), got {validation_size}.")
    rng = np.random.default_rng(seed)
    train, validation = [np.array([], dtype=int)], [np.array([], dtype=int)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = min(round(validation_size * len(members)), len(members) - 1)
        validation.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(validation))


def balanced_resample(indices: np.ndarray, labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """``indices`` with every class brought to the size of the largest one.

    Each class keeps all its cells, repeated whole as often as fits, topped up with a
    random subset, so no cell is left out and minority classes weigh as much as the
    majority in every epoch.
    """
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    target = counts.max() if len(counts) else 0
    parts = []
    for label, count in zip(classes, counts, strict=True):
        members = indices[labels == label]
        repeats, extra = divmod(target, count)
        parts.append(np.tile(members, repeats))
        parts.append(rng.choice(members, extra, replace=False))
    return np.concatenate(parts) if parts else indices


class CyclingConcatDataLoader(ConcatDataLoader):
    """scvi-tools' ``ConcatDataLoader`` whose smaller loaders start a new pass when
    they run out, instead of ``itertools.cycle``.

    ``cycle`` keeps every minibatch of its first pass to replay it: the smaller set of
    cells stays in memory, densified (gigabytes for a few hundred thousand cells read
    from disk), and its repeats come in the same order. Here each repeat is a new pass,
    in a new random order, read afresh. ``drop_last`` is decided per set of cells (a
    set's trailing one-cell minibatch is dropped; another set keeps its only one).

    Parameters
    ----------
    adata_manager, indices_list, shuffle, batch_size, **loader_kwargs
        As in ``ConcatDataLoader``.
    drop_last
        Whether to drop the trailing minibatch of each set, one flag per set.
    """

    def __init__(
        self,
        adata_manager: AnnDataManager,
        indices_list: list[np.ndarray],
        *,
        shuffle: bool,
        batch_size: int,
        drop_last: list[bool],
        **loader_kwargs,
    ):
        super().__init__(
            adata_manager,
            indices_list=indices_list,
            shuffle=shuffle,
            batch_size=batch_size,
            drop_last=False,
            **loader_kwargs,
        )
        on_file = registered_on_disk(adata_manager)
        for i, (indices, drop) in enumerate(zip(indices_list, drop_last, strict=True)):
            if drop or on_file:
                self.dataloaders[i] = cell_loader(
                    adata_manager,
                    indices,
                    shuffle=shuffle,
                    batch_size=batch_size,
                    drop_last=drop,
                    data_and_attributes=self.data_and_attributes,
                    **self.data_loader_kwargs,
                )
        sizes = [len(loader) for loader in self.dataloaders]
        if 0 in sizes:
            # A set without a minibatch would be repeated forever without yielding one.
            empty = sizes.index(0)
            raise ValueError(
                f"Set {empty} of indices_list ({len(indices_list[empty])} cells) gives no "
                f"minibatch with batch_size={batch_size} and "
                f"drop_last={drop_last[empty]}; drop_last must be False for a set smaller "
                "than a minibatch."
            )
        self.largest_dl = self.dataloaders[int(np.argmax(sizes))]

    def __iter__(self):
        iterators = [
            iter(loader) if loader is self.largest_dl else _passes(loader)
            for loader in self.dataloaders
        ]
        return zip(*iterators, strict=False)


def _passes(loader):
    """Minibatches of ``loader``, pass after pass (each pass shuffled anew)."""
    while True:
        yield from loader


class FirstMinibatches:
    """The first ``n_batches`` minibatches of each pass over ``loader``.

    Over a shuffled loader every epoch is a new random part of its cells: a class-balanced
    resample can then be read a labelled set's worth at a time.
    """

    def __init__(self, loader, n_batches: int):
        if n_batches < 1:
            raise ValueError(f"n_batches must be >= 1, got {n_batches}.")
        self.loader = loader
        self.n_batches = n_batches

    @property
    def sampler(self):
        # A distributed loader's sampler is given its epoch through the wrapper.
        return self.loader.sampler

    def __len__(self) -> int:
        return min(self.n_batches, len(self.loader))

    def __iter__(self) -> Iterator:
        return itertools.islice(iter(self.loader), len(self))


class LabelledEpochLoader:
    """``[labelled_batch, unlabelled_batch]`` pairs, as many as the labelled loader has.

    Each pass takes the next ``len(labelled) * per_step`` unlabelled cells from a stream
    of random permutations of ``unlabelled_idx``: every unlabelled cell is seen in turn,
    in a new order after each pass over all of them.

    Under a distributed strategy (``world_size > 1``), ``labelled`` is this process's
    shard (``sharded_loader``) and the stream is drawn alike on every
    process from ``seed``: each step takes ``world_size * per_step`` cells of it, of which
    this process reads the ``rank``-th ``per_step``, so the processes share the stream as
    one process would read it with minibatches ``world_size`` times larger.
    """

    def __init__(
        self,
        labelled: AnnDataLoader | torch.utils.data.DataLoader,
        adata_manager: AnnDataManager,
        unlabelled_idx: np.ndarray,
        per_step: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        **loader_kwargs,
    ):
        self.labelled = labelled
        self.adata_manager = adata_manager
        self.unlabelled_idx = np.asarray(unlabelled_idx)
        self.per_step = per_step
        self.rank, self.world_size = rank, world_size
        self.loader_kwargs = loader_kwargs
        self._stream = np.array([], dtype=int)
        self._epochs_done = 0
        # One process draws from torch's global generator (seeded by train(seed=...));
        # several draw alike from their own.
        self._generator = torch.Generator().manual_seed(seed) if world_size > 1 else None
        self._block_passes: Iterator | None = None

    def __len__(self) -> int:
        return len(self.labelled)

    def _next_unlabelled(self, n: int) -> np.ndarray:
        while len(self._stream) < n:
            # torch's generator, so train(seed=...) makes the draws reproducible.
            order = torch.randperm(len(self.unlabelled_idx), generator=self._generator).numpy()
            self._stream = np.concatenate([self._stream, self.unlabelled_idx[order]])
        chosen, self._stream = self._stream[:n], self._stream[n:]
        return chosen

    def _epoch_unlabelled(self) -> np.ndarray:
        """This process's unlabelled cells of the next epoch, ``per_step`` per step."""
        n_steps = len(self.labelled)
        drawn = self._next_unlabelled(n_steps * self.per_step * self.world_size)
        if self.world_size == 1:
            return drawn
        return drawn.reshape(n_steps, self.world_size, self.per_step)[:, self.rank].ravel()

    def _unlabelled_minibatches(self) -> Iterator:
        """The unlabelled minibatches of the next epoch."""
        if self.world_size == 1 and registered_on_disk(self.adata_manager):
            # On disk, the stream is read by blocks of consecutive cells: one loader
            # whose passes continue from epoch to epoch.
            if self._block_passes is None:
                self._block_passes = _passes(
                    cell_loader(
                        self.adata_manager,
                        self.unlabelled_idx,
                        shuffle=True,
                        batch_size=self.per_step,
                        **self.loader_kwargs,
                    )
                )
            return itertools.islice(self._block_passes, len(self.labelled))
        return AnnDataLoader(
            self.adata_manager,
            indices=self._epoch_unlabelled(),
            shuffle=False,
            batch_size=self.per_step,
            **self.loader_kwargs,
        )

    def __iter__(self):
        if self.world_size > 1:
            # Lightning sets the epoch of the samplers it sees; this one is inside.
            self.labelled.sampler.set_epoch(self._epochs_done)
            self._epochs_done += 1
        unlabelled = self._unlabelled_minibatches()
        for pair in zip(self.labelled, unlabelled, strict=False):
            yield list(pair)


class LabelledUnlabelledSplitter(pl.LightningDataModule):
    """Yields ``[labelled_batch, unlabelled_batch]`` pairs; validates on labelled cells.

    Labelled cells (label code < ``n_labels``) are split per class into training and
    validation cells; every unlabelled cell is used for training. By default an epoch is
    a pass over the larger of the two training sets, the smaller one cycling. With
    ``unlabelled_ratio``, an epoch is a pass over the labelled cells and each step adds
    ``unlabelled_ratio * batch_size`` unlabelled cells, drawn afresh (every unlabelled
    cell in turn, in a new random order after each pass over them): the labelled cells
    then keep their weight, and an epoch its cost, however many unlabelled cells there
    are.

    Parameters
    ----------
    adata_manager
        The model's :class:`~scvi.data.AnnDataManager`.
    n_labels
        Number of labelled classes; codes ``>= n_labels`` mark unlabelled cells.
    validation_size
        Fraction of each class held out for validation (early stopping, calibration).
    batch_size
        Minibatch size of each of the two loaders.
    seed
        Seed of the split.
    allow_unlabelled_only
        Accept data without a labelled cell (fine-tuning a query model on its own cells).
    balance_classes
        Oversample labelled training cells so that every class is as frequent as the
        largest one (see :func:`balanced_resample`). The labelled cells still count at
        their number: each epoch reads as many of the resample as there are labelled
        training cells (a new random part of it every epoch), not n_types x the
        largest type, so an epoch's cost does not grow with the imbalance.
    include_unlabelled
        Train on the unlabelled cells too (the default); ``False`` leaves them out, for
        methods whose loss needs a label on every cell.
    unlabelled_ratio
        Unlabelled cells per labelled cell in each step, the epoch being a pass over the
        labelled cells; ``None``: an epoch is a pass over the larger set. Without a
        labelled training cell, an epoch is a pass over the unlabelled cells.
    """

    def __init__(
        self,
        adata_manager: AnnDataManager,
        n_labels: int,
        validation_size: float = 0.1,
        batch_size: int = 256,
        seed: int = 0,
        allow_unlabelled_only: bool = False,
        balance_classes: bool = False,
        include_unlabelled: bool = True,
        unlabelled_ratio: float | None = None,
        **loader_kwargs,
    ):
        super().__init__()
        if unlabelled_ratio is not None and not unlabelled_ratio > 0:
            raise ValueError(f"unlabelled_ratio must be > 0 or None, got {unlabelled_ratio}.")
        self.unlabelled_ratio = unlabelled_ratio
        self.adata_manager = adata_manager
        self.batch_size = batch_size
        self.seed = seed
        self.loader_kwargs = loader_kwargs
        codes = adata_manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY)
        codes = np.asarray(codes).reshape(-1)
        labelled = np.flatnonzero(codes < n_labels)
        self.unlabelled_idx = (
            np.flatnonzero(codes >= n_labels) if include_unlabelled else np.array([], dtype=int)
        )
        if len(labelled) == 0 and not allow_unlabelled_only:
            raise ValueError("No labelled cell to train on: every cell is unlabelled.")
        train_pos, val_pos = stratified_split(codes[labelled], validation_size, seed)
        self.labelled_train_idx = labelled[train_pos]
        self.labelled_sampling_idx = (
            balanced_resample(self.labelled_train_idx, codes[self.labelled_train_idx], seed)
            if balance_classes
            else self.labelled_train_idx
        )
        self.val_idx = labelled[val_pos]
        self.train_idx = np.sort(np.concatenate([self.labelled_train_idx, self.unlabelled_idx]))
        self.test_idx = np.array([], dtype=int)
        self.n_train = len(self.train_idx)
        self.n_val = len(self.val_idx)

    def _drop_last(self, n: int) -> bool:
        # A trailing minibatch of one cell breaks BatchNorm in training mode.
        return n > self.batch_size and n % self.batch_size == 1

    def train_dataloader(self):
        rank, world_size = replica(self)
        if (
            self.unlabelled_ratio is not None
            and len(self.labelled_sampling_idx)
            and len(self.unlabelled_idx)
        ):
            return self._labelled_epoch_loader(rank, world_size)
        indices = [i for i in (self.labelled_sampling_idx, self.unlabelled_idx) if len(i)]
        if world_size > 1:
            loader = ShardedConcatLoader([self._shard(i, rank, world_size) for i in indices])
        else:
            loader = CyclingConcatDataLoader(
                self.adata_manager,
                indices_list=indices,
                shuffle=True,
                batch_size=self.batch_size,
                drop_last=[self._drop_last(len(i)) for i in indices],
                **self.loader_kwargs,
            )
        epoch_cells = max(len(self.labelled_train_idx), len(self.unlabelled_idx))
        return self._cut_to(loader, epoch_cells, world_size)

    def _cut_to(self, loader, n_cells: int, world_size: int):
        """``loader``, or its first minibatches when a pass reads more than ``n_cells``
        cells (a class-balanced resample counts at its labelled cells' number)."""
        n_batches = max(1, math.ceil(n_cells / (self.batch_size * world_size)))
        return FirstMinibatches(loader, n_batches) if n_batches < len(loader) else loader

    def _shard(self, indices: np.ndarray, rank: int, world_size: int):
        """This process's shuffled minibatches of ``indices`` under a distributed
        strategy."""
        return sharded_loader(
            self.adata_manager,
            indices,
            batch_size=self.batch_size,
            shuffle=True,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            **self.loader_kwargs,
        )

    def _labelled_epoch_loader(self, rank: int = 0, world_size: int = 1) -> LabelledEpochLoader:
        if world_size > 1:
            labelled = self._shard(self.labelled_sampling_idx, rank, world_size)
        else:
            labelled = cell_loader(
                self.adata_manager,
                self.labelled_sampling_idx,
                shuffle=True,
                batch_size=self.batch_size,
                drop_last=self._drop_last(len(self.labelled_sampling_idx)),
                **self.loader_kwargs,
            )
        labelled = self._cut_to(labelled, len(self.labelled_train_idx), world_size)
        per_step = max(1, round(self.unlabelled_ratio * self.batch_size))
        return LabelledEpochLoader(
            labelled,
            self.adata_manager,
            self.unlabelled_idx,
            per_step,
            rank=rank,
            world_size=world_size,
            seed=self.seed,
            **self.loader_kwargs,
        )

    def val_dataloader(self):
        if self.n_val == 0:
            return []
        loader = cell_loader(
            self.adata_manager,
            self.val_idx,
            shuffle=False,
            batch_size=self.batch_size,
            **self.loader_kwargs,
        )
        # Under a distributed strategy every process scores every validation cell.
        return OnEveryProcess(loader) if replica(self)[1] > 1 else loader
