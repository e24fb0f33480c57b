"""K-means pseudo-labels of every cell, and the data module scPretrain pretrains on."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from scipy import sparse
from scvi import REGISTRY_KEYS
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from celltyper._utils import is_in_memory
from celltyper.nn import kmeans

from ._distributed import drops_single_cell, replica

#: Minibatch keys of :class:`PseudoLabelDataModule` besides the expression.
DATASET_KEY = "dataset"
PSEUDO_LABELS_KEY = "pseudo_labels"


def n_clusters_for(n_cells: int, cells_per_cluster: int) -> int:
    """``n_cells // cells_per_cluster + 1`` clusters, kept within ``[2, n_cells]``.

    The paper's ``K = n / r + 1``; a dataset of fewer than ``r`` cells would otherwise get a
    single cluster (a head with nothing to learn), so ``K`` is at least 2, and never
    more than the number of cells (a one-cell dataset gets one cluster).
    """
    if cells_per_cluster < 1:
        raise ValueError(f"resolutions must be positive cell counts, got {cells_per_cluster}.")
    return int(min(n_cells, max(2, n_cells // cells_per_cluster + 1)))


def check_resolutions(resolutions: Sequence[int]) -> tuple[int, ...]:
    """``resolutions`` as a tuple of positive cells-per-cluster counts (or a ValueError)."""
    resolutions = tuple(int(r) for r in resolutions)
    if not resolutions:
        raise ValueError("resolutions must name at least one cells-per-cluster value.")
    for r in resolutions:
        n_clusters_for(1, r)  # validates r
    return resolutions


def kmeans_pseudo_labels(
    features,
    datasets: np.ndarray,
    dataset_names: Sequence[str],
    resolutions: Sequence[int],
    *,
    phase: int,
    seed: int,
    transform: Callable[[Tensor], Tensor] | None = None,
    device: str | torch.device = "cpu",
    progress_bar: bool = False,
    **kmeans_kwargs,
) -> tuple[np.ndarray, list[list[int]], pd.DataFrame]:
    """K-means clusters of every dataset at every resolution (one phase of scPretrain).

    Parameters
    ----------
    features
        Rows to cluster, cells x features: dense, sparse, a tensor, or a matrix on disk
        (backed AnnData, ``AnnCollection`` layer), read in blocks of consecutive rows.
    datasets
        Dataset code ``0 .. D-1`` of each cell; each dataset is clustered on its own.
    dataset_names
        Name of each dataset code.
    resolutions
        Cells per cluster of each resolution (see :func:`n_clusters_for`).
    phase
        Pretraining phase (recorded, and part of each clustering's seed).
    seed
        Seed; each (seed, phase, dataset, resolution) gets its own K-means seed.
    transform, device, progress_bar, **kmeans_kwargs
        Keywords of :func:`~celltyper.nn.kmeans`.

    Returns
    -------
    ``(n_cells, n_resolutions)`` cluster codes, the number of clusters per dataset and
    resolution, and one record per clustering (clusters, inertia, iterations, seconds).
    """
    labels = np.zeros((len(datasets), len(resolutions)), dtype=np.int64)
    sizes: list[list[int]] = []
    records = []
    for d, name in enumerate(dataset_names):
        members = np.flatnonzero(datasets == d)
        # A matrix on disk is read block by block inside kmeans, never subset whole.
        in_memory = isinstance(features, Tensor) or is_in_memory(features)
        rows, selection = (features[members], None) if in_memory else (features, members)
        sizes.append([])
        for r, per_cluster in enumerate(resolutions):
            k = n_clusters_for(len(members), per_cluster)
            k_seed = int(np.random.SeedSequence([seed, phase, d, r]).generate_state(1)[0])
            result = kmeans(
                rows,
                k,
                rows=selection,
                transform=transform,
                seed=k_seed,
                device=device,
                progress_bar=progress_bar,
                description=f"K-means phase {phase}, {name}, K={k}",
                **kmeans_kwargs,
            )
            labels[members, r] = result.labels
            sizes[-1].append(k)
            records.append(
                {
                    "phase": phase,
                    "dataset": name,
                    "cells_per_cluster": per_cluster,
                    "n_cells": len(members),
                    "n_clusters": k,
                    "inertia": result.inertia,
                    "n_iter": result.n_iter,
                    "seconds": result.seconds,
                }
            )
    return labels, sizes, pd.DataFrame.from_records(records)


class _PseudoLabelledRows(torch.utils.data.Dataset):
    """Cells as minibatch dicts: expression row, dataset code and pseudo-labels (and the
    registered batch code, when given)."""

    def __init__(
        self,
        matrix,
        datasets: np.ndarray,
        pseudo_labels: np.ndarray,
        batch_codes: np.ndarray | None = None,
    ):
        # A matrix on disk stays there: each minibatch reads its rows.
        self.on_disk = not is_in_memory(matrix)
        in_memory_sparse = not self.on_disk and sparse.issparse(matrix)
        self.matrix = sparse.csr_matrix(matrix) if in_memory_sparse else matrix
        self.datasets = torch.as_tensor(np.asarray(datasets), dtype=torch.long)
        self.pseudo_labels = torch.as_tensor(np.asarray(pseudo_labels), dtype=torch.long)
        self.batch_codes = (
            None
            if batch_codes is None
            else torch.as_tensor(np.asarray(batch_codes).reshape(-1, 1), dtype=torch.long)
        )

    def __len__(self) -> int:
        return len(self.datasets)

    def __getitem__(self, index: int) -> int:
        return index

    def collate(self, indices: list[int]) -> dict[str, Tensor]:
        # One sparse slice per minibatch instead of one per cell.
        order = np.asarray(indices)
        if self.on_disk:  # files are read in increasing row order
            order = np.sort(order)
        rows = self.matrix[order]
        rows = rows.toarray() if sparse.issparse(rows) else np.asarray(rows)
        tensors = {
            REGISTRY_KEYS.X_KEY: torch.as_tensor(rows, dtype=torch.float32),
            DATASET_KEY: self.datasets[order],
            PSEUDO_LABELS_KEY: self.pseudo_labels[order],
        }
        if self.batch_codes is not None:
            tensors[REGISTRY_KEYS.BATCH_KEY] = self.batch_codes[order]
        return tensors


class PseudoLabelDataModule(pl.LightningDataModule):
    """Shuffled minibatches of every cell with its dataset code and pseudo-labels.

    Pretraining uses every cell and holds none out (no validation loader).

    Parameters
    ----------
    matrix
        The registered expression, cells x genes (dense or sparse; rows are densified one
        minibatch at a time).
    datasets
        Dataset code of each cell.
    pseudo_labels
        ``(n_cells, n_resolutions)`` K-means clusters of each cell.
    batch_size
        Minibatch size (of each process, under a distributed strategy).
    seed
        Seed of the order of the cells under a distributed strategy, where every process
        draws the same order and reads its own share of it; one process draws from
        torch's global generator.
    batch_codes
        Registered batch code of each cell, yielded as scvi-tools' ``batch`` (batch
        centring reads it); ``None``: not yielded.
    """

    def __init__(
        self,
        matrix,
        datasets,
        pseudo_labels,
        *,
        batch_size: int,
        seed: int = 0,
        batch_codes: np.ndarray | None = None,
    ):
        super().__init__()
        self.rows = _PseudoLabelledRows(matrix, datasets, pseudo_labels, batch_codes)
        self.batch_size = batch_size
        self.seed = seed
        # The attributes scvi-tools' runner reads from a data splitter.
        self.n_train, self.n_val = len(self.rows), 0
        self.train_idx = np.arange(self.n_train)
        self.val_idx = self.test_idx = np.array([], dtype=int)

    def train_dataloader(self) -> DataLoader:
        rank, world_size = replica(self)
        # A trailing minibatch of one cell says little and is dropped.
        drop_last = drops_single_cell(len(self.rows), self.batch_size, world_size)
        sampler = None
        if world_size > 1:
            sampler = DistributedSampler(
                self.rows, num_replicas=world_size, rank=rank, shuffle=True, seed=self.seed
            )
        return DataLoader(
            self.rows,
            batch_size=self.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            collate_fn=self.rows.collate,
            drop_last=drop_last,
        )

    def val_dataloader(self) -> list:
        return []
