"""CELLULAR: its losses by hand, the module's objective, the plans, training, preprocessing."""

from __future__ import annotations

import itertools
import math
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from conftest import NOVEL_TYPE, UNKNOWN, make_counts_adata
from scvi import REGISTRY_KEYS

import celltyper
from celltyper.metrics import novelty_auroc
from celltyper.model import CELLULAR
from celltyper.nn import batch_mixing_loss, centroid_distance_loss, supervised_soft_nn_loss
from celltyper.train import (
    ClassifierHeadTrainingPlan,
    ContrastiveTrainingPlan,
    JointClassifierTrainingPlan,
    loss_terms,
    warmup_cosine_factor,
)

E = math.e


# -- losses on hand-built minibatches ----------------------------------------------------------
def test_supervised_soft_nn_loss_by_hand():
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # Cosines: s01 = 1, s02 = 0, s03 = -1, s12 = 0, s13 = -1, s23 = 0 (temperature 1).
    per_anchor = [
        -math.log(E / (E + 1 + 1 / E)),  # cell 0: positive 1, candidates 1, 2, 3
        -math.log(E / (E + 1 + 1 / E)),  # cell 1: same by symmetry
        -math.log(1 / 3),  # cell 2: positive 3, every similarity 0
        -math.log(1 / (2 / E + 1)),  # cell 3: positive 2; candidates at -1, -1, 0
    ]
    loss = supervised_soft_nn_loss(z, labels, temperature=1.0)
    assert loss.item() == pytest.approx(np.mean(per_anchor), rel=1e-5)

    # Class weights 1 and 3, normalised to mean 1 over the four anchors: 0.5, 0.5, 1.5, 1.5.
    weighted = supervised_soft_nn_loss(z, labels, 1.0, class_weights=torch.tensor([1.0, 3.0]))
    expected = np.mean(np.array([0.5, 0.5, 1.5, 1.5]) * per_anchor)
    assert float(weighted) == pytest.approx(expected, rel=1e-5)

    # The temperature divides the similarities: at T = 0.5, cell 2's ratio is still 1/3.
    half = supervised_soft_nn_loss(z[[0, 1, 2, 3]], labels, temperature=0.5)
    e2 = E**2
    expected_half = np.mean(
        [
            -math.log(e2 / (e2 + 1 + 1 / e2)),
            -math.log(e2 / (e2 + 1 + 1 / e2)),
            math.log(3),
            -math.log(1 / (2 / e2 + 1)),
        ]
    )
    assert float(half) == pytest.approx(expected_half, rel=1e-5)


def test_supervised_soft_nn_loss_skips_anchors_without_positive():
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1])
    # Cell 2 has no other cell of its type; cells 0 and 1: -log(e / (e + 1)).
    loss = supervised_soft_nn_loss(z, labels, 1.0)
    assert loss.item() == pytest.approx(-math.log(E / (E + 1)), rel=1e-5)
    # Nothing qualifies: zero, still differentiable.
    none = supervised_soft_nn_loss(z, torch.tensor([0, 1, 2]), 1.0)
    assert none.detach().item() == 0.0
    none.backward()


def test_batch_mixing_loss_by_hand():
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.3, 0.2], [-0.5, 1.0]])
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    batches = torch.tensor([0, 0, 1, 1, 0, 0])
    # Type 1 is in one batch only: skipped. Type 0, temperature 1, pi = 1/3 for everyone:
    # cell 0: r = e / (e + 1 + e) > 1/3 -> log(3e / (2e + 1)); cell 1 the same;
    # cell 2: r = 1 / 3 -> 0; cell 3: r = 1 / (2e + 1) < 1/3 -> 0 (hinge).
    expected = 2 * math.log(3 * E / (2 * E + 1)) / 4
    loss = batch_mixing_loss(z, labels, batches, temperature=1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)

    # Batch weights 1 and 3 -> anchors weighted 0.5, 0.5, 1.5, 1.5.
    weighted = batch_mixing_loss(z, labels, batches, 1.0, batch_weights=torch.tensor([1.0, 3.0]))
    assert float(weighted) == pytest.approx(0.5 * expected, rel=1e-5)

    # Perfectly mixed (all cells identical): every r equals pi, the loss is 0.
    same = batch_mixing_loss(torch.ones(4, 2), labels[:4], batches[:4], 1.0)
    assert float(same) == pytest.approx(0.0, abs=1e-6)
    # Only one batch per type: nothing qualifies.
    assert batch_mixing_loss(z, labels, torch.zeros(6, dtype=torch.long)).item() == 0.0


