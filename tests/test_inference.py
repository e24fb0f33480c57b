"""The chunked inference loop and the streaming annotation writer (issue 16).

Every model's ``predict``, ``get_latent_representation`` and ``annotation_table`` read
new data in chunks of consecutive rows (dense, CSR, or an AnnData opened with
``backed="r"``); their outputs equal those of scvi-tools' ``AnnDataLoader`` over the
aligned copy celltyper registered before. The writer's files equal the in-memory table.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_unchanged, make_counts_adata, snapshot, tiny_kwargs, train_kwargs

import celltyper.model
from celltyper._utils import _rows
from celltyper.model.base import _inference, read_annotation

MODELS = ["SCNYM", "CELLULAR", "SCATLASVAE", "SCPRETRAIN", "RANKFORMER"]
#: Cells per chunk in these tests (100 genes): several chunks, the last one short.
CHUNK_CELLS = 37


def _one_epoch_model(name: str, **model_kwargs):
    """A tiny model of ``name`` trained one epoch on the planted counts."""
    cls = getattr(celltyper.model, name)
    adata = make_counts_adata(cells_per=20, seed=3)
    cls.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    model = cls(adata, **model_kwargs, **tiny_kwargs(cls))
    options = train_kwargs(cls)
    options["max_epochs"] = 1
    model.train(**options)
    return model


@pytest.fixture(scope="module")
def trained_models():
    return {name: _one_epoch_model(name) for name in MODELS}


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(_inference, "CHUNK_VALUES", CHUNK_CELLS * 100)


def _query(kind: str, tmp_path, seed: int = 5) -> ad.AnnData:
    query = make_counts_adata(cells_per=20, seed=seed)
    # Genes in another order, one missing and one extra: aligned per chunk.
    query = query[:, query.var_names[::-1][1:]].copy()
    query.var_names = [*query.var_names[:-1], "extra_gene"]
    if kind == "dense":
        query.X = query.X.toarray()
        return query
    if kind == "csr":
        return query
    path = tmp_path / "query.h5ad"
    query.write_h5ad(path)
    return ad.read_h5ad(path, backed="r")


def _legacy(model, adata, fn) -> np.ndarray:
    """The outputs of the path before the chunked loop: the aligned copy registered with
    scvi-tools, read by its AnnDataLoader in minibatches of 128."""
    with model._model_data(adata.to_memory() if adata.isbacked else adata, chunked=False) as data:
        loader = model._make_data_loader(adata=data, batch_size=128)
        model.module.eval()
        with torch.inference_mode():
            return np.concatenate([fn(t).numpy() for t in loader])


@pytest.mark.filterwarnings("ignore:.*genes are missing")
@pytest.mark.parametrize("kind", ["dense", "csr", "backed"])
@pytest.mark.parametrize("name", MODELS)
def test_chunked_outputs_equal_the_loader_path(trained_models, name, kind, tmp_path, small_chunks):
    model = trained_models[name]
    query = _query(kind, tmp_path)
    before = snapshot(query) if kind != "backed" else None
    probs = model.predict(query, soft=True)
    expected = _legacy(model, query, model._probabilities)
    np.testing.assert_allclose(probs.to_numpy(), expected, rtol=1e-5, atol=1e-6)
    assert list(probs.index) == list(query.obs_names)
    latent = model.get_latent_representation(query)
    np.testing.assert_allclose(latent, _legacy(model, query, model.module.embed), atol=1e-5)
    table = model.annotation_table(query)
    assert (table["prediction"].cat.codes.to_numpy() == expected.argmax(1)).all()
    if before is not None:
        assert_unchanged(query, before)


@pytest.mark.filterwarnings("ignore:.*genes are missing")
def test_unsorted_indices_keep_their_order(trained_models, tmp_path, small_chunks):
    model = trained_models["SCNYM"]
    query = _query("backed", tmp_path)
    indices = np.array([150, 3, 77, 3, 199, 40])
    probs = model.predict(query, indices=indices, soft=True)
    full = model.predict(query, soft=True)
    np.testing.assert_allclose(probs.to_numpy(), full.to_numpy()[indices], rtol=1e-6)
    assert list(probs.index) == list(query.obs_names[indices])


@pytest.mark.filterwarnings("ignore:.*genes are missing")
@pytest.mark.parametrize("suffix", [".csv", ".h5", ".zarr"])
@pytest.mark.parametrize("name", ["SCNYM", "SCATLASVAE", "RANKFORMER"])
def test_streaming_writer_equals_the_in_memory_table(
    trained_models, name, suffix, tmp_path, small_chunks
):
    model = trained_models[name]
    query = _query("backed", tmp_path)
    table = model.annotation_table(query)
    latent = model.get_latent_representation(query)
    path = model.annotation_table(query, write_to=tmp_path / f"out{suffix}")
    assert path == tmp_path / f"out{suffix}"
    written, written_latent = read_annotation(path)
    assert list(written.index) == list(table.index)
    assert (written["prediction"].astype(str) == table["prediction"].astype(str)).all()
    np.testing.assert_allclose(written["confidence"], table["confidence"], rtol=1e-6)
    np.testing.assert_allclose(written["novelty"], table["novelty"], rtol=1e-6)
    assert (written["novel"].to_numpy() == table["novel"].to_numpy()).all()
    if suffix == ".csv":
        assert written_latent is None
    else:
        np.testing.assert_allclose(written_latent, latent, atol=1e-6)


def test_backed_matrix_is_read_in_chunks_never_whole(
    trained_models, tmp_path, small_chunks, monkeypatch
):
    model = trained_models["CELLULAR"]
    path = tmp_path / "query.h5ad"
    make_counts_adata(cells_per=20, seed=5).write_h5ad(path)
    stamp = path.stat().st_mtime_ns
    query = ad.read_h5ad(path, backed="r")
    reads = []
    original = _rows.take_rows

    def spy(array, rows):
        block = original(array, rows)
        if not isinstance(array, _rows.AlignedRows | np.ndarray):  # the file itself
            reads.append(block.shape[0])
        return block

    monkeypatch.setattr(_rows, "take_rows", spy)
    model.annotation_table(query, write_to=tmp_path / "out.h5")
    model.annotate(query)
    assert reads and max(reads) <= CHUNK_CELLS
    assert sum(reads) == 2 * query.n_obs  # each pass reads every row once
    assert "cellular" in query.obs.columns and query.obsm["X_cellular"].shape[0] == query.n_obs
    assert path.stat().st_mtime_ns == stamp


def test_write_to_rejects_bad_arguments(trained_models, tmp_path):
    model = trained_models["SCNYM"]
    query = make_counts_adata(cells_per=20, seed=5)
    with pytest.raises(ValueError, match=r"write_to=.*'\.parquet'"):
        model.annotation_table(query, write_to=tmp_path / "out.parquet")
    with pytest.raises(ValueError, match="majority_voting"):
        model.annotation_table(query, write_to=tmp_path / "out.csv", majority_voting=True)
    with pytest.raises(ValueError, match="increasing"):
        model.annotation_table(query, indices=[5, 1], write_to=tmp_path / "out.csv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model.annotation_table(query, write_to=tmp_path / "missing" / "out.csv")
    with pytest.raises(ValueError, match="batch_size"):
        model.predict(query, batch_size=0)
    assert not (tmp_path / "out.csv").exists()


def test_rank_tokens_slice_drops_columns_of_padding_only():
    from celltyper.data import tokenize_matrix

    counts = np.zeros((3, 6), dtype=np.float32)
    counts[0, :5] = [5, 4, 3, 2, 1]
    counts[1, :2] = [1, 2]
    counts[2, 0] = 3
    tokens = tokenize_matrix(counts, np.ones(6), n_tokens=6)
    assert tokens.tokens.shape == (3, 6)
    part = tokens[1:]
    assert part.tokens.shape == (2, 3)
    assert torch.equal(part.tokens, tokens.tokens[1:, :3])
    assert not part.padding_mask[:, 0].any()


def test_scale_benchmark_writes_resampled_counts(tmp_path):
    from benchmarks.scale import parse_args, write_synthetic_h5ad

    args = parse_args(["--cells", "500", "--models", "SCNYM", "SCANVI", "--skip-train"])
    assert args.cells == 500 and args.models == ["SCNYM", "SCANVI"] and args.skip_train
    with pytest.raises(SystemExit):
        parse_args(["--cells", "0"])
    path = write_synthetic_h5ad(tmp_path / "s.h5ad", 500, seed=1, chunk_size=128)
    adata = ad.read_h5ad(path)
    assert adata.shape == (500, 2000)
    values = adata.X.data
    assert np.all(values == np.round(values)) and values.min() > 0
    assert {"cell_type", "condition", "source_cell"} <= set(adata.obs.columns)
    assert isinstance(adata.obs["cell_type"].dtype, pd.CategoricalDtype)


def test_cli_streams_a_query_above_the_threshold(tmp_path, monkeypatch):
    from test_cli import _write_pair

    from celltyper.cli import main

    monkeypatch.chdir(tmp_path)
    parts = _write_pair(tmp_path, n_genes=60)
    query = parts["query"][1]
    code = main(
        [
            "annotate",
            "--reference", str(parts["reference"][0]),
            "--query", str(parts["query"][0]),
            "--labels-key", "cell_type",
            "--batch-key", "tech",
            "--model", "scnym",
            "--max-epochs", "1",
            "--stream-above", "100",
            "--output", "out",
        ]
    )  # fmt: skip
    assert code == 0
    out = tmp_path / "out"
    table = pd.read_csv(out / "predictions.csv", index_col=0)
    assert list(table.index) == list(query.obs_names)
    written, latent = read_annotation(out / "annotation.h5")
    assert (written["prediction"].astype(str).to_numpy() == table["prediction"].to_numpy()).all()
    assert latent.shape[0] == query.n_obs
    assert not (out / "annotated.h5ad").exists()


def test_cli_rejects_a_negative_stream_threshold(capsys):
    from celltyper.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["annotate", "--reference", "r.h5ad", "--query", "q.h5ad", "--stream-above", "-1"])
    assert exit_info.value.code == 2
    assert "--stream-above" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "centring"),
    [("SCNYM", True), ("SCNYM", False), ("SCPRETRAIN", True), ("SCPRETRAIN", False),
     ("CELLULAR", True), ("CELLULAR", False), ("SCATLASVAE", False)],
)  # fmt: skip
def test_sparse_rows_path_equals_dense(name, centring):
    centring_models = ("SCNYM", "CELLULAR", "SCPRETRAIN")
    model = _one_epoch_model(
        name, **({"batch_centering": centring} if name in centring_models else {})
    )
    query = make_counts_adata(cells_per=20, seed=5)
    assert model.module.reads_sparse_rows()
    sparse_probs = model.predict(query, soft=True).to_numpy()
    dense = query.copy()
    dense.X = dense.X.toarray()
    dense_probs = model.predict(dense, soft=True).to_numpy()
    np.testing.assert_allclose(sparse_probs, dense_probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        model.get_latent_representation(query),
        _legacy(model, query, model.module.embed),
        rtol=1e-5,
        atol=1e-5,
    )


def test_scatlasvae_decodes_sparse_rows_like_dense_ones(trained_models):
    model = trained_models["SCATLASVAE"]
    query = make_counts_adata(cells_per=20, seed=5)
    dense = query.copy()
    dense.X = dense.X.toarray()
    assert model.module.reads_sparse_rows()
    for options in ({"library_size": "observed"}, {"transform_batch": "b0"}):
        np.testing.assert_allclose(
            model.get_normalized_expression(query, return_numpy=True, **options),
            model.get_normalized_expression(dense, return_numpy=True, **options),
            rtol=1e-5,
            atol=1e-7,
        )
