"""The ``celltyper annotate`` command on tiny files (the bundled demo is not run here)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from celltyper.cli import main


def _write_pair(tmp_path, n_genes: int = 60, cells_per: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    profiles = rng.gamma(0.6, 3.0, size=(3, n_genes))
    parts = {}
    for role, shift in (("reference", 1.0), ("query", 1.4)):
        counts = np.vstack([rng.poisson(p * shift, size=(cells_per, n_genes)) for p in profiles])
        obs = pd.DataFrame(
            {
                "cell_type": np.repeat(["A", "B", "C"], cells_per),
                "tech": np.repeat(f"{role}_tech", 3 * cells_per),
            },
            index=[f"{role}_{i}" for i in range(3 * cells_per)],
        )
        adata = ad.AnnData(
            X=sp.csr_matrix(counts.astype(np.float32)),
            obs=obs,
            var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]),
        )
        path = tmp_path / f"{role}.h5ad"
        adata.write_h5ad(path)
        parts[role] = (path, adata)
    return parts


def test_annotate_writes_predictions_table_and_plot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parts = _write_pair(tmp_path)
    ref_path, query_path = parts["reference"][0], parts["query"][0]
    query = parts["query"][1]
    code = main(
        [
            "annotate",
            "--reference", str(ref_path),
            "--query", str(query_path),
            "--labels-key", "cell_type",
            "--batch-key", "tech",
            "--max-epochs", "2",
            "--output", "out",
        ]
    )  # fmt: skip
    assert code == 0
    out = tmp_path / "out"
    table = pd.read_csv(out / "predictions.csv", index_col=0)
    assert list(table.index) == list(query.obs_names)
    assert {"prediction", "confidence", "novelty", "novel"} <= set(table.columns)
    assert table["prediction"].isin(["A", "B", "C"]).all()
    assert table["confidence"].between(0, 1).all()
    annotated = ad.read_h5ad(out / "annotated.h5ad")
    assert annotated.n_obs == query.n_obs
    for column in ("scnym", "scnym_confidence", "scnym_novelty", "scnym_novel"):
        assert column in annotated.obs.columns
    assert annotated.obsm["X_scnym"].shape[0] == query.n_obs
    png = (out / "umap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    # The input files are left as they were.
    assert ad.read_h5ad(query_path).obs.columns.tolist() == ["cell_type", "tech"]


def test_missing_labels_key_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    parts = _write_pair(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "annotate",
                "--reference", str(parts["reference"][0]),
                "--query", str(parts["query"][0]),
                "--labels-key", "no_such_column",
            ]
        )  # fmt: skip
    assert exit_info.value.code == 2
    assert "no_such_column" in capsys.readouterr().err


def test_missing_file_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["annotate", "--reference", "absent.h5ad", "--query", "absent_too.h5ad"])
    assert exit_info.value.code == 2
    assert "absent.h5ad" in capsys.readouterr().err


def test_unknown_model_lists_the_choices(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    parts = _write_pair(tmp_path)
    with pytest.raises(SystemExit):
        main(
            [
                "annotate",
                "--reference", str(parts["reference"][0]),
                "--query", str(parts["query"][0]),
                "--labels-key", "cell_type",
                "--model", "nonexistent",
            ]
        )  # fmt: skip
    assert "scnym" in capsys.readouterr().err.lower()