def test_centroid_distance_loss_by_hand():
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 3.0], [5.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 2])
    # Centroids (1, 0), (1, 3), (5, 0): distances 3, 4, 5 -> / 5 = 0.6, 0.8, 1.0.
    target = torch.ones(4, 4) - torch.eye(4)
    target[3, :3] = target[:3, 3] = 100.0  # type 3 is absent: must not enter the loss
    loss = centroid_distance_loss(z, labels, target)
    assert loss.item() == pytest.approx((0.4**2 + 0.2**2 + 0.0) / 3, rel=1e-5)
    loss.backward()
    assert torch.isfinite(z.grad).all()
    # Scale-free: a scaled embedding or target gives the same loss.
    scaled = centroid_distance_loss(z.detach() * 7, labels, target * 0.1)
    assert scaled.item() == pytest.approx(loss.item(), rel=1e-5)
    # One type only: zero.
    assert centroid_distance_loss(z, torch.zeros(4, dtype=torch.long), target).item() == 0.0


def test_warmup_cosine_factor():
    factors = [warmup_cosine_factor(e, 10, 4) for e in range(10)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[3:]))
    assert factors[-1] > 0


# -- the module's objective -------------------------------------------------------------------
_SMALL = {"n_hidden": (64, 32), "n_latent": 16, "classifier_hidden": 32}
_TRAIN = {"max_epochs": 15, "batch_size": 32, "enable_progress_bar": False}
QUIET = {"enable_progress_bar": False}


@pytest.fixture(scope="module")
def untrained():
    """A small CELLULAR and a minibatch of every cell, labelled with its true type."""
    adata = make_counts_adata(cells_per=15, n_genes=50)
    CELLULAR.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    model = CELLULAR(adata, **_SMALL)
    codes = {name: i for i, name in enumerate(model.cell_types)}
    # True types in both batches, so the batch-mixing term has something to mix; the novel
    # type stays unlabelled (code n_labels).
    labels = [codes.get(t, model.n_labels) for t in adata.obs["cell_type"].astype(str)]
    tensors = {
        REGISTRY_KEYS.X_KEY: torch.tensor(adata.X.toarray()),
        REGISTRY_KEYS.LABELS_KEY: torch.tensor(labels).view(-1, 1),
        REGISTRY_KEYS.BATCH_KEY: torch.tensor(np.array(adata.obs["batch"].cat.codes)).view(-1, 1),
    }
    return model.module, tensors


def _loss(module, tensors, **loss_kwargs):
    _, _, output = module(tensors, loss_kwargs=loss_kwargs)
    return output


def test_module_loss_is_the_weighted_sum_of_the_published_terms(untrained):
    module, tensors = untrained
    module.eval()  # no dropout, BatchNorm on its running statistics: deterministic
    weights = torch.tensor([1.0, 2.0, 0.5, 1.0])
    with torch.no_grad():
        output = _loss(module, tensors, class_weights=weights)
        z = module.embed(tensors)
    terms = loss_terms(output)
    assert set(terms) == {"target_loss", "batch_loss", "centroid_loss", "classification_loss"}
    torch.testing.assert_close(output.loss, sum(terms.values()))
    labels = tensors[REGISTRY_KEYS.LABELS_KEY].view(-1)
    labelled = labels < module.n_labels
    zl, yl = z[labelled], labels[labelled]
    batches = tensors[REGISTRY_KEYS.BATCH_KEY].view(-1)[labelled]
    expected = {
        "target_loss": 0.9 * supervised_soft_nn_loss(zl, yl, module.temperature),
        "batch_loss": 0.1 * batch_mixing_loss(zl, yl, batches, 0.5),
        "centroid_loss": centroid_distance_loss(zl, yl, module.pca_centroid_distances),
        "classification_loss": F.cross_entropy(module.classifier(z)[labelled], yl, weight=weights),
    }
    for name, value in expected.items():
        torch.testing.assert_close(terms[name], value, msg=name)
    assert float(terms["batch_loss"]) > 0
    assert float(output.extra_metrics["temperature"]) == pytest.approx(0.25)
    # Doubling the contrastive weight doubles the three contrastive terms only.
    with torch.no_grad():
        double = loss_terms(_loss(module, tensors, contrastive_weight=2.0, class_weights=weights))
    for name in ("target_loss", "batch_loss", "centroid_loss"):
        torch.testing.assert_close(double[name], 2 * terms[name])
    torch.testing.assert_close(double["classification_loss"], terms["classification_loss"])


