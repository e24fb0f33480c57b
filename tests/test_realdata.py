"""SCNYM on small slices of the real datasets in ``../shared/data``.

Skipped with a reason when the folder is absent. These check behaviour that synthetic
data cannot show: real sparsity, real technology shifts, real gene names.
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest

from celltyper.metrics import classification_scores
from celltyper.model import SCNYM


@pytest.fixture(scope="module")
def cellbench(request):
    data_dir = request.getfixturevalue("shared_data_dir")
    path = data_dir / "cellbench_3cl_3tech_sharedgenes.h5ad"
    if not path.exists():
        pytest.skip(f"{path.name} not in ../shared/data")
    adata = ad.read_h5ad(path)
    adata.obs["cell_line"] = adata.obs["cell_line"].astype(str)
    return adata


def test_cellbench_transfer_across_technologies(cellbench):
    """10x reference -> CEL-seq2 and Drop-seq query (unlabelled while training)."""
    adata = cellbench.copy()
    is_reference = (adata.obs["tech"] == "10x").to_numpy()
    adata.obs["train_label"] = np.where(is_reference, adata.obs["cell_line"], "Unknown")
    SCNYM.setup_anndata(adata, labels_key="train_label", batch_key="tech")
    model = SCNYM(adata, n_hidden=64)
    model.train(max_epochs=15, min_epochs=15, enable_progress_bar=False)
    query = ~is_reference
    scores = classification_scores(
        adata.obs["cell_line"].to_numpy()[query], model.predict()[query]
    )
    # Logistic regression reaches 0.98 balanced accuracy on this task (MANIFEST.md).
    assert scores["balanced_accuracy"] > 0.9, scores


def test_cellbench_query_surgery_and_gene_report(cellbench):
    """A reference on 10x, a later query with 20 % of the genes missing."""
    reference = cellbench[cellbench.obs["tech"] == "10x"].copy()
    SCNYM.setup_anndata(reference, labels_key="cell_line")
    model = SCNYM(reference, n_hidden=64)
    model.train(max_epochs=10, enable_progress_bar=False)

    query = cellbench[cellbench.obs["tech"] != "10x"].copy()
    rng = np.random.default_rng(0)
    kept = np.sort(rng.choice(query.n_vars, int(0.8 * query.n_vars), replace=False))
    query = query[:, kept].copy()
    n_missing = reference.n_vars - query.n_vars
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        query_model = SCNYM.load_query_data(query, model)
    assert any(f"{n_missing} of the model's" in str(w.message) for w in caught)
    table = query_model.annotation_table()
    accuracy = (table["prediction"].to_numpy() == query.obs["cell_line"].to_numpy()).mean()
    assert accuracy > 0.8
    assert table["confidence"].between(0, 1).all()


def test_kang_slice_identity_and_ensembl_check(shared_data_dir):
    """Real gene symbols: a query renamed to Ensembl-like IDs is refused with a clear error."""
    path = shared_data_dir / "scgen_kang_valid.h5ad"
    if not path.exists():
        pytest.skip(f"{path.name} not in ../shared/data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = ad.read_h5ad(path)
    adata = adata[:400, :300].copy()
    adata.obs_names_make_unique()
    SCNYM.setup_anndata(adata, labels_key="cell_type")
    model = SCNYM(adata, n_hidden=32)
    # scGen's file is log-normalised: the model uses it as is.
    assert model.input_kind_ == "normalized"
    assert model.module.normalize_counts is False
    model.train(max_epochs=2, enable_progress_bar=False)
    renamed = adata.copy()
    renamed.var_names = [f"ENSG{i:011d}" for i in range(renamed.n_vars)]
    with pytest.raises(ValueError, match="Ensembl"):
        model.predict(renamed)
