"""The shared model contract, run on every class of ``celltyper.model.__all__``.

A new model added to ``celltyper.model.__all__`` is tested here automatically; give it small
constructor kwargs in ``conftest._TINY_BY_MODEL`` if the generic ones do not apply.
"""

# The legacy global numpy RNG is what training must leave alone, so it is used on purpose.
# ruff: noqa: NPY002

from __future__ import annotations

import copy
import functools
import warnings

import lightning.pytorch as pl
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import (
    NOVEL_TYPE,
    UNKNOWN,
    assert_unchanged,
    log_normalize,
    make_counts_adata,
    snapshot,
    tiny_kwargs,
    train_kwargs,
)
from scvi.module.base import LossOutput

import celltyper.model
from celltyper.train import loss_terms

#: Layer of the contract data holding each cell's context profile (paired RANKFORMER).
PREVIOUS = "previous"


class PairedRANKFORMER(celltyper.model.RANKFORMER):
    """RANKFORMER in the paired mode, each cell's context read from ``layers["previous"]``.

    Only the setup's default differs, so every test of the suite runs the paired model
    through exactly the calls it makes on the classes of ``celltyper.model``.
    """

    @classmethod
    @functools.wraps(celltyper.model.RANKFORMER.setup_anndata.__func__)
    def setup_anndata(cls, adata, **kwargs):
        kwargs.setdefault("context_layer", PREVIOUS)
        return super().setup_anndata(adata, **kwargs)

    @classmethod
    def setup_mudata(cls, mdata, **kwargs):
        kwargs.setdefault("context_layer", PREVIOUS)
        return super().setup_mudata(mdata, **kwargs)


#: Models of the suite beyond ``celltyper.model.__all__``, by test id.
EXTRA_MODELS = {"RANKFORMER-paired": PairedRANKFORMER}
MODEL_NAMES = [*celltyper.model.__all__, *EXTRA_MODELS]


def _setup_kwargs():
    return {"labels_key": "train_label", "batch_key": "batch"}


def _train_new(model_cls, adata, *, init=None, **train_overrides):
    model_cls.setup_anndata(adata, **_setup_kwargs())
    model = model_cls(adata, **{**tiny_kwargs(model_cls), **(init or {})})
    model.train(**train_kwargs(model_cls, **train_overrides))
    return model


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=MODEL_NAMES)
def model_cls(request):
    return EXTRA_MODELS.get(request.param) or getattr(celltyper.model, request.param)


def _with_previous_layer(adata):
    """``adata`` with ``layers["previous"]``: for each cell, the counts of the next cell of
    its type and batch (a context profile for the paired model; other models ignore it)."""
    groups = adata.obs.groupby(["cell_type", "batch"], observed=True).indices.values()
    partner = np.arange(adata.n_obs)
    for members in groups:
        partner[members] = np.roll(members, -1)
    adata.layers[PREVIOUS] = adata.X[partner]
    return adata


@pytest.fixture(scope="module")
def raw_data():
    """The unregistered synthetic data every reference and query here is cut from."""
    return _with_previous_layer(make_counts_adata())


@pytest.fixture(scope="module")
def trained(model_cls, raw_data):
    """``(model, registered adata)``: a reference trained for 2 epochs. Never retrained."""
    adata = raw_data.copy()
    model = _train_new(model_cls, adata)
    return model, adata


def _reference_mask(adata):
    return (adata.obs["train_label"] != UNKNOWN).to_numpy()


def _make_query(raw_data, *, drop_fraction=0.1, seed=1):
    """Batch b1 of the data as a query: new batch name, shuffled genes, 10 % genes dropped."""
    query = raw_data[raw_data.obs["batch"] == "b1"].copy()
    query.obs["batch"] = pd.Categorical(["b_new"] * query.n_obs)
    rng = np.random.default_rng(seed)
    n_keep = query.n_vars - round(drop_fraction * query.n_vars)
    keep = rng.permutation(query.n_vars)[:n_keep]
    return query[:, keep].copy()


@pytest.mark.parametrize("model_cls", ["RANKFORMER-paired"], indirect=True)
def test_paired_variant_reads_the_context(trained):
    model, adata = trained
    assert isinstance(model, PairedRANKFORMER)
    assert model.is_paired and model.module.segment_embedding is not None
    other = adata.copy()
    other.layers[PREVIOUS] = other.layers[PREVIOUS][::-1]
    assert not np.allclose(model.predict(other, soft=True), model.predict(soft=True), atol=1e-4)


# -- latent space and predictions ------------------------------------------------------------
def test_latent_representation_shape_and_finite(trained):
    model, adata = trained
    z = model.get_latent_representation()
    assert z.ndim == 2 and z.shape[0] == adata.n_obs and z.shape[1] >= 1
    assert np.isfinite(z).all()
    # Not a constant embedding: different cell types land in different places.
    assert z.std(axis=0).max() > 0
    # indices select rows of the full embedding.
    idx = [3, 0, 17]
    np.testing.assert_allclose(model.get_latent_representation(indices=idx), z[idx], atol=1e-5)


