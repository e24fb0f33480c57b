"""SCATLASVAE: likelihoods, loss terms, head window, batch-invariant encoder, surgery, heads."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import mudata as md
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import UNKNOWN, assert_unchanged, make_counts_adata, snapshot
from scvi import REGISTRY_KEYS

from celltyper.data import AllCellsSplitter
from celltyper.model import SCATLASVAE
from celltyper.module import SCATLASVAEModule
from celltyper.nn import CovariateDecoder, group_mmd, rbf_mmd
from celltyper.train import RestoreBestWeights, SCATLASVAETrainingPlan, loss_terms

TINY = {"n_hidden": 32, "n_latent": 8}
FAST = {"enable_progress_bar": False, "batch_size": 32, "lr": 1e-2}


def _coarse(cell_types: pd.Series) -> np.ndarray:
    mapping = {"T0": "A", "T1": "A", "T2": "B", "T3": "B"}
    return cell_types.astype(str).map(mapping).fillna(UNKNOWN).to_numpy()


def _with_two_keys(adata):
    """``fine`` = train_label; ``coarse`` labels every known-type cell of both batches."""
    adata.obs["fine"] = adata.obs["train_label"].astype(str)
    adata.obs["coarse"] = _coarse(adata.obs["cell_type"])
    return adata


@pytest.fixture(scope="module")
def trained_two_keys():
    raw = _with_two_keys(make_counts_adata())
    adata = raw.copy()
    SCATLASVAE.setup_anndata(adata, labels_key=["fine", "coarse"], batch_key="batch")
    model = SCATLASVAE(adata, **TINY)
    model.train(max_epochs=3, **FAST)
    return model, adata, raw


# -- likelihoods ------------------------------------------------------------------------------
def _zinb_log_prob(x: float, mu: float, theta: float, zi_logit: float) -> float:
    """ZINB log-probability written out from its definition, in float64."""
    pi = 1.0 / (1.0 + math.exp(-zi_logit))
    log_nb = (
        math.lgamma(x + theta)
        - math.lgamma(theta)
        - math.lgamma(x + 1.0)
        + theta * math.log(theta / (theta + mu))
        + x * math.log(mu / (theta + mu))
    )
    if x == 0:
        return math.log(pi + (1.0 - pi) * math.exp(log_nb))
    return math.log(1.0 - pi) + log_nb


def _module(likelihood="zinb", **kwargs):
    torch.manual_seed(0)
    return SCATLASVAEModule(n_input=3, n_categories=[2], likelihood=likelihood, **kwargs)


def test_zinb_log_likelihood_matches_direct_computation():
    x = torch.tensor([[0.0, 3.0, 7.0], [1.0, 0.0, 12.0]], dtype=torch.float64)
    mu = torch.tensor([[0.5, 2.0, 9.0], [1.5, 4.0, 10.0]], dtype=torch.float64)
    theta = torch.tensor([[2.0, 0.7, 5.0], [1.0, 3.0, 0.3]], dtype=torch.float64)
    zi = torch.tensor([[-1.0, 0.5, -3.0], [2.0, 0.0, -0.5]], dtype=torch.float64)
    out = {"rate": mu, "dispersion": theta, "zi_logits": zi}
    nll = _module("zinb").reconstruction_loss(x, out)
    expected = [
        -sum(_zinb_log_prob(*(float(t[i, j]) for t in (x, mu, theta, zi))) for j in range(3))
        for i in range(2)
    ]
    np.testing.assert_allclose(nll.numpy(), expected, rtol=1e-6)
    # NB is ZINB without zero inflation (zi logit -> -inf).
    nb = _module("nb").reconstruction_loss(x, {"rate": mu, "dispersion": theta})
    expected_nb = [
        -sum(
            _zinb_log_prob(float(x[i, j]), float(mu[i, j]), float(theta[i, j]), -50.0)
            for j in range(3)
        )
        for i in range(2)
    ]
    np.testing.assert_allclose(nb.numpy(), expected_nb, rtol=1e-6)


def test_mse_reconstruction_is_squared_log_error():
    x = torch.tensor([[0.0, 3.0, 7.0]])
    rate = torch.tensor([[1.0, 3.0, 2.0]])
    value = _module("mse").reconstruction_loss(x, {"rate": rate})
    expected = (math.log1p(0) - math.log1p(1)) ** 2 + (math.log1p(7) - math.log1p(2)) ** 2
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_bad_likelihood_and_head_weights_raise():
    with pytest.raises(ValueError, match="likelihood"):
        _module("poisson")
    with pytest.raises(ValueError, match="head_weights"):
        _module(n_labels_per_key=[2, 3], head_weights=[1.0])


# -- encoder and decoder ---------------------------------------------------------------------
def test_encoder_ignores_batch_and_decoder_reads_it():
    raw = make_counts_adata(n_batches=2, cells_per=20)
    adata = raw.copy()
    SCATLASVAE.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    model = SCATLASVAE(adata, **TINY)
    model.train(max_epochs=1, **FAST)
    swapped = raw.copy()
    swapped.obs["batch"] = np.where(raw.obs["batch"] == "b0", "b1", "b0")
    before = snapshot(swapped)
    np.testing.assert_array_equal(
        model.get_latent_representation(swapped), model.get_latent_representation()
    )
    assert_unchanged(swapped, before)
    # The decoder does read the batch: decoding as b0 and as b1 differs.
    as_b0 = model.get_normalized_expression(transform_batch="b0", return_numpy=True)
    as_b1 = model.get_normalized_expression(transform_batch="b1", return_numpy=True)
    assert np.abs(as_b0 - as_b1).max() > 1e-4


def test_normalized_expression_scales_and_subsets(trained_two_keys):
    model, adata, _raw = trained_two_keys
    props = model.get_normalized_expression()
    assert props.shape == (adata.n_obs, adata.n_vars)
    assert list(props.columns) == list(adata.var_names)
    np.testing.assert_allclose(props.sum(axis=1), 1.0, rtol=1e-4)
    scaled = model.get_normalized_expression(library_size=1e4, return_numpy=True)
    np.testing.assert_allclose(scaled, props.to_numpy() * 1e4, rtol=1e-4)
    observed = model.get_normalized_expression(library_size="observed", return_numpy=True)
    totals = np.asarray(adata.X.sum(axis=1)).reshape(-1)
    np.testing.assert_allclose(observed.sum(axis=1), totals, rtol=1e-3)
    subset = model.get_normalized_expression(gene_list=["g5", "g1"])
    np.testing.assert_allclose(subset.to_numpy(), props[["g5", "g1"]].to_numpy(), rtol=1e-6)
    with pytest.raises(KeyError, match="gene_list"):
        model.get_normalized_expression(gene_list=["nope"])
    with pytest.raises(ValueError, match="transform_batch"):
        model.get_normalized_expression(transform_batch="b9")


def test_one_hot_decoder_equals_linear_on_concatenated_one_hot():
    torch.manual_seed(0)
    decoder = CovariateDecoder(4, 6, [3, 2], n_hidden=5, representation="one-hot")
    decoder.eval()
    z = torch.randn(7, 4)
    codes = [torch.randint(0, 3, (7,)), torch.randint(0, 2, (7,))]
    h = decoder.first(z) + decoder.covariates[0](codes[0]) + decoder.covariates[1](codes[1])
    weight = torch.cat(
        [decoder.first.weight, decoder.covariates[0].weight.T, decoder.covariates[1].weight.T], 1
    )
    one_hot = torch.cat(
        [z, torch.nn.functional.one_hot(codes[0], 3), torch.nn.functional.one_hot(codes[1], 2)], 1
    ).float()
    torch.testing.assert_close(h, one_hot @ weight.T + decoder.first.bias)


# -- surgery --------------------------------------------------------------------------------
def _query_with_new_batch(raw):
    query = raw[raw.obs["batch"] == "b1"].copy()
    query.obs["batch"] = "b_new"
    query.obs["donor"] = "d_new"
    return query


@pytest.mark.parametrize("representation", ["embedding", "one-hot"])
def test_surgery_adds_rows_and_keeps_reference_weights(representation):
    raw = make_counts_adata(cells_per=20)
    raw.obs["donor"] = np.where(np.arange(raw.n_obs) % 2, "d1", "d2")
    reference = raw.copy()
    SCATLASVAE.setup_anndata(
        reference,
        labels_key="train_label",
        batch_key="batch",
        categorical_covariate_keys=["donor"],
    )
    model = SCATLASVAE(reference, covariate_representation=representation, **TINY)
    model.train(max_epochs=1, **FAST)
    ref_state = {k: v.clone() for k, v in model.module.state_dict().items()}

    query = _query_with_new_batch(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        query_model = SCATLASVAE.load_query_data(query, model)
    tables = ["decoder.covariates.0.weight", "decoder.covariates.1.weight"]
    for name in tables:
        grown = query_model.module.state_dict()[name]
        assert grown.shape[0] == ref_state[name].shape[0] + 1
        assert torch.equal(grown[:-1], ref_state[name])
    assert query_model.registration.batches[-1] == "b_new"
    trainable = {n for n, p in query_model.module.named_parameters() if p.requires_grad}
    assert trainable == set(tables)

    query_model.train(max_epochs=2, **FAST)
    after = query_model.module.state_dict()
    for name, value in ref_state.items():
        if "running" in name or "num_batches_tracked" in name or name == "n_reference_categories":
            continue  # BatchNorm statistics adapt to the query (AdaBN), as in the contract
        if name in tables:
            assert torch.equal(after[name][:-1], value), f"reference rows of {name} changed"
            assert not torch.equal(after[name][-1], query_model_initial_row(name, query_model))
        else:
            assert torch.equal(after[name], value), f"reference weight {name} changed"
    # Rows of the query now count as reference rows for a later surgery.
    assert query_model.module.n_reference_categories.tolist() == [3, 3]


def query_model_initial_row(name, query_model):
    """The new row as loaded (the query module's own initialisation, seeded)."""
    fresh = SCATLASVAE(query_model.adata, **query_model.init_params_["non_kwargs"])
    return fresh.module.state_dict()[name][-1]


def test_frozen_rows_get_exactly_zero_gradient_even_after_loading_weights():
    torch.manual_seed(0)
    decoder = CovariateDecoder(2, 5, [4], n_hidden=6, embedding_dim=3)
    decoder.freeze_leading_rows([3])
    # scvi's Embedding replaces its parameter on load_state_dict (as RestoreBestWeights
    # does); the freezing lives in the forward pass, so it survives.
    decoder.load_state_dict(decoder.state_dict())
    rows = decoder.covariate_rows(0, torch.tensor([0, 1, 2, 3, 3]))
    rows.sum().backward()
    grad = decoder.covariates[0].weight.grad
    assert torch.equal(grad[:3], torch.zeros(3, 3))
    assert torch.equal(grad[3], torch.full((3,), 2.0))
    with pytest.raises(ValueError, match="counts must be"):
        decoder.freeze_leading_rows([5])


# -- label heads ----------------------------------------------------------------------------
def test_masked_labels_contribute_no_gradient():
    torch.manual_seed(0)
    module = SCATLASVAEModule(n_input=5, n_categories=[1], n_labels_per_key=[3, 2], n_latent=4)
    qz_m = torch.randn(6, 4, requires_grad=True)
    # Codes 3 (key 0) and 2 (key 1) are the unlabelled category.
    tensors = {
        REGISTRY_KEYS.LABELS_KEY: torch.tensor([[0], [3], [1], [3], [2], [3]]),
        "labels_1": torch.tensor([[1], [0], [2], [2], [2], [2]]),
    }
    loss, _ = module.prediction_loss(tensors, qz_m)
    loss.backward()
    grad_norm = qz_m.grad.norm(dim=1)
    # Cell 3 and 5 are unlabelled for both keys; cell 1 only for key 0 (labelled for key 1).
    assert grad_norm[3] == 0 and grad_norm[5] == 0
    assert (grad_norm[[0, 1, 2, 4]] > 0).all()
    # Changing the labels of masked cells among the unlabelled codes changes nothing.
    qz_m.grad = None
    loss_again, _ = module.prediction_loss(tensors, qz_m)
    assert loss_again.item() == loss.item()
    # Without a labelled cell of key 1, head 1 gets no gradient.
    module.zero_grad()
    tensors["labels_1"] = torch.full((6, 1), 2)
    loss, _ = module.prediction_loss(tensors, qz_m.detach())
    loss.backward()
    assert module.heads[1].weight.grad is None or not module.heads[1].weight.grad.any()
    assert module.heads[0].weight.grad.abs().sum() > 0


def test_class_weights_are_total_over_class_count():
    adata = make_counts_adata(cells_per=10)
    labels = adata.obs["train_label"].astype(str).to_numpy().copy()
    # Make T0 three times rarer among the labelled cells.
    t0 = np.flatnonzero(labels == "T0")
    labels[t0[: len(t0) * 2 // 3]] = UNKNOWN
    adata.obs["train_label"] = labels
    SCATLASVAE.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    model = SCATLASVAE(adata, **TINY)
    counts = pd.Series(labels[labels != UNKNOWN]).value_counts()
    expected = [counts.sum() / counts[t] for t in model.cell_types]
    np.testing.assert_allclose(model.module.class_weights(0).numpy(), expected, rtol=1e-6)


def test_two_label_keys_predict_independently(trained_two_keys):
    model, adata, _raw = trained_two_keys
    assert model.labels_keys == ["fine", "coarse"]
    assert model.cell_types == ["T0", "T1", "T2", "T3"]
    assert model.cell_types_of("coarse") == ["A", "B"]
    fine = model.predict()
    coarse = model.predict(label_key="coarse")
    assert set(coarse) <= {"A", "B"} and set(fine) <= set(model.cell_types)
    both = model.predict_all_keys()
    assert list(both.columns) == ["fine", "coarse"]
    np.testing.assert_array_equal(both["fine"].astype(str), fine)
    np.testing.assert_array_equal(both["coarse"].astype(str), coarse)
    soft = model.predict(label_key="coarse", soft=True)
    assert list(soft.columns) == ["A", "B"]
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-5)
    # The coarse key was labelled in both batches and is learned.
    truth = _coarse(adata.obs["cell_type"])
    known = truth != UNKNOWN
    assert (coarse[known] == truth[known]).mean() > 0.8
    # Perturbing one head changes only that key's predictions.
    fine_soft = model.predict(soft=True).to_numpy()
    with torch.no_grad():
        saved = model.module.heads[1].weight.clone()
        model.module.heads[1].weight.mul_(-1.0)
    try:
        np.testing.assert_array_equal(model.predict(soft=True).to_numpy(), fine_soft)
        assert not np.allclose(model.predict(label_key="coarse", soft=True).to_numpy(), soft)
    finally:
        with torch.no_grad():
            model.module.heads[1].weight.copy_(saved)
    with pytest.raises(KeyError, match="label_key"):
        model.predict(label_key="nope")


def test_extra_label_keys_on_new_data_and_save_load(trained_two_keys, tmp_path):
    model, adata, raw = trained_two_keys
    other = raw.copy()
    del other.obs["coarse"]  # absent label columns become unlabelled
    before = snapshot(other)
    table = model.predict_all_keys(other)
    pd.testing.assert_frame_equal(table, model.predict_all_keys())
    assert_unchanged(other, before)
    model.save(str(tmp_path / "m"), save_anndata=False)
    loaded = SCATLASVAE.load(str(tmp_path / "m"), adata=adata)
    np.testing.assert_array_equal(
        loaded.predict(label_key="coarse", soft=True).to_numpy(),
        model.predict(label_key="coarse", soft=True).to_numpy(),
    )


def test_prediction_loss_joins_for_the_last_epochs():
    adata = make_counts_adata(cells_per=10)
    SCATLASVAE.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    model = SCATLASVAE(adata, **TINY)
    snapshots = []

    class RecordHead(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            snapshots.append(pl_module.module.heads[0].weight.detach().clone())

    initial = model.module.heads[0].weight.detach().clone()
    # One epoch of 3 minibatches is far too short a window for the heads: a warning says so.
    with pytest.warns(UserWarning, match="n_epochs_prediction=None"):
        model.train(max_epochs=3, n_epochs_prediction=1, callbacks=[RecordHead()], **FAST)
    assert torch.equal(snapshots[0], initial) and torch.equal(snapshots[1], initial)
    assert not torch.equal(snapshots[2], initial)
    logged = model.history["prediction_weight"].to_numpy().ravel()
    np.testing.assert_array_equal(logged, [0.0, 0.0, 1.0])
    classification = model.history["classification_loss_train"].to_numpy().ravel()
    assert classification[0] == 0.0 and classification[2] > 0.0


def _fake_trainer(max_epochs, early_stopping=False, batches=3, epoch=0):
    return SimpleNamespace(
        max_epochs=max_epochs,
        early_stopping_callback=object() if early_stopping else None,
        num_training_batches=batches,
        current_epoch=epoch,
        global_step=0,
    )


def test_plan_turns_n_epochs_prediction_into_a_start_epoch():
    plan = SCATLASVAETrainingPlan(_module(n_labels_per_key=[2]), n_epochs_prediction=4)
    plan._trainer = _fake_trainer(max_epochs=10, batches=200)
    plan.on_train_start()
    assert plan.prediction_start_epoch == 6
    assert [plan.prediction_weight(e) for e in (5, 6, 9)] == [0.0, 1.0, 1.0]
    plan._trainer = _fake_trainer(max_epochs=10, batches=200, epoch=5)
    assert plan.scheduled_loss_kwargs(0) == {"prediction_weight": 0.0}
    # A window longer than the fit, or None, trains the heads throughout.
    plan._trainer = _fake_trainer(max_epochs=3, batches=200)
    plan.on_train_start()
    assert plan.prediction_start_epoch == 0
    plan = SCATLASVAETrainingPlan(_module(n_labels_per_key=[2]), n_epochs_prediction=None)
    plan._trainer = _fake_trainer(max_epochs=10)
    plan.on_train_start()
    assert plan.prediction_start_epoch == 0
    with pytest.raises(ValueError, match="n_epochs_prediction"):
        SCATLASVAETrainingPlan(_module(), n_epochs_prediction=0)


def test_early_stopping_trains_the_heads_throughout_with_a_warning():
    plan = SCATLASVAETrainingPlan(_module(n_labels_per_key=[2]), n_epochs_prediction=4)
    plan._trainer = _fake_trainer(max_epochs=10, early_stopping=True)
    with pytest.warns(UserWarning, match="early_stopping"):
        plan.on_train_start()
    assert plan.prediction_start_epoch == 0


def test_short_head_window_warns_only_when_the_heads_learn():
    plan = SCATLASVAETrainingPlan(_module(n_labels_per_key=[2]), n_epochs_prediction=2)
    plan._trainer = _fake_trainer(max_epochs=10, batches=249)  # 498 steps
    with pytest.warns(UserWarning, match="498 optimisation steps"):
        plan.on_train_start()
    plan._trainer = _fake_trainer(max_epochs=10, batches=250)  # 500 steps: enough
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan.on_train_start()
        # Frozen heads (query surgery) learn nothing, whatever the window.
        plan.module.heads.requires_grad_(False)
        plan._trainer = _fake_trainer(max_epochs=10, batches=1)
        plan.on_train_start()


def test_kl_warmup_is_scvi_tools_own():
    plan = SCATLASVAETrainingPlan(_module(), n_epochs_kl_warmup=10, max_kl_weight=0.5)
    for epoch, expected in ((0, 0.0), (5, 0.25), (50, 0.5)):
        plan._trainer = _fake_trainer(max_epochs=60, epoch=epoch)
        assert float(plan.kl_weight) == pytest.approx(expected)
    plan = SCATLASVAETrainingPlan(_module(), n_epochs_kl_warmup=0)
    plan._trainer = _fake_trainer(max_epochs=60)
    assert float(plan.kl_weight) == 1.0


def test_covariate_tables_are_never_weight_decayed():
    module = _module(n_labels_per_key=[2])
    optimizer = SCATLASVAETrainingPlan(module, weight_decay=0.1).configure_optimizers()
    groups = optimizer["optimizer"].param_groups
    tables = {id(t.weight) for t in module.covariate_tables()}
    decays = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decays[id(module.decoder.covariates[0].weight)] == 0.0
    assert all(d == 0.1 for p, d in decays.items() if p not in tables)
    assert len(decays) == len(list(module.parameters()))


# -- the module's objective -------------------------------------------------------------------
def _tensors(module_labels=(0, 1, 2, 0, 1, 2), n_input=3):
    g = torch.Generator().manual_seed(1)
    n = len(module_labels)
    return {
        REGISTRY_KEYS.X_KEY: torch.poisson(torch.full((n, n_input), 3.0), generator=g),
        REGISTRY_KEYS.BATCH_KEY: torch.tensor([[0], [1]] * (n // 2)),
        REGISTRY_KEYS.LABELS_KEY: torch.tensor(module_labels).view(-1, 1),
    }


def test_loss_terms_add_up_to_the_loss_and_are_hand_computable():
    module = _module(n_labels_per_key=[2])
    module.eval()  # no dropout, BatchNorm on its running statistics
    tensors = _tensors()
    torch.manual_seed(0)
    inference, generative, out = module(
        tensors, loss_kwargs={"kl_weight": 0.3, "prediction_weight": 2.0, "mmd_weight": 0.5}
    )
    terms = loss_terms(out)
    assert set(terms) == {
        "reconstruction_term_loss",
        "kl_term_loss",
        "classification_loss",
        "mmd_loss",
    }
    torch.testing.assert_close(out.loss, sum(terms.values()))
    x = tensors[REGISTRY_KEYS.X_KEY]
    nll = module.reconstruction_loss(x, generative)
    qz_m, qz_v = inference["qz_m"], inference["qz_v"]
    kl = 0.5 * (qz_v + qz_m**2 - 1.0 - qz_v.log()).sum(dim=1)
    torch.testing.assert_close(terms["reconstruction_term_loss"], nll.mean())
    torch.testing.assert_close(terms["kl_term_loss"], 0.3 * kl.mean())
    labelled = torch.tensor([0, 1, 3, 4])  # code 2 is the unlabelled category
    labels = tensors[REGISTRY_KEYS.LABELS_KEY].view(-1)[labelled]
    ce = torch.nn.functional.cross_entropy(module.heads[0](qz_m[labelled]), labels)
    torch.testing.assert_close(terms["classification_loss"], 2.0 * ce)
    groups = tensors[REGISTRY_KEYS.BATCH_KEY].view(-1)
    torch.testing.assert_close(terms["mmd_loss"], 0.5 * group_mmd(inference["z"], groups))
    # scvi-tools' ELBO metrics read the per-cell terms.
    torch.testing.assert_close(out.reconstruction_loss["reconstruction_loss"], nll)


def test_heads_stay_out_of_the_graph_before_their_window():
    module = _module(n_labels_per_key=[2])
    _, _, out = module(_tensors(), loss_kwargs={"prediction_weight": 0.0})
    assert float(loss_terms(out)["classification_loss"]) == 0.0
    out.loss.backward()
    # No gradient at all (not a zero one), so Adam does not count steps for the heads.
    assert module.heads[0].weight.grad is None
    assert module.encoder.encoder.fc_layers[0][0].weight.grad is not None


def test_validation_loss_is_the_full_objective_with_accuracy():
    module = _module(n_labels_per_key=[2])
    module.eval()
    tensors = _tensors()
    torch.manual_seed(0)
    out = module.validation_loss(tensors)
    torch.manual_seed(0)
    _, _, full = module(tensors, loss_kwargs={"kl_weight": 1.0, "prediction_weight": 1.0})
    torch.testing.assert_close(out.loss, full.loss)
    assert "mmd_loss" not in out.extra_metrics
    labelled = torch.tensor([0, 1, 3, 4])
    predicted = module.classify(tensors).argmax(dim=1)[labelled]
    expected = (predicted == tensors[REGISTRY_KEYS.LABELS_KEY].view(-1)[labelled]).float()
    torch.testing.assert_close(out.extra_metrics["accuracy"], expected.mean())


def test_all_cells_splitter_passes_over_every_training_cell_once(counts_adata):
    SCATLASVAE.setup_anndata(counts_adata, labels_key="train_label", batch_key="batch")
    model = SCATLASVAE(counts_adata, **TINY)
    splitter = AllCellsSplitter(
        model.adata_manager, n_labels=model.n_labels, validation_size=0.1, batch_size=64
    )
    labelled = (counts_adata.obs["train_label"] != UNKNOWN).to_numpy()
    assert labelled[splitter.val_idx].all()
    assert len(splitter.val_idx) == round(0.1 * labelled.sum())
    assert sorted([*splitter.train_idx, *splitter.val_idx]) == list(range(counts_adata.n_obs))
    # One epoch: every training cell once (labelled and unlabelled alike, no cycling).
    epoch = [b[REGISTRY_KEYS.X_KEY] for b in splitter.train_dataloader()]
    x = np.asarray(counts_adata.X.todense())
    assert sum(len(b) for b in epoch) == len(splitter.train_idx)
    np.testing.assert_allclose(
        torch.cat(epoch).sum(dim=0).numpy(), x[splitter.train_idx].sum(axis=0)
    )


def test_training_loss_decreases_and_restores_no_weights_by_default():
    adata = make_counts_adata(cells_per=20)
    SCATLASVAE.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    model = SCATLASVAE(adata, **TINY)
    used = []

    class RecordCallbacks(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            used.append(any(isinstance(c, RestoreBestWeights) for c in trainer.callbacks))

    model.train(max_epochs=8, callbacks=[RecordCallbacks()], **FAST)
    loss = model.history["train_loss"].to_numpy().ravel()
    assert loss[-2:].mean() < 0.8 * loss[0]
    assert {"elbo_train", "kl_term_loss_validation", "accuracy_validation"} <= set(model.history)
    model.train(max_epochs=1, restore_best_weights=True, callbacks=[RecordCallbacks()], **FAST)
    assert used == [False, True]
    with pytest.raises(TypeError, match="kl_weight"):
        model.train(max_epochs=1, kl_weight=0.5, **FAST)


# -- MMD ----------------------------------------------------------------------------------
def test_mmd_is_zero_for_identical_samples_and_grows_with_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, generator=g)
    assert rbf_mmd(x, x).item() == pytest.approx(0.0, abs=1e-6)
    near = rbf_mmd(x, torch.randn(50, 3, generator=g)).item()
    far = rbf_mmd(x, torch.randn(50, 3, generator=g) + 3.0).item()
    assert far > near > 0
    groups = torch.tensor([0] * 25 + [1] * 25)
    shifted = torch.cat([x[:25], x[25:] + 3.0])
    assert group_mmd(shifted, groups) > group_mmd(x, groups)
    assert group_mmd(x, torch.zeros(50)).item() == 0.0  # one group: nothing to align


def test_training_with_mmd_and_other_likelihoods():
    adata = make_counts_adata(cells_per=10)
    SCATLASVAE.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    for kwargs in ({"likelihood": "nb"}, {"likelihood": "mse", "normalize_total": 1e4}):
        model = SCATLASVAE(adata, **TINY, **kwargs)
        model.train(max_epochs=1, mmd_weight=1.0, **FAST)
        logged = model.history["mmd_loss_train"].to_numpy(dtype=float)
        assert logged.size and np.isfinite(logged).all()
        assert np.isfinite(model.get_latent_representation()).all()
    with pytest.raises(KeyError, match="mmd_key"):
        SCATLASVAE(adata, mmd_key="donor", **TINY)


# -- unsupervised atlas, setup, interpretation ----------------------------------------------------
def test_unsupervised_atlas_then_heads():
    raw = make_counts_adata(cells_per=20)
    atlas = raw.copy()
    SCATLASVAE.setup_anndata(atlas, batch_key="batch")
    model = SCATLASVAE(atlas, **TINY)
    model.train(max_epochs=2, **FAST)
    assert model.cell_types == [] and model.novelty_threshold_ is None
    assert model.get_latent_representation().shape == (raw.n_obs, 8)
    with pytest.raises(ValueError, match="without labels_key"):
        model.predict()
    with pytest.raises(ValueError, match="without labels_key"):
        model.annotate(raw.copy())

    labelled = raw.copy()
    SCATLASVAE.setup_anndata(labelled, labels_key="train_label", batch_key="batch")
    supervised = SCATLASVAE.from_unsupervised(model, labelled)
    for name, value in model.module.state_dict().items():
        if name.startswith("decoder") or name.startswith("encoder"):
            assert torch.equal(supervised.module.state_dict()[name], value), name
    supervised.train(max_epochs=2, n_epochs_prediction=None, **FAST)
    ref = (raw.obs["train_label"] != UNKNOWN).to_numpy()
    accuracy = supervised.predict()[ref] == raw.obs["cell_type"].astype(str).to_numpy()[ref]
    assert accuracy.mean() > 0.6


def test_setup_rejects_bad_extra_keys_and_leaves_adata_unchanged():
    adata = make_counts_adata(cells_per=5)
    adata.obs["donor"] = pd.Categorical(["d1"] * (adata.n_obs - 1) + [np.nan])
    before = snapshot(adata)
    with pytest.raises(ValueError, match="missing values"):
        SCATLASVAE.setup_anndata(adata, batch_key="batch", categorical_covariate_keys=["donor"])
    with pytest.raises(KeyError, match="no_such"):
        SCATLASVAE.setup_anndata(adata, labels_key=["train_label", "no_such"])
    with pytest.raises(ValueError, match="extra_labels_keys"):
        SCATLASVAE.setup_anndata(adata, extra_labels_keys=["train_label"])
    with pytest.raises(ValueError, match="twice"):
        SCATLASVAE.setup_anndata(adata, labels_key=["train_label", "train_label"])
    assert_unchanged(adata, before)


def test_setup_mudata_with_several_label_keys_and_covariates():
    raw = _with_two_keys(make_counts_adata(cells_per=10))
    raw.obs["donor"] = np.where(np.arange(raw.n_obs) % 2, "d1", "d2")
    rna = raw.copy()
    rna.obs = pd.DataFrame(index=rna.obs_names)
    mdata = md.MuData({"rna": rna})
    for column in ("fine", "coarse", "batch", "donor"):
        mdata.obs[column] = raw.obs[column].to_numpy()
    SCATLASVAE.setup_mudata(
        mdata,
        labels_key=["fine", "coarse"],
        batch_key="batch",
        categorical_covariate_keys="donor",
    )
    model = SCATLASVAE(mdata, **TINY)
    args = model.registry_["setup_args"]
    # The registry holds one form of the keys, as setup_anndata writes them.
    assert args["labels_key"] == "fine" and args["extra_labels_keys"] == ["coarse"]
    assert args["categorical_covariate_keys"] == ["donor"]
    assert model.labels_keys == ["fine", "coarse"] and model.covariate_keys == ["donor"]
    model.train(max_epochs=1, **FAST)
    table = model.predict_all_keys()
    assert list(table.columns) == ["fine", "coarse"] and len(table) == mdata.n_obs
    other = md.MuData({"rna": rna.copy()})
    for column in ("batch", "donor"):
        other.obs[column] = raw.obs[column].to_numpy()
    pd.testing.assert_frame_equal(model.predict_all_keys(other), table)


# -- interpretation ---------------------------------------------------------------------------
def test_interpretation_input_is_what_the_encoder_reads():
    for target_sum in (None, 1e4):
        module = _module(n_labels_per_key=[2], target_sum=target_sum)
        module.eval()
        tensors = _tensors()
        x = tensors[REGISTRY_KEYS.X_KEY]
        expected = torch.log1p(
            x if target_sum is None else x / x.sum(dim=1, keepdim=True) * target_sum
        )
        torch.testing.assert_close(module.interpretation_input(tensors), expected)
        torch.testing.assert_close(
            module.logits_from_interpretation_input(module.interpretation_input(tensors)),
            module.classify(tensors),
        )
    assert module.interpretable


def test_interpret_ranks_the_primary_heads_marker_genes():
    adata = make_counts_adata(cells_per=40)
    SCATLASVAE.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    model = SCATLASVAE(adata, **TINY)
    model.train(max_epochs=15, n_epochs_prediction=None, **FAST)
    ranking, per_cell = model.interpret(
        groupby="cell_type", target="T1", n_samples=16, max_cells=40, seed=0
    )
    assert per_cell.shape == (40, adata.n_vars)
    markers = set(adata.var_names[adata.var["marker_of"] == "T1"])
    top = set(ranking["gene"].head(10))
    assert len(top & markers) >= 3, f"top genes {sorted(top)} vs markers {sorted(markers)}"


def test_interpret_needs_label_heads():
    adata = make_counts_adata(cells_per=5)
    SCATLASVAE.setup_anndata(adata, batch_key="batch")
    model = SCATLASVAE(adata, **TINY)
    with pytest.raises(ValueError, match="without labels_key"):
        model.interpret(groupby="cell_type", target="T1")
