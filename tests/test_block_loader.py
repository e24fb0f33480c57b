"""Training minibatches from disk read by blocks of consecutive cells.

``BlockShuffledLoader`` must give what scvi-tools' ``AnnDataLoader`` gives (every cell
once per pass, the same values and dtypes), read the file only in short contiguous
blocks, mix blocks within a minibatch, and draw its order from torch's seed.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch
from conftest import make_counts_adata
from scvi import REGISTRY_KEYS
from scvi.dataloaders import AnnDataLoader

import celltyper.model
from celltyper.data import BlockShuffledLoader, LabelledUnlabelledSplitter, cell_loader


@pytest.fixture
def managers(tmp_path):
    """The same cells registered in memory and from a file opened with backed='r'."""
    memory = make_counts_adata(cells_per=40, seed=3)
    path = tmp_path / "cells.h5ad"
    memory.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    out = []
    for adata in (memory, backed):
        celltyper.model.SCNYM.setup_anndata(adata, labels_key="train_label", batch_key="batch")
        out.append(celltyper.model.SCNYM(adata, n_hidden=8).adata_manager)
    return out


def _cells(batches) -> np.ndarray:
    return np.concatenate([b[REGISTRY_KEYS.X_KEY].numpy() for b in batches])


def test_one_pass_gives_every_cell_once_with_the_loader_values(managers):
    memory, backed = managers
    indices = np.arange(3, memory.adata.n_obs, 2)
    torch.manual_seed(0)
    loader = BlockShuffledLoader(backed, indices, batch_size=16, shuffle=True, block_cells=8)
    batches = list(loader)
    assert len(batches) == len(loader) == -(-len(indices) // 16)
    assert [len(b[REGISTRY_KEYS.X_KEY]) for b in batches[:-1]] == [16] * (len(batches) - 1)
    reference = next(iter(AnnDataLoader(memory, indices=indices, batch_size=len(indices))))
    for key, expected in reference.items():
        got = torch.cat([b[key] for b in batches])
        assert got.dtype == expected.dtype and got.shape == expected.shape
    # The same cells (rows of X with their labels), in another order.
    rows = torch.cat([b[REGISTRY_KEYS.X_KEY] for b in batches])
    labels = torch.cat([b[REGISTRY_KEYS.LABELS_KEY] for b in batches])
    got = torch.cat([rows, labels.float()], 1).numpy()
    want = torch.cat(
        [reference[REGISTRY_KEYS.X_KEY], reference[REGISTRY_KEYS.LABELS_KEY].float()], 1
    ).numpy()
    np.testing.assert_array_equal(got[np.lexsort(got.T)], want[np.lexsort(want.T)])
    assert not np.array_equal(got, want)  # shuffled


def test_unshuffled_minibatches_equal_the_anndataloader(managers):
    memory, backed = managers
    indices = np.arange(memory.adata.n_obs)
    ours = BlockShuffledLoader(backed, indices, batch_size=32, shuffle=False, block_cells=10)
    theirs = AnnDataLoader(memory, indices=indices, batch_size=32, shuffle=False)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key])


def test_repeated_cells_and_drop_last(managers):
    _, backed = managers
    indices = np.array([5, 5, 5, 9, 9, 30, 31, 32, 33, 100, 101])
    loader = BlockShuffledLoader(
        backed, indices, batch_size=4, shuffle=True, drop_last=True, block_cells=3
    )
    batches = list(loader)
    assert len(batches) == len(loader) == 2
    assert all(len(b[REGISTRY_KEYS.X_KEY]) == 4 for b in batches)


def test_reads_are_contiguous_blocks_and_minibatches_mix_blocks(managers, disk_reads):
    _, backed = managers
    n = backed.adata.n_obs
    torch.manual_seed(1)
    loader = BlockShuffledLoader(
        backed, np.arange(n), batch_size=20, shuffle=True, block_cells=10, blocks_per_buffer=4
    )
    batches = list(loader)
    assert disk_reads and all(isinstance(r, slice) for r in disk_reads)
    assert max(r.stop - r.start for r in disk_reads) <= 10
    assert sum(r.stop - r.start for r in disk_reads) == n  # each cell read once a pass
    # Cells of a minibatch come from several blocks of 10 rows.
    x = backed.adata.to_memory().X.toarray()
    first = batches[0][REGISTRY_KEYS.X_KEY].numpy()
    rows = [int(np.flatnonzero((x == r).all(1))[0]) for r in first]
    assert len({r // 10 for r in rows}) > 1


def test_scattered_cells_are_read_row_by_row_not_by_their_span(managers, disk_reads):
    _, backed = managers
    indices = np.array([0, 60, 120, 180])
    list(BlockShuffledLoader(backed, indices, batch_size=2, shuffle=False, block_cells=4))
    assert len(disk_reads) == 1 and not isinstance(disk_reads[0], slice)


def test_the_order_follows_torchs_seed(managers):
    _, backed = managers
    indices = np.arange(backed.adata.n_obs)

    def first_pass(seed):
        torch.manual_seed(seed)
        loader = BlockShuffledLoader(backed, indices, batch_size=25, shuffle=True, block_cells=7)
        return _cells(loader)

    np.testing.assert_array_equal(first_pass(4), first_pass(4))
    assert not np.array_equal(first_pass(4), first_pass(5))


def test_cell_loader_picks_blocks_only_for_cells_on_disk(managers):
    memory, backed = managers
    indices = np.arange(10)
    assert isinstance(cell_loader(memory, indices, batch_size=4, shuffle=True), AnnDataLoader)
    assert isinstance(
        cell_loader(backed, indices, batch_size=4, shuffle=True), BlockShuffledLoader
    )
    # DataLoader options (workers) are AnnDataLoader's to honour.
    assert isinstance(
        cell_loader(backed, indices, batch_size=4, shuffle=True, num_workers=0), AnnDataLoader
    )
    with pytest.raises(ValueError, match="batch_size must be a whole number >= 1, got 0"):
        BlockShuffledLoader(backed, indices, batch_size=0, shuffle=True)


def test_splitter_from_disk_pairs_labelled_and_unlabelled_minibatches(managers):
    _, backed = managers
    splitter = LabelledUnlabelledSplitter(
        backed, n_labels=3, batch_size=16, unlabelled_ratio=1.0, validation_size=0.2
    )
    loader = splitter.train_dataloader()
    seen = []
    for _ in range(3):  # the unlabelled stream goes on from epoch to epoch
        pairs = list(loader)
        assert len(pairs) == len(loader)
        seen.append(_cells(pair[1] for pair in pairs))
    labelled = splitter.labelled_train_idx
    assert all(len(p[0][REGISTRY_KEYS.X_KEY]) <= 16 for p in pairs)
    assert len(labelled) and not np.array_equal(seen[0], seen[1])
    val = list(splitter.val_dataloader())
    assert sum(len(b[REGISTRY_KEYS.X_KEY]) for b in val) == splitter.n_val
