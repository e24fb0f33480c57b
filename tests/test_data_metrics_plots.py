"""Tests for the bundled demo data, the metrics and the embedding plot."""

from __future__ import annotations

import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from celltyper.data import kang_pbmc
from celltyper.metrics import (
    classification_scores,
    expected_calibration_error,
    format_scores,
    novelty_auroc,
)

KANG_TYPES = ["B", "CD14+Mono", "CD4T", "CD8T", "Dendritic", "FCGR3A+Mono", "NK"]


# --------------------------------------------------------------------------- metrics


def test_classification_scores_hand_computed():
    # Per class: A recall 3/4 precision 3/4; B recall 2/2 precision 2/3; C never predicted.
    # "Unknown" is predicted but not a true class, so it must not enter the averages.
    y_true = ["A", "A", "A", "A", "B", "B", "C", "C"]
    y_pred = ["A", "A", "A", "B", "B", "B", "A", "Unknown"]
    scores = classification_scores(y_true, y_pred)
    assert set(scores) == {"accuracy", "balanced_accuracy", "macro_f1", "cohen_kappa"}
    assert scores["accuracy"] == pytest.approx(5 / 8)
    assert scores["balanced_accuracy"] == pytest.approx((3 / 4 + 1 + 0) / 3)
    # F1: A 0.75, B 2*(2/3)*1/(2/3+1) = 0.8, C 0 -> averaged over the 3 true classes only.
    assert scores["macro_f1"] == pytest.approx((0.75 + 0.8 + 0.0) / 3)
    # p_o = 5/8; p_e = 4/8*4/8 + 2/8*3/8 = 11/32; kappa = (5/8 - 11/32) / (1 - 11/32) = 3/7.
    assert scores["cohen_kappa"] == pytest.approx(3 / 7)
    assert all(isinstance(v, float) for v in scores.values())


def test_classification_scores_perfect_and_mixed_types():
    scores = classification_scores(np.array([0, 1, 2, 1]), np.array([0, 1, 2, 1]))
    assert scores == pytest.approx(
        {"accuracy": 1.0, "balanced_accuracy": 1.0, "macro_f1": 1.0, "cohen_kappa": 1.0}
    )
    # Integer truth against string predictions must compare values, not crash in sklearn.
    mixed = classification_scores(pd.Series([0, 1]), ["0", "Unknown"])
    assert mixed["accuracy"] == pytest.approx(0.5)


def test_classification_scores_single_label_kappa_is_nan():
    scores = classification_scores(["A", "A"], ["A", "A"])
    assert scores["accuracy"] == 1.0
    assert math.isnan(scores["cohen_kappa"])


@pytest.mark.parametrize(
    ("y_true", "y_pred", "match"),
    [
        (["A", "B"], ["A"], "same length"),
        ([], [], "empty"),
        ([["A"]], [["A"]], "one-dimensional"),
    ],
)
def test_classification_scores_rejects_bad_input(y_true, y_pred, match):
    with pytest.raises(ValueError, match=match):
        classification_scores(y_true, y_pred)


def test_expected_calibration_error_hand_computed():
    # 5 bins of width 0.2:
    #   (0.8, 1.0]: conf 0.95, 0.85, both right -> |1 - 0.9| * 2/5 = 0.04
    #   (0.6, 0.8]: conf 0.75, wrong           -> |0 - 0.75| * 1/5 = 0.15
    #   (0.2, 0.4]: conf 0.35, 0.30, one right -> |0.5 - 0.325| * 2/5 = 0.07
    conf = [0.95, 0.85, 0.75, 0.35, 0.30]
    correct = [True, True, False, False, True]
    assert expected_calibration_error(conf, correct, n_bins=5) == pytest.approx(0.26)
    # With a single bin only the global gap |0.6 - 0.64| remains.
    assert expected_calibration_error(conf, correct, n_bins=1) == pytest.approx(0.04)