def test_stage_weights_choose_what_runs(untrained):
    module, tensors = untrained
    module.train()
    calls = {"encoder": 0, "classifier": 0}
    hooks = [
        getattr(module, part).register_forward_hook(
            lambda *_, part=part: calls.__setitem__(part, calls[part] + 1)
        )
        for part in calls
    ]
    running = module.classifier[0].running_mean.clone()
    try:
        # Encoder stage: the classifier does not run (its BatchNorm statistics stay).
        encoder_only = _loss(module, tensors, classification_weight=0.0)
        assert set(loss_terms(encoder_only)) == {"target_loss", "batch_loss", "centroid_loss"}
        assert calls == {"encoder": 1, "classifier": 0}
        assert torch.equal(module.classifier[0].running_mean, running)
        # Joint objective (the defaults): one encoder pass serves both losses.
        joint = _loss(module, tensors)
        assert calls == {"encoder": 2, "classifier": 1}
        joint.loss.backward()
        for parameter in (module.encoder[1].weight, module.raw_temperature):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0
        head = _loss(module, tensors, contrastive_weight=0.0)
        assert set(loss_terms(head)) == {"classification_loss"}
        with pytest.raises(ValueError, match="both 0"):
            _loss(module, tensors, contrastive_weight=0.0, classification_weight=0.0)
    finally:
        for hook in hooks:
            hook.remove()
        module.zero_grad(set_to_none=True)
        module.eval()


def test_without_batches_the_target_term_takes_the_whole_weight(untrained):
    module, tensors = untrained
    module.eval()
    with torch.no_grad():
        with_batches = loss_terms(_loss(module, tensors, classification_weight=0.0))
        without = loss_terms(_loss(module, tensors, classification_weight=0.0, use_batches=False))
    torch.testing.assert_close(without["target_loss"], with_batches["target_loss"] / 0.9)
    assert float(without["batch_loss"]) == 0.0
    torch.testing.assert_close(without["centroid_loss"], with_batches["centroid_loss"])


# -- the plans ---------------------------------------------------------------------------------
def _step_output(plan, tensors):
    """What the plan's training step computes on ``tensors``."""
    return plan.forward(tensors, loss_kwargs={**plan.loss_kwargs, **plan.scheduled_loss_kwargs(0)})


def test_plans_train_their_own_parameters_on_their_own_terms(untrained):
    module, tensors = untrained
    encoder = {id(p) for p in module.encoder.parameters()}
    classifier = {id(p) for p in module.classifier.parameters()}
    temperature = {id(module.raw_temperature)}
    plans = {
        ContrastiveTrainingPlan: (encoder | temperature, {"target_loss", "centroid_loss"}),
        ClassifierHeadTrainingPlan: (classifier, {"classification_loss"}),
        JointClassifierTrainingPlan: (
            encoder | temperature | classifier,
            {"target_loss", "centroid_loss", "classification_loss"},
        ),
    }
    module.train()
    try:
        for plan_cls, (parameters, expected_terms) in plans.items():
            plan = plan_cls(module)
            assert {id(p) for p in plan.trainable_parameters()} == parameters, plan_cls
            _, _, output = _step_output(plan, tensors)
            assert expected_terms <= set(loss_terms(output)), plan_cls
            assert (plan.lr, plan.weight_decay, plan.optimizer_label) == (1e-3, 5e-5, "Adam")
        # The frozen head: the embedding carries no graph, so no gradient reaches the encoder.
        module.zero_grad(set_to_none=True)
        _, _, output = _step_output(ClassifierHeadTrainingPlan(module), tensors)
        output.loss.backward()
        assert all(p.grad is None for p in module.encoder.parameters())
        assert module.classifier[1].weight.grad is not None
    finally:
        module.zero_grad(set_to_none=True)
        module.eval()