def test_predict_hard_labels(trained):
    model, adata = trained
    pred = model.predict()
    assert len(pred) == adata.n_obs
    assert set(pred) <= set(model.cell_types)
    assert sorted(model.cell_types) == ["T0", "T1", "T2", "T3"]
    # Better than chance (0.25) on the labelled reference cells after 2 epochs.
    ref = _reference_mask(adata)
    accuracy = (pred[ref] == adata.obs["cell_type"].astype(str).to_numpy()[ref]).mean()
    assert accuracy > 0.4


def test_predict_soft_probabilities(trained):
    model, adata = trained
    soft = model.predict(soft=True)
    assert isinstance(soft, pd.DataFrame)
    assert list(soft.columns) == model.cell_types
    assert soft.index.equals(adata.obs_names)
    np.testing.assert_allclose(soft.sum(axis=1).to_numpy(), 1.0, atol=1e-5)
    # Hard predictions are the most probable class.
    np.testing.assert_array_equal(model.predict(), soft.idxmax(axis=1).to_numpy())
    # indices give the matching rows, indexed by their obs names.
    idx = np.array([5, 1, 42])
    part = model.predict(indices=idx, soft=True)
    assert part.index.equals(adata.obs_names[idx])
    np.testing.assert_allclose(part.to_numpy(), soft.to_numpy()[idx], atol=1e-6)


def test_predict_on_new_object_matches_model_data(trained, raw_data):
    model, _ = trained
    other = raw_data.copy()
    before = snapshot(other)
    soft_new = model.predict(other, soft=True)
    np.testing.assert_allclose(soft_new.to_numpy(), model.predict(soft=True).to_numpy(), atol=1e-6)
    assert_unchanged(other, before)


def test_annotation_table(trained):
    model, adata = trained
    table = model.annotation_table()
    assert list(table.columns) == ["prediction", "confidence", "novelty", "novel"]
    assert table.index.equals(adata.obs_names)
    confidence = table["confidence"].to_numpy()
    assert ((confidence >= 0) & (confidence <= 1)).all()
    soft = model.predict(soft=True)
    np.testing.assert_allclose(confidence, soft.max(axis=1).to_numpy(), atol=1e-6)
    np.testing.assert_array_equal(table["prediction"].astype(str).to_numpy(), model.predict())
    assert table["novel"].dtype == bool
    # The calibrated threshold only rises (per batch, with the batch's shift).
    novel, novelty = table["novel"].to_numpy(), table["novelty"].to_numpy()
    assert (novelty[novel] > model.novelty_threshold_).all()
    # An explicit threshold overrides the calibrated one, as given.
    middle = float(np.median(novelty))
    explicit = model.annotation_table(novelty_threshold=middle)
    np.testing.assert_array_equal(explicit["novel"].to_numpy(), novelty > middle)
    assert not model.annotation_table(novelty_threshold=np.inf)["novel"].any()


@pytest.mark.parametrize("method", ["max_probability", "energy", "knn_distance", "mahalanobis"])
def test_every_novelty_method_scores_and_flags(trained, method):
    model, _ = trained
    default = model.novelty_method_
    try:
        threshold = model.calibrate_novelty(method=method)
        table = model.annotation_table()
        assert np.isfinite(table["novelty"]).all() and np.isfinite(threshold)
        assert table["novel"].mean() < 0.5
        assert (table["novelty"][table["novel"]] > threshold).all()
    finally:
        model.calibrate_novelty(method=default)
    with pytest.raises(ValueError, match="method must be one of"):
        model.calibrate_novelty(method="bogus")


def test_majority_voting_adds_cluster_columns(trained, raw_data):
    model, _ = trained
    table = model.annotation_table(majority_voting=True)
    assert list(table.columns)[-2:] == ["over_clustering", "majority_voting"]
    # Every cluster carries one label, the most frequent prediction of its cells.
    for _, cells in table.groupby("over_clustering", observed=True):
        assert cells["majority_voting"].nunique() == 1
        counts = cells["prediction"].value_counts()
        assert counts[cells["majority_voting"].iloc[0]] == counts.max()
    annotated = raw_data.copy()
    model.annotate(annotated, key_added="mv", majority_voting=True)
    assert {"mv_over_clustering", "mv_majority_voting"} <= set(annotated.obs)
    np.testing.assert_array_equal(
        annotated.obs["mv_majority_voting"].astype(str), table["majority_voting"].astype(str)
    )


