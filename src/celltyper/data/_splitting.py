"""Data splitting for semi-supervised training."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.dataloaders import AnnDataLoader, ConcatDataLoader


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


class LabelledUnlabelledSplitter(pl.LightningDataModule):
    """Yields ``[labelled_batch, unlabelled_batch]`` pairs; validates on labelled cells.

    Labelled cells (label code < ``n_labels``) are split per class into training and
    validation cells; every unlabelled cell is used for training. An epoch is a pass over
    the larger of the two training sets, the smaller one cycling.

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
        largest one (see :func:`balanced_resample`).
    include_unlabelled
        Train on the unlabelled cells too (the default); ``False`` leaves them out, for
        methods whose loss needs a label on every cell.
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
        **loader_kwargs,
    ):
        super().__init__()
        self.adata_manager = adata_manager
        self.batch_size = batch_size
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
        indices = [i for i in (self.labelled_sampling_idx, self.unlabelled_idx) if len(i)]
        return ConcatDataLoader(
            self.adata_manager,
            indices_list=indices,
            shuffle=True,
            batch_size=self.batch_size,
            drop_last=any(self._drop_last(len(i)) for i in indices),
            **self.loader_kwargs,
        )

    def val_dataloader(self):
        if self.n_val == 0:
            return []
        return AnnDataLoader(
            self.adata_manager,
            indices=self.val_idx,
            shuffle=False,
            batch_size=self.batch_size,
            **self.loader_kwargs,
        )