def test_contrastive_plan_clamps_temperature_and_validates_on_its_total(untrained):
    module, tensors = untrained
    plan = ContrastiveTrainingPlan(module, use_batches=True)
    original = module.raw_temperature.detach().clone()
    try:
        with torch.no_grad():
            module.raw_temperature.fill_(5.0)
        plan.on_train_batch_end(None, tensors, 0)
        assert module.raw_temperature.item() == 1.0
    finally:
        with torch.no_grad():
            module.raw_temperature.copy_(original)
    module.eval()
    with torch.no_grad():
        output = plan.validation_loss_output(tensors)
        expected = _loss(module, tensors, classification_weight=0.0)
    torch.testing.assert_close(output.loss, expected.loss)
    # A minibatch with a single labelled cell has nothing to contrast: it is left out.
    one = {k: v[:1] for k, v in tensors.items()}
    assert plan.validation_loss_output(one) is None


class _StageRecorder(pl.Callback):
    """Records each stage's plan, epochs, loss keywords and learning rate per epoch."""

    def __init__(self):
        self.stages: list[dict] = []

    def on_train_start(self, trainer, pl_module):
        self.stages.append(
            {
                "cls": type(pl_module),
                "max_epochs": trainer.max_epochs,
                "loss_kwargs": dict(pl_module.loss_kwargs),
                "lr": [],
            }
        )

    def on_train_epoch_start(self, trainer, pl_module):
        self.stages[-1]["lr"].append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.fixture(scope="module")
def tiny_model():
    adata = make_counts_adata(cells_per=12, n_genes=40)
    CELLULAR.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    return CELLULAR(adata, **_SMALL), adata


def test_stages_epochs_schedule_and_keywords(tiny_model):
    model, adata = tiny_model
    recorder = _StageRecorder()
    model.train(
        max_epochs=6, classifier_epochs=2, early_stopping=False, callbacks=[recorder], **QUIET
    )
    encoder, head = recorder.stages
    assert (encoder["cls"], encoder["max_epochs"]) == (ContrastiveTrainingPlan, 6)
    assert (head["cls"], head["max_epochs"]) == (ClassifierHeadTrainingPlan, 2)
    # Warm-up over min(4, 6 // 2) = 3 epochs, then the cosine decay; the head keeps lr.
    expected = [1e-3 * warmup_cosine_factor(e, 6, 3) for e in range(6)]
    assert encoder["lr"] == pytest.approx(expected)
    assert head["lr"] == pytest.approx([1e-3, 1e-3])
    # Computed arguments: batches in use, inverse class frequencies of the training cells.
    assert encoder["loss_kwargs"] == {"use_batches": True}
    weights = head["loss_kwargs"]["class_weights"]
    labelled = adata.obs["train_label"] != UNKNOWN
    assert len(weights) == model.n_labels == adata.obs["train_label"][labelled].nunique()
    torch.testing.assert_close(weights, torch.ones(model.n_labels))  # balanced types
    assert model.contrastive_history_ is not model.history
    assert len(model.contrastive_history_["train_loss"]) == 6

    # classifier_epochs defaults to max_epochs; a loss weight of the joint stage reaches
    # it but never switches the classifier on in the encoder stage.
    model.train(
        max_epochs=1,
        classifier_training="joint",
        classification_weight=2.0,
        target_weight=0.5,
        callbacks=[recorder],
        **QUIET,
    )
    encoder, joint = recorder.stages[-2:]
    assert (encoder["max_epochs"], joint["max_epochs"]) == (1, 1)
    assert joint["cls"] is JointClassifierTrainingPlan
    assert encoder["loss_kwargs"] == {"use_batches": True, "target_weight": 0.5}
    assert joint["loss_kwargs"]["classification_weight"] == 2.0
    assert joint["loss_kwargs"]["target_weight"] == 0.5
    assert "classification_weight" not in model.history  # not pinned in the joint stage
    assert (model.contrastive_history_["classification_weight"].to_numpy() == 0).all()