def test_novelty_threshold_calibrated_after_training(trained):
    model, adata = trained
    threshold = model.novelty_threshold_
    assert threshold is not None and np.isfinite(threshold)
    # Calibrated at the 95 % quantile of held-out labelled reference cells.
    held_out = np.asarray(model.validation_indices)
    held_out = held_out[_reference_mask(adata)[held_out]]
    assert len(held_out) >= 10
    scores = model.annotation_table(indices=held_out)["novelty"].to_numpy()
    assert (scores > threshold).mean() <= 0.05 + 1.0 / len(held_out)
    assert threshold == pytest.approx(float(np.quantile(scores, 0.95)), rel=1e-5)


# -- annotate ---------------------------------------------------------------------------------
def test_annotate_writes_columns_and_refuses_overwrite(trained, raw_data):
    model, _ = trained
    target = raw_data.copy()
    key = type(model).__name__.lower()
    original_columns = list(target.obs.columns)
    X_before = target.X.copy()

    table = model.annotate(target)
    written = [key, f"{key}_confidence", f"{key}_novelty", f"{key}_novel"]
    assert list(target.obs.columns) == original_columns + written
    assert list(target.obsm.keys()) == [f"X_{key}"]
    np.testing.assert_array_equal(
        target.obs[key].astype(str).to_numpy(), table["prediction"].astype(str).to_numpy()
    )
    assert list(target.obs[key].cat.categories) == model.cell_types
    np.testing.assert_allclose(target.obs[f"{key}_confidence"], table["confidence"])
    np.testing.assert_allclose(target.obs[f"{key}_novelty"], table["novelty"])
    assert target.obs[f"{key}_novel"].dtype == bool
    z = target.obsm[f"X_{key}"]
    np.testing.assert_allclose(z, model.get_latent_representation(target), atol=1e-5)
    # Nothing else changed.
    assert (target.X != X_before).nnz == 0
    assert not any(str(c).startswith("_scvi") for c in target.obs.columns)
    assert not any(str(k).startswith("_scvi") for k in target.uns)

    # A second call refuses to overwrite and leaves the columns alone...
    target.obs[f"{key}_confidence"] = -1.0
    with pytest.raises(ValueError, match="overwrite"):
        model.annotate(target)
    assert (target.obs[f"{key}_confidence"] == -1.0).all()
    # ...unless asked to.
    model.annotate(target, overwrite=True)
    np.testing.assert_allclose(target.obs[f"{key}_confidence"], table["confidence"])

    # key_added gives a second, independent set of columns.
    model.annotate(target, key_added="other")
    assert {"other", "other_confidence", "other_novelty", "other_novel"} <= set(target.obs)
    assert "X_other" in target.obsm


def test_annotate_model_data(trained):
    model, adata = trained
    key = "contract_test"
    try:
        table = model.annotate(key_added=key)
        assert len(table) == adata.n_obs
        assert adata.obs[key].notna().all()
        assert adata.obsm[f"X_{key}"].shape[0] == adata.n_obs
    finally:
        for column in [key, f"{key}_confidence", f"{key}_novelty", f"{key}_novel"]:
            if column in adata.obs:
                del adata.obs[column]
        adata.obsm.pop(f"X_{key}", None)


# -- cell-type representations -----------------------------------------------------------------
@pytest.mark.parametrize("method", ["centroid", "median", "medoid"])
def test_cell_type_representations(trained, method):
    model, adata = trained
    reps = model.get_cell_type_representations(method)
    assert sorted(reps.index) == sorted(model.cell_types)
    z = model.get_latent_representation()
    assert reps.shape == (len(model.cell_types), z.shape[1])
    labels = adata.obs["train_label"].astype(str).to_numpy()
    for cell_type in model.cell_types:
        members = z[labels == cell_type]
        row = reps.loc[cell_type].to_numpy()
        if method == "centroid":
            np.testing.assert_allclose(row, members.mean(axis=0), rtol=1e-4, atol=1e-5)
        elif method == "median":
            np.testing.assert_allclose(row, np.median(members, axis=0), rtol=1e-4, atol=1e-5)
        else:
            distances = np.abs(members - row).max(axis=1)
            assert distances.min() < 1e-4, "the medoid must be one of the type's cells"


def test_cell_type_representations_rejects_unknown_method(trained):
    model, _ = trained
    with pytest.raises(ValueError, match="centroid"):
        model.get_cell_type_representations("mean")


# -- query mapping ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def query_setup(trained, raw_data):
    """``(query model, query object, snapshot before mapping, warnings raised)``."""
    model, _ = trained
    query = _make_query(raw_data)
    before = snapshot(query)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        query_model = type(model).load_query_data(query, model)
    return query_model, query, before, [str(w.message) for w in caught]


def test_load_query_data_warns_about_missing_genes(query_setup):
    _, _, _, messages = query_setup
    assert any("10 of the model's 100 genes" in m for m in messages), messages


def test_load_query_data_leaves_query_unchanged(query_setup):
    _, query, before, _ = query_setup
    assert_unchanged(query, before)


