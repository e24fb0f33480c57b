"""Out-of-core training: backed AnnData and AnnCollections of backed files.

Every model sets up, trains and predicts from an AnnData opened with ``backed="r"`` and
from an ``AnnCollection`` of two backed files (through scvi-tools' ``CollectionAdapter``);
the file is never written, no read takes the whole matrix, and the statistics computed
block by block equal those computed in memory.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from anndata.experimental import AnnCollection
from conftest import read_size, tiny_kwargs
from scvi import REGISTRY_KEYS
from scvi.dataloaders import CollectionAdapter

import celltyper.model
from celltyper._utils import _matrix, check_matrix_values, iter_row_chunks
from celltyper.data import nonzero_gene_medians
from celltyper.model._cellular import centroid_distances, streamed_centroid_distances
from celltyper.model.base import _inference
from celltyper.model.base._centering import batch_log_means
from celltyper.nn import kmeans

FIXTURES = Path(__file__).parent / "fixtures"
MODELS = list(celltyper.model.__all__)
#: One epoch, few cells per step; SCPRETRAIN pretrains one epoch per phase.
_TRAIN = {"max_epochs": 1, "enable_progress_bar": False, "batch_size": 32}
_TRAIN_BY_MODEL = {
    "SCPRETRAIN": {"pretrain_epochs": 1, "pretrain_batch_size": 32, "kmeans_batch_size": 32}
}
#: Rows per block read from disk in these tests.
_ROWS_PER_CHUNK = 24


def _tiny(n_copies: int = 2) -> ad.AnnData:
    """The committed tiny counts, repeated ``n_copies`` times (unique cell names)."""
    tiny = ad.read_h5ad(FIXTURES / "tiny_counts.h5ad")
    adata = ad.concat([tiny] * n_copies, index_unique="-")
    adata.var = tiny.var.copy()
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    return adata


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def small_chunks(monkeypatch):
    """Blocks of at most ``_ROWS_PER_CHUNK`` rows from disk (the tiny file has 60 genes)."""
    monkeypatch.setattr(_matrix, "CHUNK_VALUES", _ROWS_PER_CHUNK * 60)
    # The inference loop (prediction, calibration) reads its own chunks of that size.
    monkeypatch.setattr(_inference, "CHUNK_VALUES", _ROWS_PER_CHUNK * 60)


def _fit(name: str, data, **setup):
    cls = getattr(celltyper.model, name)
    cls.setup_anndata(data, labels_key="train_label", batch_key="batch", **setup)
    model = cls(data, **tiny_kwargs(cls))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(**_TRAIN, **_TRAIN_BY_MODEL.get(name, {}))
    return model


@pytest.mark.parametrize("name", MODELS)
def test_trains_and_predicts_from_a_backed_file_without_reading_it_whole(
    name, tmp_path, small_chunks, disk_reads
):
    path = tmp_path / "cells.h5ad"
    memory = _tiny(n_copies=3)
    memory.write_h5ad(path)
    before = _digest(path)
    backed = ad.read_h5ad(path, backed="r")

    model = _fit(name, backed)
    predicted = model.predict()

    assert model.is_trained_
    assert len(predicted) == backed.n_obs
    assert set(predicted) <= set(model.cell_types)
    # No read took the labelled cells (180) or more: statistics, inference and training
    # (blocks of consecutive cells) came in blocks of at most 24 rows; SCPRETRAIN's
    # pretraining reads its minibatches by rows (32).
    sizes = [read_size(r) for r in disk_reads]
    assert sizes and max(sizes) <= _ROWS_PER_CHUNK + 8
    # The file is untouched; the registration lives in memory only.
    assert backed.isbacked and _digest(path) == before
    assert "_scvi_labels" not in ad.read_h5ad(path, backed="r").obs.columns


@pytest.mark.parametrize("name", ["SCNYM", "RANKFORMER"])
def test_trains_from_a_backed_file_with_a_dense_x(name, tmp_path, small_chunks):
    path = tmp_path / "dense.h5ad"
    memory = _tiny()
    memory.X = memory.X.toarray()
    memory.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    model = _fit(name, backed)
    assert model.is_trained_ and len(model.predict()) == backed.n_obs


def _collection(directory: Path) -> CollectionAdapter:
    """Two backed files (counts in a sparse layer) joined in one AnnCollection."""
    directory.mkdir(exist_ok=True)
    memory = _tiny()
    memory.layers["counts"] = memory.X.copy()
    files = []
    for i, part in enumerate((slice(0, 140), slice(140, None))):
        path = directory / f"part{i}.h5ad"
        memory[part].copy().write_h5ad(path)
        files.append(ad.read_h5ad(path, backed="r"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pandas' concat of the obs tables
        collection = AnnCollection(files, join_vars="inner", join_obs="inner")
    return CollectionAdapter(collection)


@pytest.mark.parametrize("name", MODELS)
def test_trains_and_predicts_from_an_anncollection_of_backed_files(name, tmp_path, small_chunks):
    adapter = _collection(tmp_path)
    model = _fit(name, adapter, layer="counts")
    predicted = model.predict()
    assert model.is_trained_
    assert len(predicted) == len(adapter)
    assert set(predicted) <= set(model.cell_types)


def test_two_anncollections_keep_their_own_registration(tmp_path):
    first, second = _collection(tmp_path / "a"), _collection(tmp_path / "b")
    model_cls = celltyper.model.SCNYM
    model_cls.setup_anndata(first, labels_key="train_label", layer="counts")
    model_cls.setup_anndata(second, labels_key="train_label", batch_key="batch", layer="counts")
    assert model_cls(first).n_batches == 1
    assert model_cls(second).n_batches == 2


def test_anncollection_without_a_layer_is_a_clear_error(tmp_path):
    adapter = _collection(tmp_path)
    with pytest.raises(ValueError, match="has no X; pass layer="):
        celltyper.model.SCNYM.setup_anndata(adapter, labels_key="train_label")


def test_datamodule_is_refused_with_the_supported_ways(counts_adata):
    celltyper.model.SCNYM.setup_anndata(counts_adata, labels_key="train_label")
    model = celltyper.model.SCNYM(counts_adata, n_hidden=8)
    with pytest.raises(NotImplementedError, match=r"backed='r'.*AnnCollection"):
        model.train(datamodule=object())


# -- statistics computed block by block equal those computed in memory --------------------
@pytest.fixture
def on_disk(tmp_path):
    """The tiny counts in memory and as a backed file, with a few all-zero cells."""
    memory = _tiny()
    x = memory.X.toarray()
    x[[0, 57], :] = 0
    memory.X = sp.csr_matrix(x)
    path = tmp_path / "stats.h5ad"
    memory.write_h5ad(path)
    return memory, ad.read_h5ad(path, backed="r")


def test_iter_row_chunks_covers_every_row_in_order(on_disk):
    memory, backed = on_disk
    expected = memory.X.toarray()
    for matrix in (memory.X, backed.X, expected):
        blocks = list(iter_row_chunks(matrix, 7))
        assert [b[0] for b in blocks] == list(range(0, memory.n_obs, 7))
        np.testing.assert_array_equal(np.vstack([b[2] for b in blocks]), expected)
        assert all(b[2].dtype == np.float32 for b in blocks)
    rows = np.array([1, 2, 40, 41, 299])
    for matrix in (memory.X, backed.X):
        picked = np.vstack([b for _, _, b in iter_row_chunks(matrix, 8, rows=rows)])
        np.testing.assert_array_equal(picked, expected[rows])
    with pytest.raises(ValueError, match="rows must be increasing"):
        next(iter_row_chunks(backed.X, 8, rows=np.array([3, 1])))
    with pytest.raises(ValueError, match="chunk_size must be a whole number >= 1, got 0"):
        next(iter_row_chunks(backed.X, 0))


def test_read_row_range_of_a_backed_csr_equals_anndatas_slicing(on_disk):
    memory, backed = on_disk
    n = memory.n_obs
    for start, stop in [(0, 5), (57, 58), (40, 40), (n - 3, n + 10), (0, n)]:
        got = _matrix.read_row_range(backed.X, start, stop)
        expected = memory.X[start:stop]
        assert sp.isspmatrix_csr(got) and got.shape == expected.shape
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got.toarray(), expected.toarray())
    dense = memory.X[3:9].toarray()
    np.testing.assert_array_equal(_matrix.read_row_range(memory.X.toarray(), 3, 9), dense)


def test_rankformer_medians_from_disk_equal_those_in_memory(on_disk):
    memory, backed = on_disk
    np.testing.assert_array_equal(
        nonzero_gene_medians(backed.X, chunk_size=16), nonzero_gene_medians(memory.X)
    )
    labelled = np.flatnonzero(memory.obs["train_label"] != "Unknown")
    np.testing.assert_array_equal(
        nonzero_gene_medians(backed.X, chunk_size=16, rows=labelled),
        nonzero_gene_medians(memory.X[labelled]),
    )


def test_batch_means_from_disk_equal_those_in_memory(on_disk):
    memory, backed = on_disk
    codes = memory.obs["batch"].cat.codes.to_numpy()
    expected = batch_log_means(memory.X, codes, 2, 1e4)
    chunked = [batch_log_means(m, codes, 2, 1e4) for m in (backed.X, memory.X.toarray())]
    for means in chunked:
        np.testing.assert_allclose(means, expected, rtol=1e-6, atol=1e-6)


def test_centroid_distances_from_blocks_match_the_full_pca(on_disk):
    memory, _ = on_disk
    x = np.log1p(memory.X.toarray())
    labels = memory.obs["cell_type"].cat.codes.to_numpy()
    expected = centroid_distances(x, labels, 5)
    for widest in (60, 0):  # the summed covariance, or scikit-learn's IncrementalPCA
        blocks = ((s, min(s + 40, len(x)), x[s : s + 40]) for s in range(0, len(x), 40))
        got = streamed_centroid_distances(blocks, labels, 5, x.shape[1], widest)
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)


def test_kmeans_from_disk_equals_kmeans_in_memory(on_disk):
    memory, backed = on_disk
    rows = np.flatnonzero(memory.obs["batch"] == "b1")
    expected = kmeans(memory.X[rows], 4, seed=3, batch_size=32)
    got = kmeans(backed.X, 4, rows=rows, seed=3, batch_size=32, max_cached_elements=0)
    np.testing.assert_array_equal(got.labels, expected.labels)
    torch.testing.assert_close(got.centers, expected.centers)


@pytest.mark.parametrize(
    ("value", "message"),
    [(np.nan, "1 NaN and 0 infinite"), (-2.0, "negative values"), (0.5, None)],
)
def test_value_checks_of_a_backed_file_read_every_block(tmp_path, small_chunks, value, message):
    memory = _tiny()
    x = memory.X.toarray()
    x[-1, 3] = value  # in the last block only
    memory.X = sp.csr_matrix(x)
    path = tmp_path / "bad.h5ad"
    memory.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    if message is None:  # a fraction: both tell normalised values from counts
        assert check_matrix_values(backed.X) == check_matrix_values(memory.X) == "normalized"
        return
    with pytest.raises(ValueError, match=message):
        check_matrix_values(backed.X, "adata.X")
    with pytest.raises(ValueError, match=rf"adata\.X contains .*{message.split()[0]}"):
        celltyper.model.SCNYM.setup_anndata(backed, labels_key="train_label")


def test_a_registered_backed_matrix_reads_as_registered(tmp_path):
    path = tmp_path / "cells.h5ad"
    _tiny().write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    celltyper.model.SCNYM.setup_anndata(backed, labels_key="train_label")
    model = celltyper.model.SCNYM(backed, n_hidden=8)
    matrix = model.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
    assert not _matrix.is_in_memory(matrix)
    assert model.input_kind_ == "counts"