def test_bad_training_options_raise(tiny_model):
    model, _ = tiny_model
    with pytest.raises(ValueError, match="classifier_training"):
        model.train(max_epochs=1, classifier_training="both")
    for computed in ("class_weights", "use_batches"):
        with pytest.raises(TypeError, match=computed):
            model.train(max_epochs=1, **{computed: None})
    with pytest.raises(ValueError, match="classifier_epochs"):
        model.train(max_epochs=1, classifier_epochs=0, **QUIET)


# -- behaviour on synthetic data ----------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_cellular():
    adata = make_counts_adata()
    CELLULAR.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    model = CELLULAR(adata, **_SMALL)
    model.train(**_TRAIN)
    return model, adata


def test_temperature_stays_in_range(trained_cellular):
    model, _ = trained_cellular
    assert 0.1 <= model.module.temperature.item() <= 1.0
    assert 0.1 <= model.module.raw_temperature.item() <= 1.0
    # It is learnt: it moved from its initial 0.25.
    assert model.module.raw_temperature.item() != pytest.approx(0.25)


def test_losses_fall_and_terms_are_logged(trained_cellular):
    model, _ = trained_cellular
    history = model.contrastive_history_
    for term in ("target_loss_train", "batch_loss_train", "centroid_loss_train"):
        assert term in history
    target = history["target_loss_train"].to_numpy(dtype=float).ravel()
    assert target[-1] < 0.5 * target[0]
    total = sum(
        history[f"{term}_loss_train"].to_numpy(dtype=float).ravel()
        for term in ("target", "batch", "centroid")
    )
    train_loss = history["train_loss"].to_numpy(dtype=float).ravel()
    np.testing.assert_allclose(total, train_loss, rtol=1e-5)
    assert "validation_loss" in history and "temperature_train" in history
    # The classifier stage has its own history.
    cross_entropy = model.history["classification_loss_train"].to_numpy(dtype=float).ravel()
    assert cross_entropy[-1] < 0.6 * cross_entropy[0]
    assert "accuracy_validation" in model.history


def test_withheld_type_is_more_novel(trained_cellular):
    model, adata = trained_cellular
    table = model.annotation_table()
    novel = (adata.obs["cell_type"] == NOVEL_TYPE).to_numpy()
    known_query = (adata.obs["train_label"] == UNKNOWN).to_numpy() & ~novel
    novelty = table["novelty"].to_numpy()
    scored = novel | known_query
    assert novelty_auroc(novelty[scored], novel[scored]) > 0.9
    # Known types of the other batch are annotated correctly.
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    accuracy = (table["prediction"].astype(str).to_numpy() == truth)[known_query].mean()
    assert accuracy > 0.9


def test_representations_one_row_per_type(trained_cellular):
    model, _ = trained_cellular
    reps = model.get_cell_type_representations()
    assert sorted(reps.index) == ["T0", "T1", "T2", "T3"]
    assert reps.shape == (4, _SMALL["n_latent"])


def test_pca_target_and_mean_total_buffers(trained_cellular):
    model, adata = trained_cellular
    distances = model.module.pca_centroid_distances.numpy()
    assert distances.shape == (4, 4)
    np.testing.assert_allclose(distances, distances.T, atol=1e-5)
    assert (distances[~np.eye(4, dtype=bool)] > 0).all()
    reference = (adata.obs["train_label"] != UNKNOWN).to_numpy()
    totals = np.asarray(adata.X[reference].sum(axis=1)).reshape(-1)
    assert model.module.mean_total.item() == pytest.approx(totals.mean(), rel=1e-5)


def test_query_fine_tuning_leaves_encoder_unchanged(trained_cellular):
    model, _ = trained_cellular
    query = make_counts_adata(seed=3)
    query = query[query.obs["batch"] == "b1"].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        query_model = CELLULAR.load_query_data(query, model)
    trainable = {n for n, p in query_model.module.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("classifier.") for n in trainable)
    with pytest.raises(ValueError, match="query model keeps"):
        query_model.train(max_epochs=1, classifier_training="joint")
    encoder = {k: v.clone() for k, v in query_model.module.encoder.state_dict().items()}
    buffers = {
        k: v.clone() for k, v in query_model.module.named_buffers() if "classifier" not in k
    }
    head = {k: v.clone() for k, v in query_model.module.classifier.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        query_model.train(max_epochs=2, batch_size=32, enable_progress_bar=False)
    for key, value in query_model.module.encoder.state_dict().items():
        assert torch.equal(value, encoder[key]), key
    for key, value in query_model.module.named_buffers():
        if key in buffers:
            assert torch.equal(value, buffers[key]), key
    after = query_model.module.classifier.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in head.items())
    # The frozen encoder maps the query as the reference model does.
    np.testing.assert_allclose(
        query_model.get_latent_representation(),
        model.get_latent_representation(query),
        atol=1e-5,
    )