def test_load_query_data_predicts(query_setup, trained):
    query_model, query, _, _ = query_setup
    model, _ = trained
    pred = query_model.predict()
    assert len(pred) == query.n_obs
    assert set(pred) <= set(model.cell_types)
    assert query_model.cell_types == model.cell_types
    assert "b_new" in query_model.registration.batches
    # Passing the user's query object gives the same result as the model's aligned copy.
    np.testing.assert_array_equal(query_model.predict(query), pred)
    known = (query.obs["cell_type"] != NOVEL_TYPE).to_numpy()
    accuracy = (pred[known] == query.obs["cell_type"].astype(str).to_numpy()[known]).mean()
    assert accuracy > 0.3
    # annotate() writes into the user's query when asked to.
    target = query.copy()
    query_model.annotate(target)
    assert type(model).__name__.lower() in target.obs


def _indexed_by_ensembl_ids(adata):
    """A copy indexed by Ensembl-like IDs, the model's gene names kept in var["symbol"]."""
    renamed = adata.copy()
    renamed.var["symbol"] = renamed.var_names.astype(str)
    renamed.var["feature_types"] = "Gene Expression"
    renamed.var_names = [f"ENSG{i:011d}" for i in range(renamed.n_vars)]
    return renamed


def test_gene_column_aligns_data_indexed_by_other_ids(trained, raw_data):
    model, _ = trained
    query = _make_query(raw_data)
    renamed = _indexed_by_ensembl_ids(query)
    before, var_before = snapshot(renamed), renamed.var.copy()
    # The error says which column fixes it.
    with pytest.raises(ValueError, match=r"var\['symbol'\] holds gene symbols: pass gene_column="):
        model.predict(renamed)
    with pytest.raises(KeyError, match=r"gene_column='nope' is not a column.*'symbol'"):
        model.predict(renamed, gene_column="nope")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 10 missing genes
        expected = model.predict(query, soft=True).to_numpy()
        aligned = model.predict(renamed, soft=True, gene_column="symbol").to_numpy()
        query_model = type(model).load_query_data(renamed, model, gene_column="symbol")
    np.testing.assert_allclose(aligned, expected, rtol=1e-5, atol=1e-6)
    assert query_model.predict(renamed, gene_column="symbol").tolist() == (
        query_model.predict().tolist()
    )
    assert_unchanged(renamed, before)
    pd.testing.assert_frame_equal(renamed.var, var_before)


def test_query_training_keeps_frozen_parameters(trained, raw_data):
    model, _ = trained
    query = _make_query(raw_data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        query_model = type(model).load_query_data(query, model)
    frozen = {
        n: p.detach().clone()
        for n, p in query_model.module.named_parameters()
        if not p.requires_grad
    }
    trainable = {
        n: p.detach().clone() for n, p in query_model.module.named_parameters() if p.requires_grad
    }
    assert frozen, "surgery must freeze some parameters"
    assert trainable, "surgery must leave some parameters trainable"
    assert set(trainable) == set(query_model.module.query_trainable_parameters())
    reference_state = {k: v.clone() for k, v in model.module.state_dict().items()}

    query_model.train(**train_kwargs(type(model), max_epochs=1))

    after = dict(query_model.module.named_parameters())
    for name, value in frozen.items():
        assert torch.equal(after[name].detach(), value), f"frozen parameter {name} changed"
        assert not after[name].requires_grad
    assert any(not torch.equal(after[n].detach(), v) for n, v in trainable.items()), (
        "no trainable parameter moved: the query training did nothing"
    )
    # The reference model is not touched by the query's training.
    for key, value in model.module.state_dict().items():
        assert torch.equal(value, reference_state[key]), f"reference {key} changed"
    assert len(query_model.predict()) == query.n_obs


def _record_training_modes(monkeypatch, model):
    plan_cls = type(model)._training_plan_cls
    modes: list[bool] = []
    original = plan_cls.training_step

    def training_step(self, *args, **kwargs):
        modes.append(self.module.training)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(plan_cls, "training_step", training_step)
    return modes


def test_first_training_runs_module_in_train_mode(model_cls, raw_data, monkeypatch):
    adata = raw_data.copy()
    model_cls.setup_anndata(adata, **_setup_kwargs())
    model = model_cls(adata, **tiny_kwargs(model_cls))
    modes = _record_training_modes(monkeypatch, model)
    model.train(**train_kwargs(model_cls, max_epochs=1))
    assert modes and all(modes)


def test_query_training_runs_module_in_train_mode_and_adapts_batchnorm(
    trained, raw_data, monkeypatch
):
    model, _ = trained
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        query_model = type(model).load_query_data(_make_query(raw_data), model)
    stats = {k: v.clone() for k, v in query_model.module.state_dict().items() if "running" in k}
    modes = _record_training_modes(monkeypatch, query_model)
    query_model.train(**train_kwargs(type(model), max_epochs=1))
    assert modes and all(modes), f"module.training during query steps: {modes}"
    after = query_model.module.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in stats.items())