def test_expected_calibration_error_edges_and_perfect():
    assert expected_calibration_error([1.0, 1.0], [1, 1]) == pytest.approx(0.0)
    assert expected_calibration_error([0.0, 0.0], [0, 0]) == pytest.approx(0.0)
    # Bins are (lo, hi]: 0.5 shares the (0.4, 0.5] bin with 0.45, not the bin of 0.55.
    ece = expected_calibration_error([0.45, 0.5, 0.55], [1, 0, 1], n_bins=10)
    assert ece == pytest.approx((abs(0.5 - 0.475) * 2 + abs(1 - 0.55)) / 3)


@pytest.mark.parametrize(
    ("conf", "correct", "n_bins", "match"),
    [
        ([0.5, 1.5], [1, 0], 15, r"\[0, 1\]"),
        ([0.5, np.nan], [1, 0], 15, r"\[0, 1\]"),
        ([0.5], [1, 0], 15, "same length"),
        ([0.5], [2], 15, "boolean"),
        ([0.5], [1], 0, "n_bins"),
        ([], [], 15, "empty"),
    ],
)
def test_expected_calibration_error_rejects_bad_input(conf, correct, n_bins, match):
    with pytest.raises(ValueError, match=match):
        expected_calibration_error(conf, correct, n_bins=n_bins)


def test_novelty_auroc_perfect_inverse_and_partial():
    is_novel = np.array([False, False, True, True])
    assert novelty_auroc([0.1, 0.2, 0.8, 0.9], is_novel) == pytest.approx(1.0)
    assert novelty_auroc([0.9, 0.8, 0.2, 0.1], is_novel) == pytest.approx(0.0)
    # Novel 0.35 beats known 0.1 but not 0.4; novel 0.8 beats both -> 3 of 4 pairs.
    assert novelty_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert novelty_auroc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("scores", "is_novel", "match"),
    [
        ([0.1, 0.2], [True, True], "all 2 cells are novel"),
        ([0.1, 0.2], [0, 0], "all 2 cells are known"),
        ([0.1], [0, 1], "same length"),
        ([0.1, np.inf], [0, 1], "finite"),
    ],
)
def test_novelty_auroc_rejects_bad_input(scores, is_novel, match):
    with pytest.raises(ValueError, match=match):
        novelty_auroc(scores, is_novel)


def test_format_scores():
    text = format_scores(
        {"accuracy": 0.91234, "balanced_accuracy": 0.9049, "macro_f1": 0.5, "cohen_kappa": 1}
    )
    assert text == "accuracy 0.912 | balanced accuracy 0.905 | macro F1 0.500 | Cohen's kappa 1"
    assert format_scores({"my_score": float("nan")}, digits=2) == "my score nan"
    assert format_scores({}) == ""


# ------------------------------------------------------------------------- demo data


@pytest.fixture(scope="module")
def kang() -> ad.AnnData:
    return kang_pbmc()


def test_kang_pbmc_shape_and_counts(kang):
    assert kang.shape == (5638, 2000)
    assert sp.issparse(kang.X) and kang.X.format == "csr"
    assert kang.X.dtype == np.float32
    data = kang.X.data
    assert data.size > 0 and data.min() >= 0
    np.testing.assert_array_equal(data, np.round(data))
    assert kang.var_names.is_unique and kang.obs_names.is_unique
    # Every cell and every gene carries some counts, otherwise HVG choice went wrong.
    assert (np.asarray(kang.X.sum(axis=1)).ravel() > 0).all()
    assert (np.asarray(kang.X.sum(axis=0)).ravel() > 0).all()


