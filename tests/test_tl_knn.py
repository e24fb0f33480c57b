"""celltyper.tl.knn_transfer: nearest-neighbour label transfer on any model's latent space."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from conftest import NOVEL_TYPE, UNKNOWN, assert_unchanged, make_counts_adata, snapshot

import celltyper
from celltyper.model import SCATLASVAE, SCNYM


class _FixedLatent:
    """A stand-in model whose latent space is given: cells are embedded by obs["pos"]."""

    def __init__(self, reference: AnnData):
        self.adata = reference
        self.registration = SimpleNamespace(
            rna_modality=None, labels_key="label", unlabeled_category=UNKNOWN
        )

    def get_latent_representation(self, adata=None, indices=None, batch_size=None):
        adata = self.adata if adata is None else adata
        latent = adata.obs[["pos"]].to_numpy(dtype=float)
        return latent if indices is None else latent[np.asarray(indices)]

    def _registered_labels(self):
        labels = self.adata.obs["label"].astype(object).to_numpy()
        return np.where(labels == UNKNOWN, None, labels)


def _cells(positions, labels=None):
    obs = pd.DataFrame({"pos": positions}, index=[f"c{i}" for i in range(len(positions))])
    if labels is not None:
        obs["label"] = labels
    return AnnData(obs=obs)


def test_votes_are_hand_computable():
    # Reference on a line: A at 0 and 1, B at 3, an unlabelled cell at 2 (never a neighbour).
    reference = _cells([0.0, 1.0, 3.0, 2.0], ["A", "A", "B", UNKNOWN])
    model = _FixedLatent(reference)
    query = _cells([2.0, 0.5])
    result = celltyper.tl.knn_transfer(model, query, n_neighbors=3)
    # Cell at 2: A at distances 2 and 1 (votes 1/2 + 1), B at distance 1 (vote 1).
    assert list(result["prediction"]) == ["A", "A"]
    assert result["probability"].iloc[0] == pytest.approx(1.5 / 2.5)
    # Cell at 0.5: A at 0.5 and 0.5 (votes 2 + 2), B at 2.5 (vote 0.4).
    assert result["probability"].iloc[1] == pytest.approx(4.0 / 4.4)
    np.testing.assert_allclose(result["uncertainty"], 1.0 - result["probability"])
    assert result.index.equals(query.obs_names)
    # Uniform votes: the share of neighbours that agree.
    uniform = celltyper.tl.knn_transfer(model, query, n_neighbors=3, weighting="uniform")
    np.testing.assert_allclose(uniform["probability"], [2 / 3, 2 / 3])
    # One neighbour; more neighbours than labelled cells consult them all.
    nearest = celltyper.tl.knn_transfer(model, _cells([2.9]), n_neighbors=1)
    assert nearest["prediction"].iloc[0] == "B" and nearest["probability"].iloc[0] == 1.0
    every = celltyper.tl.knn_transfer(model, _cells([2.9]), n_neighbors=50, weighting="uniform")
    assert every["prediction"].iloc[0] == "A" and every["probability"].iloc[0] == 2 / 3


def test_explicit_reference_and_bad_arguments():
    model = _FixedLatent(_cells([0.0, 1.0], ["A", "B"]))
    other = _cells([5.0, 6.0, 7.0], ["y", "x", np.nan])
    other.obs["kind"] = ["y", "x", "y"]
    query = _cells([6.8])
    # A missing label is unlabelled: the cell at 7 is no neighbour for "label".
    assert celltyper.tl.knn_transfer(model, query, other, "label", 1).iloc[0, 0] == "x"
    assert celltyper.tl.knn_transfer(model, query, other, "kind", 1).iloc[0, 0] == "y"
    with pytest.raises(KeyError, match="labels_key"):
        celltyper.tl.knn_transfer(model, query, other, labels_key="nope")
    with pytest.raises(ValueError, match="n_neighbors"):
        celltyper.tl.knn_transfer(model, query, n_neighbors=0)
    with pytest.raises(ValueError, match="weighting"):
        celltyper.tl.knn_transfer(model, query, weighting="rank")
    unlabelled = _FixedLatent(_cells([0.0], [UNKNOWN]))
    with pytest.raises(ValueError, match="no labelled cell"):
        celltyper.tl.knn_transfer(unlabelled, query)


@pytest.mark.parametrize("model_cls", [SCATLASVAE, SCNYM])
def test_transfer_with_real_models(model_cls):
    raw = make_counts_adata(cells_per=30)
    adata = raw.copy()
    model_cls.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    model = model_cls(adata, n_hidden=32)
    model.train(max_epochs=3, enable_progress_bar=False)
    query = raw[raw.obs["batch"] == "b1"].copy()
    before = snapshot(query)
    result = celltyper.tl.knn_transfer(model, query, n_neighbors=10)
    assert_unchanged(query, before)
    assert result.index.equals(query.obs_names)
    assert list(result.columns) == ["prediction", "probability", "uncertainty"]
    assert set(result["prediction"]) <= set(model.cell_types)
    known = (query.obs["cell_type"] != NOVEL_TYPE).to_numpy()
    truth = query.obs["cell_type"].astype(str).to_numpy()
    assert (result["prediction"].to_numpy()[known] == truth[known]).mean() > 0.6
    # An explicit labelled reference with its own label column gives the same answer.
    explicit = celltyper.tl.knn_transfer(model, query, reference=raw, labels_key="train_label")
    pd.testing.assert_frame_equal(explicit, celltyper.tl.knn_transfer(model, query))
    if model_cls is SCATLASVAE:
        pd.testing.assert_frame_equal(model.knn_transfer(query), explicit)