def test_second_train_runs_module_in_train_mode(model_cls, raw_data, monkeypatch):
    adata = raw_data.copy()
    model = _train_new(model_cls, adata, max_epochs=1)
    modes = _record_training_modes(monkeypatch, model)
    model.train(**train_kwargs(model_cls, max_epochs=1))
    assert modes and all(modes), f"module.training during the second fit: {modes}"


# -- the one training path -----------------------------------------------------------------
class _PlanRecorder(pl.Callback):
    """Records, for every stage a ``train()`` call runs, its plan's class and settings."""

    def __init__(self):
        self.plans: list[dict] = []

    def on_train_start(self, trainer, pl_module):
        self.plans.append(
            {
                "cls": type(pl_module),
                "lr": pl_module.lr,
                "loss_kwargs": dict(pl_module.loss_kwargs),
            }
        )


def test_train_without_arguments(model_cls, counts_adata_factory):
    adata = _with_previous_layer(counts_adata_factory(cells_per=8, n_genes=40))
    model_cls.setup_anndata(adata, **_setup_kwargs())
    model = model_cls(adata, **tiny_kwargs(model_cls))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train()
    assert model.is_trained_
    assert len(model.predict()) == adata.n_obs
    assert model.novelty_threshold_ is not None


def test_plan_kwargs_reach_every_stage(model_cls, raw_data):
    adata = raw_data.copy()
    model_cls.setup_anndata(adata, **_setup_kwargs())
    model = model_cls(adata, **tiny_kwargs(model_cls))
    recorder = _PlanRecorder()
    kwargs = train_kwargs(model_cls, max_epochs=1)
    kwargs.pop("lr", None)
    model.train(**kwargs, plan_kwargs={"lr": 0.0123}, callbacks=[recorder])
    assert recorder.plans, "no stage ran"
    assert all(plan["lr"] == 0.0123 for plan in recorder.plans), recorder.plans
    # The same hyperparameter given by name reaches the plans too.
    model.train(**kwargs, lr=0.0456, callbacks=[recorder])
    assert recorder.plans[-1]["lr"] == 0.0456


def test_unknown_training_keyword_raises(trained):
    model, _ = trained
    with pytest.raises(TypeError, match="not_a_setting") as error:
        model.train(max_epochs=1, not_a_setting=3)
    assert "lr" in str(error.value), "the error must list the valid hyperparameters"
    with pytest.raises(TypeError, match="bogus"):
        model.train(max_epochs=1, plan_kwargs={"bogus": 1})
    with pytest.raises(ValueError, match="max_epochs"):
        model.train(max_epochs=0)
    with pytest.raises(ValueError, match="train_size"):
        model.train(max_epochs=1, train_size=0.8, validation_size=0.5)


class _PoisonWeights(pl.Callback):
    """Turns every weight into NaN as a stage starts, as a diverged step would."""

    def on_train_start(self, trainer, pl_module):
        with torch.no_grad():
            for parameter in pl_module.module.parameters():
                parameter.fill_(float("nan"))


def test_diverged_training_stops_with_a_clear_error(model_cls, raw_data):
    adata = raw_data.copy()
    model_cls.setup_anndata(adata, **_setup_kwargs())
    model = model_cls(adata, **tiny_kwargs(model_cls))
    kwargs = train_kwargs(model_cls, max_epochs=1)
    with pytest.raises(
        FloatingPointError, match=r"training (loss|weights) became nan.* at epoch 0.*lr="
    ):
        model.train(**kwargs, callbacks=[_PoisonWeights()])
    assert not model.is_trained_


class _InterruptAfter(pl.Callback):
    """Presses Ctrl+C at the end of an epoch of a given stage (0: the first)."""

    def __init__(self, stage: int, epoch: int):
        self.stage, self.epoch, self.started = stage, epoch, -1

    def on_train_start(self, trainer, pl_module):
        self.started += 1

    def on_train_epoch_end(self, trainer, pl_module):
        if self.started == self.stage and trainer.current_epoch == self.epoch:
            raise KeyboardInterrupt


def test_interrupted_training_leaves_a_usable_model(model_cls, raw_data):
    import signal

    adata = raw_data.copy()
    model_cls.setup_anndata(adata, **_setup_kwargs())
    model = model_cls(adata, **tiny_kwargs(model_cls))
    handler = signal.getsignal(signal.SIGINT)
    last_stage = len(model._training_stages(dict(model._train_options))) - 1
    with pytest.warns(UserWarning, match=r"Training interrupted \(KeyboardInterrupt\).*usable"):
        model.train(
            **train_kwargs(model_cls, max_epochs=4), callbacks=[_InterruptAfter(last_stage, 1)]
        )
    assert signal.getsignal(signal.SIGINT) is handler, "Ctrl+C must work again after"
    assert model.training_interrupted_ and model.is_trained_
    soft = model.predict(soft=True).to_numpy()
    assert np.isfinite(soft).all()
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-5)
    assert model.novelty_threshold_ is not None
    # The next train() runs to the end.
    model.train(**train_kwargs(model_cls, max_epochs=1))
    assert not model.training_interrupted_