def test_kang_pbmc_obs_columns(kang):
    obs = kang.obs
    assert list(obs.columns) == ["condition", "cell_type", "split"]
    for column in obs.columns:
        assert isinstance(obs[column].dtype, pd.CategoricalDtype), column
    assert list(obs["condition"].cat.categories) == ["control", "stimulated"]
    assert list(obs["cell_type"].cat.categories) == [*KANG_TYPES, "Unknown"]
    assert list(obs["split"].cat.categories) == ["reference", "query"]
    mapped = obs["condition"].map({"control": "reference", "stimulated": "query"})
    assert (mapped.astype(str) == obs["split"].astype(str)).all()

    counts = pd.crosstab(obs["cell_type"] == "Unknown", obs["condition"])
    # All 1,638 labelled source cells (759 control, 879 stimulated) are kept.
    assert counts.loc[False, "control"] == 759
    assert counts.loc[False, "stimulated"] == 879
    assert counts.loc[True, "control"] == 1500
    assert counts.loc[True, "stimulated"] == 2500
    # Each type must appear in both splits for reference -> query annotation to make sense.
    labelled = obs[obs["cell_type"] != "Unknown"]
    per_split = pd.crosstab(labelled["cell_type"], labelled["split"]).loc[KANG_TYPES]
    assert (per_split > 0).all().all()


def test_kang_pbmc_provenance_and_fresh_copy(kang):
    info = kang.uns["celltyper_demo"]
    assert info["source"] == "kang_ifnb_counts_13999.h5ad"
    assert int(info["n_hvg"]) == kang.n_vars
    assert "seed" in info
    assert info["script"].endswith("build_kang_demo.py")
    other = kang_pbmc()
    other.obs["cell_type"] = "changed"
    other.X.data[:] = 0
    assert (kang.obs["cell_type"] != "changed").all()
    assert kang.X.data.max() > 0


def test_every_bundled_dataset_loads_offline_as_raw_counts():
    from celltyper import datasets

    assert datasets.__all__, "celltyper.datasets names no dataset"
    for name in datasets.__all__:
        adata = getattr(datasets, name)()
        assert adata.n_obs > 0 and adata.n_vars > 0, name
        x = adata.X.data if hasattr(adata.X, "data") else np.asarray(adata.X)
        assert np.all(x >= 0) and np.allclose(x, np.round(x)), f"{name} is not raw counts"


# ----------------------------------------------------------------------------- plots


@pytest.fixture
def tiny_adata() -> ad.AnnData:
    rng = np.random.default_rng(0)
    n = 60
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(rng.choice(["a", "b", "c"], n)),
            "confidence": rng.random(n),
            "batch": rng.choice(["x", "y"], n).astype(object),
        },
        index=[f"cell{i}" for i in range(n)],
    )
    obs.loc["cell0", "confidence"] = np.nan
    obs.loc["cell1", "batch"] = np.nan
    adata = ad.AnnData(X=rng.poisson(1.0, (n, 8)).astype(np.float32), obs=obs)
    adata.obsm["X_latent"] = rng.normal(size=(n, 5)).astype(np.float32)
    return adata


def test_latent_umap_writes_png_and_leaves_input_unchanged(tiny_adata, tmp_path):
    from celltyper.pl import latent_umap

    before = tiny_adata.copy()
    out = latent_umap(
        tiny_adata,
        "X_latent",
        ["cell_type", "confidence", "batch"],
        tmp_path / "sub" / "umap.png",
        n_neighbors=5,
    )
    assert out == tmp_path / "sub" / "umap.png"
    assert out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert list(tiny_adata.obsm.keys()) == ["X_latent"]
    assert len(tiny_adata.obsp) == 0 and len(tiny_adata.uns) == 0
    pd.testing.assert_frame_equal(tiny_adata.obs, before.obs)
    np.testing.assert_array_equal(tiny_adata.obsm["X_latent"], before.obsm["X_latent"])
    np.testing.assert_array_equal(tiny_adata.X, before.X)


def test_latent_umap_missing_keys(tiny_adata, tmp_path):
    from celltyper.pl import latent_umap

    with pytest.raises(KeyError, match="X_nope"):
        latent_umap(tiny_adata, "X_nope", ["cell_type"], tmp_path / "a.png")
    with pytest.raises(KeyError, match="not_a_column"):
        latent_umap(tiny_adata, "X_latent", ["cell_type", "not_a_column"], tmp_path / "b.png")
    assert not list(tmp_path.iterdir())