def test_joint_stage_two_trains_encoder_and_classifier_together():
    adata = make_counts_adata()
    CELLULAR.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    models = {}
    for mode in ("frozen", "joint"):
        models[mode] = CELLULAR(adata, **_SMALL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models[mode].train(**_TRAIN, classifier_training=mode)
    frozen, joint = models["frozen"], models["joint"]
    # Same seed: stage 1 is the same for both; only the joint stage 2 moves the encoder.
    curve = "target_loss_train"
    np.testing.assert_allclose(
        frozen.contrastive_history_[curve].to_numpy(dtype=float),
        joint.contrastive_history_[curve].to_numpy(dtype=float),
    )
    frozen_encoder = frozen.module.encoder.state_dict()
    moved = [
        k
        for k, v in joint.module.encoder.state_dict().items()
        if v.is_floating_point() and not torch.equal(v, frozen_encoder[k])
    ]
    assert moved, "the joint stage left the encoder as stage 1 left it"
    terms = ("target_loss", "batch_loss", "centroid_loss", "classification_loss")
    curves = [joint.history[f"{term}_train"].to_numpy(dtype=float).ravel() for term in terms]
    assert all(np.isfinite(curve).all() for curve in curves)
    np.testing.assert_allclose(
        sum(curves), joint.history["train_loss"].to_numpy(dtype=float).ravel(), rtol=1e-5
    )
    assert np.mean(joint.predict() == adata.obs["cell_type"].to_numpy()) > 0.5


def test_trains_without_batch_key():
    adata = make_counts_adata(n_batches=1, cells_per=30)
    CELLULAR.setup_anndata(adata, labels_key="train_label")
    model = CELLULAR(adata, **_SMALL)
    model.train(max_epochs=2, batch_size=32, enable_progress_bar=False)
    assert (model.contrastive_history_["batch_loss_train"].to_numpy() == 0).all()
    assert len(model.predict()) == adata.n_obs


# -- preprocessing -----------------------------------------------------------------------------
def test_normalize_cellular_leaves_counts_unchanged():
    adata = make_counts_adata(novel_type=False)
    before = adata.X.copy()
    mean_total = celltyper.pp.normalize_cellular(adata)
    assert (adata.X != before).nnz == 0
    counts = before.toarray().astype(np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    assert mean_total == pytest.approx(totals.mean())
    expected = np.log1p(counts / totals * totals.mean())
    np.testing.assert_allclose(adata.layers["cellular"].toarray(), expected, rtol=1e-5)
    # A given mean_total (a reference's) is used as is.
    celltyper.pp.normalize_cellular(adata, key_added="other", mean_total=100.0)
    np.testing.assert_allclose(
        adata.layers["other"].toarray(), np.log1p(counts / totals * 100.0), rtol=1e-5
    )


def test_auto_preprocess_returns_filtered_copy_and_keeps_counts():
    adata = make_counts_adata(n_genes=120, novel_type=False)
    adata.X[:3] = 0  # three empty cells that QC must drop
    adata.X = sp.csr_matrix(adata.X)
    before = adata.copy()
    out = celltyper.pp.auto_preprocess(adata, n_top_genes=50, min_genes=10, min_cells=3)
    assert (adata.X != before.X).nnz == 0 and adata.shape == before.shape
    assert "cellular" not in adata.layers
    assert out.n_vars == 50 and out.n_obs == adata.n_obs - 3
    assert out.var["highly_variable"].all()
    # X still holds the counts of the kept cells and genes; normalised values are a layer.
    kept = before[out.obs_names, out.var_names].X
    assert (out.X != kept).nnz == 0
    assert out.layers["cellular"].shape == out.shape
    assert out.uns["cellular_mean_total"] > 0