class _FirstEpochs(pl.Callback):
    """Records the epoch every stage a train() call runs starts at."""

    def __init__(self):
        self.first: list[int] = []

    def on_train_start(self, trainer, pl_module):
        self.first.append(trainer.current_epoch)


def test_checkpoints_resume_the_epoch_count_and_optimizer(model_cls, raw_data, tmp_path):
    adata = raw_data.copy()
    model_cls.setup_anndata(adata, **_setup_kwargs())
    model = model_cls(adata, **tiny_kwargs(model_cls))
    last_stage = model._training_stages(dict(model._train_options))[-1].name
    kwargs = train_kwargs(model_cls, max_epochs=4)
    model.train(**kwargs, checkpoint_dir=tmp_path, callbacks=[_InterruptAfter(99, 1)])
    checkpoint = tmp_path / last_stage / "last.ckpt"
    assert checkpoint.exists()
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["epoch"] == 3 and saved["optimizer_states"]
    # An interrupted run resumes where its last checkpoint left off.
    interrupted = tmp_path / "interrupted"
    first = model_cls(adata, **tiny_kwargs(model_cls))
    n_stages = len(first._training_stages(dict(first._train_options)))
    with pytest.warns(UserWarning, match="Training interrupted"):
        first.train(
            **kwargs, checkpoint_dir=interrupted, callbacks=[_InterruptAfter(n_stages - 1, 1)]
        )
    resumed = model_cls(adata, **tiny_kwargs(model_cls))
    recorder = _FirstEpochs()
    resumed.train(**kwargs, resume_from=interrupted, callbacks=[recorder])
    # Interrupted at the end of epoch 1, before its checkpoint: epoch 0 was the last saved.
    assert recorder.first == [1], "training must continue after the checkpointed epochs"
    assert resumed.is_trained_ and not resumed.training_interrupted_
    with pytest.raises(ValueError, match="holds no checkpoint"):
        resumed.train(**kwargs, resume_from=tmp_path / "absent")


def test_history_holds_train_and_validation_loss(trained):
    model, _ = trained
    history = model.history
    for curve in ("train_loss", "validation_loss"):
        assert curve in history, f"history lacks {curve}: {sorted(history)}"
        values = history[curve].to_numpy().ravel()
        assert len(values) >= 1 and np.isfinite(values.astype(float)).all()


def test_module_forward_returns_loss_output_whose_terms_add_up(trained):
    model, adata = trained
    loader = model._make_data_loader(adata=adata, batch_size=64, shuffle=False)
    tensors = next(iter(loader))
    # A copy: a training-mode pass moves BatchNorm statistics of the shared fixture.
    module = copy.deepcopy(model.module).train()
    torch.manual_seed(0)
    _, _, output = module(tensors)
    assert isinstance(output, LossOutput)
    terms = loss_terms(output)
    assert terms, f"the loss names no term: {sorted(output.extra_metrics)}"
    torch.testing.assert_close(output.loss.detach(), sum(t.detach() for t in terms.values()))
    assert output.loss.requires_grad


# -- save / load, seeds -------------------------------------------------------------------------
def test_save_load_round_trip(trained, tmp_path, raw_data):
    model, adata = trained
    path = tmp_path / "model"
    model.save(str(path), overwrite=True, save_anndata=False)
    loaded = type(model).load(str(path), adata=adata)
    np.testing.assert_array_equal(
        loaded.predict(soft=True).to_numpy(), model.predict(soft=True).to_numpy()
    )
    assert loaded.cell_types == model.cell_types
    assert loaded.novelty_threshold_ == model.novelty_threshold_
    pd.testing.assert_frame_equal(loaded.annotation_table(), model.annotation_table())
    # A saved reference can be given to load_query_data as a path.
    query = _make_query(raw_data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_path = type(model).load_query_data(query, path)
        from_model = type(model).load_query_data(query, model)
    np.testing.assert_allclose(
        from_path.predict(soft=True).to_numpy(),
        from_model.predict(soft=True).to_numpy(),
        atol=1e-6,
    )


def test_same_seed_reproduces_and_other_seed_differs(trained, model_cls, raw_data):
    model, _ = trained
    again = _train_new(model_cls, raw_data.copy())
    np.testing.assert_array_equal(
        again.predict(soft=True).to_numpy(), model.predict(soft=True).to_numpy()
    )
    import inspect

    init = {"seed": 1} if "seed" in inspect.signature(model_cls.__init__).parameters else {}
    other = _train_new(model_cls, raw_data.copy(), init=init, seed=1)
    reference_state = model.module.state_dict()
    differs = [
        k
        for k, v in other.module.state_dict().items()
        if v.is_floating_point() and not torch.equal(v, reference_state[k])
    ]
    assert differs, "a different seed must give different weights"


def test_training_is_insulated_from_global_rng(trained, model_cls, raw_data):
    """train(seed=...) fixes its own randomness: the global RNG state neither changes the
    result nor (for numpy and python) is consumed by training."""
    import random

    model, _ = trained
    adata = raw_data.copy()
    model_cls.setup_anndata(adata, **_setup_kwargs())
    other = model_cls(adata, **tiny_kwargs(model_cls))
    np.random.seed(123)
    random.seed(123)
    torch.manual_seed(999)  # differs from whatever state the fixture model trained under
    other.train(**train_kwargs(model_cls))
    after_np, after_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    assert after_np == np.random.rand()
    assert after_py == random.random()
    np.testing.assert_array_equal(
        other.predict(soft=True).to_numpy(), model.predict(soft=True).to_numpy()
    )


# -- MuData ------------------------------------------------------------------------------------
def test_setup_mudata_trains_and_predicts(model_cls, raw_data):
    rna = raw_data.copy()
    obs = rna.obs.copy()
    rna.obs = pd.DataFrame(index=rna.obs_names)
    mdata = md.MuData({"rna": rna})
    for column in ("train_label", "batch", "cell_type"):
        mdata.obs[column] = obs[column].to_numpy()
    model_cls.setup_mudata(
        mdata, labels_key="train_label", batch_key="batch", modalities={"rna_layer": "rna"}
    )
    model = model_cls(mdata, **tiny_kwargs(model_cls))
    model.train(**train_kwargs(model_cls))
    pred = model.predict()
    assert len(pred) == mdata.n_obs and set(pred) <= set(model.cell_types)
    assert model.get_latent_representation().shape[0] == mdata.n_obs
    assert model.novelty_threshold_ is not None
    # A second MuData object with the same cells predicts the same.
    other = md.MuData({"rna": rna.copy()})
    other.obs["batch"] = obs["batch"].to_numpy()
    soft = model.predict(other, soft=True)
    np.testing.assert_allclose(soft.to_numpy(), model.predict(soft=True).to_numpy(), atol=1e-6)


def test_setup_mudata_missing_modality(model_cls, raw_data):
    mdata = md.MuData({"gex": raw_data.copy()})
    mdata.obs["train_label"] = raw_data.obs["train_label"].to_numpy()
    with pytest.raises(KeyError, match="rna"):
        model_cls.setup_mudata(mdata, labels_key="train_label")


# -- bad inputs to setup -----------------------------------------------------------------------
def _set_first_value(adata, value):
    X = adata.X.copy()
    X.data[0] = value
    adata.X = X


def _one_class(adata):
    labels = adata.obs["train_label"].to_numpy().copy()
    labels[(labels != UNKNOWN) & (labels != "T0")] = UNKNOWN
    adata.obs["train_label"] = labels


def _nan_labels(adata):
    labels = adata.obs["train_label"].astype(object).to_numpy().copy()
    labels[:3] = np.nan
    adata.obs["train_label"] = labels


SETUP_CASES = {
    "missing_labels_key": (None, {"labels_key": "no_such_labels"}, KeyError, "no_such_labels"),
    "missing_batch_key": (None, {"batch_key": "no_such_batch"}, KeyError, "no_such_batch"),
    "missing_layer": (None, {"layer": "counts"}, KeyError, "counts"),
    "nan_in_X": (lambda a: _set_first_value(a, np.nan), {}, ValueError, "NaN"),
    "inf_in_X": (lambda a: _set_first_value(a, np.inf), {}, ValueError, "infinite"),
    "negative_X": (lambda a: _set_first_value(a, -2.0), {}, ValueError, "negative"),
    "one_labelled_class": (_one_class, {}, ValueError, "at least two"),
    "nan_labels": (_nan_labels, {}, ValueError, "NaN"),
}


@pytest.mark.parametrize("case", list(SETUP_CASES))
def test_setup_rejects_bad_input_and_leaves_adata_unchanged(model_cls, raw_data, case):
    mutate, kwargs, error, match = SETUP_CASES[case]
    adata = raw_data.copy()
    if mutate is not None:
        mutate(adata)
    before = snapshot(adata)
    with pytest.raises(error, match=match):
        model_cls.setup_anndata(adata, **{**_setup_kwargs(), **kwargs})
    assert_unchanged(adata, before)


def test_setup_without_labels_key(model_cls, raw_data):
    """Classifiers refuse a setup without labels; label-free models (an unsupervised atlas)
    accept it, train, embed, and refuse to predict with an error that names labels_key."""
    adata = raw_data.copy()
    before = snapshot(adata)
    if model_cls._requires_labels:
        with pytest.raises(ValueError, match="labels_key"):
            model_cls.setup_anndata(adata, batch_key="batch")
        assert_unchanged(adata, before)
        return
    model_cls.setup_anndata(adata, batch_key="batch")
    model = model_cls(adata, **tiny_kwargs(model_cls))
    model.train(**train_kwargs(model_cls))
    assert np.isfinite(model.get_latent_representation()).all()
    with pytest.raises(ValueError, match="labels_key"):
        model.predict()


def test_setup_rejects_empty_adata(model_cls, raw_data):
    for empty in (raw_data[:0].copy(), raw_data[:, :0].copy()):
        before = snapshot(empty)
        with pytest.raises(ValueError, match="empty"):
            model_cls.setup_anndata(empty, **_setup_kwargs())
        assert_unchanged(empty, before)


def test_setup_rejects_dense_nan(model_cls, raw_data):
    adata = raw_data.copy()
    X = np.asarray(adata.X.todense())
    X[2, 3] = np.nan
    adata.X = X
    before = snapshot(adata)
    with pytest.raises(ValueError, match="NaN"):
        model_cls.setup_anndata(adata, **_setup_kwargs())
    assert_unchanged(adata, before)


# -- bad queries -------------------------------------------------------------------------------
def _low_overlap(query):
    names = query.var_names.to_numpy().copy()
    names[: int(0.6 * len(names))] = [f"other{i}" for i in range(int(0.6 * len(names)))]
    query.var_names = names


def _ensembl(query):
    query.var_names = [f"ENSG{i:011d}" for i in range(query.n_vars)]


def _lognorm(query):
    query.X = log_normalize(query).X


QUERY_CASES = {
    "low_overlap": (_low_overlap, "overlap"),
    "ensembl_vs_symbols": (_ensembl, "Ensembl"),
    "lognormalised_vs_counts": (_lognorm, "raw counts"),
}


@pytest.mark.parametrize("case", list(QUERY_CASES))
def test_bad_query_raises_and_leaves_query_unchanged(trained, raw_data, case):
    model, _ = trained
    mutate, match = QUERY_CASES[case]
    query = raw_data[raw_data.obs["batch"] == "b1"].copy()
    mutate(query)
    before = snapshot(query)
    with pytest.raises(ValueError, match=match):
        type(model).load_query_data(query, model)
    assert_unchanged(query, before)
    with pytest.raises(ValueError, match=match):
        model.predict(query)
    assert_unchanged(query, before)


def test_query_with_missing_batch_values_raises(trained, raw_data):
    model, _ = trained
    query = raw_data[raw_data.obs["batch"] == "b1"].copy()
    batch = query.obs["batch"].astype(object).to_numpy().copy()
    batch[0] = np.nan
    query.obs["batch"] = batch
    before = snapshot(query)
    for call in (lambda: type(model).load_query_data(query, model), lambda: model.predict(query)):
        with pytest.raises(ValueError, match="missing values"):
            call()
        assert_unchanged(query, before)


def test_load_query_data_needs_trained_reference(model_cls, raw_data):
    adata = raw_data.copy()
    model_cls.setup_anndata(adata, **_setup_kwargs())
    untrained = model_cls(adata, **tiny_kwargs(model_cls))
    with pytest.raises(ValueError, match="not trained"):
        model_cls.load_query_data(raw_data.copy(), untrained)


def test_counts_model_rejects_lognormalised_predict_input(trained, raw_data):
    model, _ = trained
    assert model.input_kind_ == "counts"
    lognorm = log_normalize(raw_data)
    before = snapshot(lognorm)
    with pytest.raises(ValueError, match="raw counts"):
        model.predict(lognorm)
    assert_unchanged(lognorm, before)


def test_query_with_unseen_labels_treats_them_as_unlabelled(trained, raw_data):
    model, _ = trained
    query = raw_data[raw_data.obs["batch"] == "b1"].copy()
    query.obs["train_label"] = query.obs["cell_type"].astype(str)  # includes "Novel"
    before = snapshot(query)
    with pytest.warns(UserWarning, match="never saw"):
        query_model = type(model).load_query_data(query, model)
    assert len(query_model.predict()) == query.n_obs
    assert_unchanged(query, before)


def test_dense_and_sparse_queries_agree(trained, raw_data):
    model, _ = trained
    query = raw_data[raw_data.obs["batch"] == "b1"].copy()
    dense = query.copy()
    dense.X = np.asarray(query.X.todense())
    assert sp.issparse(query.X)
    np.testing.assert_allclose(
        model.predict(dense, soft=True).to_numpy(),
        model.predict(query, soft=True).to_numpy(),
        atol=1e-5,
    )


def test_predict_accepts_query_without_batch_column(trained, raw_data):
    model, _ = trained
    query = raw_data[raw_data.obs["batch"] == "b1"].copy()
    del query.obs["batch"]
    assert len(model.predict(query)) == query.n_obs
