"""SCPRETRAIN: K-means, pseudo-label pretraining, fine-tuning, evaluation, classic classifiers."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import log_normalize, make_counts_adata
from scvi import REGISTRY_KEYS
from sklearn.metrics import adjusted_rand_score, average_precision_score, roc_auc_score

import celltyper
from celltyper.data import DATASET_KEY, PSEUDO_LABELS_KEY, n_clusters_for
from celltyper.metrics import evaluation_scores
from celltyper.model import SCPRETRAIN
from celltyper.module import PseudoLabelHeads, SCPRETRAINModule
from celltyper.nn import kmeans
from celltyper.train import FineTuningTrainingPlan, PseudoLabelTrainingPlan, loss_terms

QUIET = {"enable_progress_bar": False}
TINY = {"n_latent": 16, "classifier_hidden": 16}


class _StageRecorder(pl.Callback):
    """Records the plan class and loss keywords of every stage a ``train()`` runs."""

    def __init__(self):
        self.stages: list[tuple[type, dict]] = []

    def on_train_start(self, trainer, pl_module):
        self.stages.append((type(pl_module), dict(pl_module.loss_kwargs)))

    @property
    def plans(self) -> list[type]:
        return [plan for plan, _ in self.stages]


# -- K-means ----------------------------------------------------------------------------------
def _blobs(n_per=150, n_blobs=5, n_features=30, spread=0.5, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, 10.0, size=(n_blobs, n_features))
    truth = np.repeat(np.arange(n_blobs), n_per)
    x = centers[truth] + rng.normal(0.0, spread, size=(len(truth), n_features))
    return x.astype(np.float32), truth, centers


def test_kmeans_recovers_well_separated_blobs():
    x, truth, _ = _blobs()
    result = kmeans(x, 5, seed=0, batch_size=64)  # several blocks per pass
    assert adjusted_rand_score(truth, result.labels) == 1.0
    # Centres are the blob means (matched through the labels).
    for cluster in range(5):
        members = result.labels == cluster
        np.testing.assert_allclose(result.centers[cluster].numpy(), x[members].mean(0), atol=1e-4)
    # The inertia is the sum of squared distances to the assigned centres.
    expected = ((x - result.centers.numpy()[result.labels]) ** 2).sum()
    assert result.inertia == pytest.approx(float(expected), rel=1e-4)
    assert result.seconds > 0 and 1 <= result.n_iter <= 50


def test_kmeans_sparse_input_transform_and_seed():
    x, _, _ = _blobs(n_features=20, spread=0.3)
    counts = np.round(np.exp(x / 10.0 + 1.0)).astype(np.float32)
    counts[:, ::3] = 0.0  # sparse structure
    dense = kmeans(torch.log1p(torch.tensor(counts)), 5, seed=3)
    sparse = kmeans(sp.csr_matrix(counts), 5, transform=torch.log1p, seed=3, batch_size=100)
    uncached = kmeans(
        sp.csr_matrix(counts), 5, transform=torch.log1p, seed=3, max_cached_elements=0
    )
    np.testing.assert_array_equal(dense.labels, sparse.labels)
    np.testing.assert_array_equal(dense.labels, uncached.labels)
    again = kmeans(sp.csr_matrix(counts), 5, transform=torch.log1p, seed=3)
    np.testing.assert_array_equal(again.labels, sparse.labels)


def test_kmeans_handles_more_clusters_than_distinct_rows_and_bad_arguments():
    x = np.repeat(np.eye(3, dtype=np.float32), 4, axis=0)  # 3 distinct rows, 12 rows
    result = kmeans(x, 5, seed=0)
    assert result.labels.shape == (12,)
    assert result.inertia == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="n_clusters"):
        kmeans(x, 13)
    with pytest.raises(ValueError, match="n_clusters"):
        kmeans(x, 0)
    with pytest.raises(ValueError, match="max_iter"):
        kmeans(x, 2, max_iter=0)


def test_n_clusters_for_follows_the_paper_and_clamps():
    assert [n_clusters_for(10_000, r) for r in (100, 50, 200)] == [101, 201, 51]
    assert n_clusters_for(150, 200) == 2  # 150 // 200 + 1 = 1 -> at least 2
    assert n_clusters_for(1, 50) == 1  # never more clusters than cells
    with pytest.raises(ValueError, match="resolutions"):
        n_clusters_for(100, 0)


# -- pseudo-label heads -------------------------------------------------------------------------
def test_heads_loss_is_each_cells_summed_cross_entropy_over_its_datasets_heads():
    torch.manual_seed(0)
    heads = PseudoLabelHeads(4, [[3, 2], [5, 4]])
    assert len(heads) == 4 and heads.n_datasets == 2 and heads.n_resolutions == 2
    z = torch.randn(6, 4)
    datasets = torch.tensor([0, 1, 0, 1, 1, 0])
    labels = torch.tensor([[2, 1], [4, 3], [0, 0], [1, 2], [0, 1], [1, 1]])
    expected = 0.0
    for i in range(6):
        d = int(datasets[i])
        for r in range(2):
            logits = heads.head(d, r)(z[i : i + 1])
            expected += float(torch.nn.functional.cross_entropy(logits, labels[i, r : r + 1]))
    assert float(heads.loss(z, datasets, labels)) == pytest.approx(expected / 6, rel=1e-5)
    with pytest.raises(ValueError, match="same number"):
        PseudoLabelHeads(4, [[3, 2], [5]])


# -- the module's loss --------------------------------------------------------------------------
def _module_and_batch(n=8, n_labels=3):
    torch.manual_seed(0)
    module = SCPRETRAINModule(n_input=6, n_labels=n_labels, n_latent=4, classifier_hidden=5)
    x = torch.poisson(torch.full((n, 6), 3.0))
    labels = torch.tensor([0, 1, 2, 3, 3, 1, 0, 3])[:n].view(-1, 1)  # 3 = unlabelled
    return module, {REGISTRY_KEYS.X_KEY: x, REGISTRY_KEYS.LABELS_KEY: labels}


def test_fine_tuning_loss_is_labelled_cross_entropy_plus_weighted_entropy():
    module, tensors = _module_and_batch()
    _, _, output = module(tensors, loss_kwargs={"entropy_weight": 0.5})
    logits = module.classify(tensors)
    labels = tensors[REGISTRY_KEYS.LABELS_KEY].view(-1)
    known = labels < 3
    ce = torch.nn.functional.cross_entropy(logits[known], labels[known])
    p = torch.softmax(logits[~known], dim=1)
    entropy = -(p * p.log()).sum(dim=1).mean()
    terms = loss_terms(output)
    assert set(terms) == {"classification_loss", "entropy_loss"}
    torch.testing.assert_close(terms["classification_loss"], ce)
    torch.testing.assert_close(terms["entropy_loss"], 0.5 * entropy)
    torch.testing.assert_close(output.loss, ce + 0.5 * entropy)
    # By default (weight 0) only labelled cells count.
    _, _, plain = module(tensors)
    torch.testing.assert_close(plain.loss, ce)


def test_pretraining_loss_is_the_heads_summed_cross_entropy():
    module, tensors = _module_and_batch()
    heads = PseudoLabelHeads(4, [[2, 3], [2, 2]])
    tensors[DATASET_KEY] = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    tensors[PSEUDO_LABELS_KEY] = torch.tensor([[1, 2], [0, 1], [0, 0], [1, 1]] * 2)
    _, _, output = module(tensors, loss_kwargs={"pseudo_label_heads": heads})
    z = module.embed(tensors)
    expected = heads.loss(z, tensors[DATASET_KEY], tensors[PSEUDO_LABELS_KEY])
    torch.testing.assert_close(output.loss, expected)
    assert set(loss_terms(output)) == {"pseudo_label_loss"}
    accuracy = heads.accuracy(z, tensors[DATASET_KEY], tensors[PSEUDO_LABELS_KEY])
    for r, value in enumerate(accuracy):
        assert float(output.extra_metrics[f"pseudo_label_accuracy_{r}"]) == pytest.approx(value)
    # The loss reaches the encoder and the heads, never the classifier.
    output.loss.backward()
    assert module.encoder[0].weight.grad is not None
    assert all(p.grad is not None for p in heads.parameters())
    assert all(p.grad is None for p in module.classifier.parameters())


def test_plans_train_their_own_parameters():
    module, tensors = _module_and_batch()
    heads = PseudoLabelHeads(4, [[2]])
    pretraining = PseudoLabelTrainingPlan(module, pseudo_label_heads=heads, lr=0.5)
    assert pretraining.loss_kwargs["pseudo_label_heads"] is heads
    names = {id(p) for p in pretraining.trainable_parameters()}
    assert names == {id(p) for p in [*module.encoder.parameters(), *heads.parameters()]}
    # The classifier's BatchNorm statistics do not move during pretraining.
    pretraining.on_train_epoch_start()
    assert module.encoder.training and not module.classifier.training

    frozen = FineTuningTrainingPlan(module, freeze_encoder=True)
    assert {id(p) for p in frozen.trainable_parameters()} == {
        id(p) for p in module.classifier.parameters()
    }
    frozen.on_train_epoch_start()
    assert not module.encoder.training and module.classifier.training
    inference, _, output = frozen(tensors)
    assert not inference["z"].requires_grad and output.loss.requires_grad
    inference, _, _ = FineTuningTrainingPlan(module)(tensors)
    assert inference["z"].requires_grad


def test_validation_score_is_accuracy_ties_broken_by_the_loss():
    module, tensors = _module_and_batch()
    module.eval()
    output = FineTuningTrainingPlan(module).validation_loss_output(tensors)
    labels = tensors[REGISTRY_KEYS.LABELS_KEY].view(-1)
    known = labels < 3
    logits = module.classify(tensors)[known]
    accuracy = (logits.argmax(1) == labels[known]).float().mean()
    loss = torch.nn.functional.cross_entropy(logits, labels[known])
    torch.testing.assert_close(output.loss, loss)
    torch.testing.assert_close(output.extra_metrics["score"], accuracy - 1e-4 * loss)


# -- pretraining --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrained():
    """A model pretrained 15 epochs per phase on 3 batches (450 cells)."""
    adata = make_counts_adata(n_batches=3, cells_per=30, seed=2)
    SCPRETRAIN.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    model = SCPRETRAIN(adata, **TINY)
    model.pretrain(max_epochs=15, batch_size=64, lr=3e-3, **QUIET)
    return model, adata


def test_number_of_heads_is_datasets_times_resolutions(pretrained):
    model, adata = pretrained
    n_datasets = adata.obs["batch"].nunique()
    assert len(model.pretrain_heads) == n_datasets * 3
    table = model.pretrain_history_["kmeans"]
    assert len(table) == 2 * n_datasets * 3  # two phases
    # K = n // r + 1 per dataset of 150 cells: 2, 4, 2 (the last clamped up to 2).
    phase1 = table[table["phase"] == 1]
    assert set(phase1["n_cells"]) == {150}
    assert phase1.groupby("cells_per_cluster")["n_clusters"].first().to_dict() == {
        50: 4,
        100: 2,
        200: 2,
    }
    assert model.pretrain_heads.n_clusters == [[2, 4, 2]] * n_datasets
    labels = model.pseudo_labels_[2]
    assert labels.shape == (adata.n_obs, 3)
    assert (labels.max(axis=0) < np.array([2, 4, 2])).all()


def test_pretraining_lowers_the_pseudo_label_loss(pretrained):
    model, _ = pretrained
    loss = model.pretrain_history_["loss"]
    for phase in (1, 2):
        curves = loss.loc[loss["phase"] == phase]
        curve = curves["train_loss"].to_numpy()
        assert len(curve) == 15
        assert curve[-3:].mean() < 0.7 * curve[0], curve
        # The loss is its one term; the heads learn their pseudo-labels.
        np.testing.assert_allclose(curves["pseudo_label_loss_train"], curve, rtol=1e-6)
        accuracy = curves["pseudo_label_accuracy_1_train"].to_numpy()
        assert accuracy[-1] > accuracy[0]
    # Timing is recorded.
    history = model.pretrain_history_
    assert history["kmeans_seconds"] > 0 and history["train_seconds"] > 0
    assert history["total_seconds"] >= history["kmeans_seconds"] + history["train_seconds"]
    # Pretraining alone leaves the model untrained, and its classifier as it was built.
    assert model.is_pretrained_ and not model.is_trained_ and model.history is None


def test_pretraining_separates_the_cell_types(pretrained):
    """The pretrained representation (no label used) already tells the types apart."""
    model, adata = pretrained
    z = model.get_latent_representation()
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    clusters = kmeans(z, 5, seed=0).labels
    assert adjusted_rand_score(truth, clusters) > 0.5


def test_pseudo_labels_are_reproducible_with_a_seed():
    adata = make_counts_adata(cells_per=20, seed=4)
    SCPRETRAIN.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    runs = []
    for seed in (7, 7, 8):
        model = SCPRETRAIN(adata, seed=seed, **TINY)
        model.pretrain(max_epochs=2, resolutions=(10, 20, 40), **QUIET)
        runs.append(model)
    for phase in (1, 2):
        np.testing.assert_array_equal(runs[0].pseudo_labels_[phase], runs[1].pseudo_labels_[phase])
    np.testing.assert_array_equal(
        runs[0].get_latent_representation(), runs[1].get_latent_representation()
    )
    # Another seed changes the K-means draws and the network, hence phase-2 labels.
    assert not np.array_equal(runs[0].pseudo_labels_[2], runs[2].pseudo_labels_[2])


def test_pretrain_clusters_each_dataset_separately():
    adata = make_counts_adata(cells_per=20, seed=5)
    SCPRETRAIN.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    model = SCPRETRAIN(adata, **TINY)
    model.pretrain(max_epochs=1, n_phases=1, resolutions=(25,), **QUIET)
    labels = model.pseudo_labels_[1][:, 0]
    batch = adata.obs["batch"].to_numpy()
    # Phase 1 labels of one batch equal K-means of that batch alone on log1p(CP10k).
    members = np.flatnonzero(batch == "b1")
    x = np.asarray(adata.X[members].todense())
    x_log = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    k = n_clusters_for(len(members), 25)
    seed = int(np.random.SeedSequence([0, 1, 1, 0]).generate_state(1)[0])
    alone = kmeans(torch.tensor(x_log, dtype=torch.float32), k, seed=seed, max_iter=30, tol=1e-3)
    np.testing.assert_array_equal(labels[members], alone.labels)
    assert len(model.pretrain_heads) == 2


def test_pretrain_without_batch_key_uses_one_dataset():
    adata = make_counts_adata(cells_per=15)
    SCPRETRAIN.setup_anndata(adata, labels_key="train_label")
    model = SCPRETRAIN(adata, **TINY)
    model.pretrain(max_epochs=1, **QUIET)
    assert len(model.pretrain_heads) == 3
    assert model.pretrain_history_["kmeans"]["n_cells"].unique().tolist() == [adata.n_obs]


def test_pretrain_bad_arguments():
    adata = make_counts_adata(cells_per=10)
    SCPRETRAIN.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    model = SCPRETRAIN(adata, **TINY)
    with pytest.raises(ValueError, match="pretrain_epochs"):
        model.pretrain(max_epochs=0)
    with pytest.raises(ValueError, match="n_phases"):
        model.pretrain(n_phases=0)
    with pytest.raises(ValueError, match="resolutions"):
        model.pretrain(resolutions=(100, -1))
    with pytest.raises(ValueError, match="pretrain"):
        model.train(pretrain="sometimes")
    with pytest.raises(ValueError, match="early_stopping_monitor"):
        model.train(early_stopping_monitor="train_loss")
    with pytest.raises(TypeError, match="pretrain_kwargs"):
        model.train(pretrain_kwargs={"max_epochs": 1})
    with pytest.raises(TypeError, match="pseudo_label_heads"):
        model.train(pseudo_label_heads=None)  # built by the model, not a setting
    assert not model.is_pretrained_ and not model.is_trained_


# -- the stages of train() -----------------------------------------------------------------------
def test_train_auto_pretrains_once_and_false_trains_from_scratch():
    adata = make_counts_adata(cells_per=15)
    SCPRETRAIN.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    model = SCPRETRAIN(adata, **TINY)
    recorder = _StageRecorder()
    model.train(max_epochs=2, pretrain_epochs=1, callbacks=[recorder], **QUIET)
    pretraining, fine_tuning = PseudoLabelTrainingPlan, FineTuningTrainingPlan
    assert recorder.plans == [pretraining, pretraining, fine_tuning]
    assert model.is_pretrained_ and model.is_trained_
    # pretrain_epochs sets the phases, max_epochs the fine-tuning.
    assert set(model.pretrain_history_["loss"].groupby("phase").size()) == {1}
    assert len(model.history["train_loss"]) == 2
    assert "score_validation" in model.history and "accuracy_validation" in model.history
    # Heads of the last phase were given to its plan.
    assert recorder.stages[1][1]["pseudo_label_heads"] is model.pretrain_heads
    model.train(max_epochs=1, callbacks=[recorder], **QUIET)  # pretrained: fine-tunes only
    assert recorder.plans[3:] == [fine_tuning]
    model.train(max_epochs=1, pretrain=True, n_phases=1, callbacks=[recorder], **QUIET)
    assert recorder.plans[4:] == [pretraining, fine_tuning]
    scratch = SCPRETRAIN(adata, **TINY)
    scratch.train(max_epochs=1, pretrain=False, callbacks=[recorder], **QUIET)
    assert recorder.plans[6:] == [fine_tuning]
    assert not scratch.is_pretrained_ and scratch.is_trained_


def test_pretrain_runs_only_the_pretraining_and_keeps_the_fine_tuning_record():
    adata = make_counts_adata(cells_per=15)
    SCPRETRAIN.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    model = SCPRETRAIN(adata, **TINY)
    model.train(max_epochs=2, pretrain=False, **QUIET)
    history, validation = model.history, model.validation_indices
    classifier = {k: v.clone() for k, v in model.module.classifier.state_dict().items()}
    recorder = _StageRecorder()
    model.pretrain(max_epochs=2, batch_size=32, n_phases=1, lr=0.05, callbacks=[recorder], **QUIET)
    assert recorder.plans == [PseudoLabelTrainingPlan]
    assert model.is_pretrained_ and model.is_trained_
    assert model.history is history and model.validation_indices is validation
    assert len(model.pretrain_history_["loss"]) == 2
    # Every cell (150) in minibatches of 32: 5 steps per epoch (not 1 of 256).
    assert adata.n_obs == 150 and model.trainer.num_training_batches == 5
    # Pretraining never touches the classifier head, nor its BatchNorm statistics.
    for key, value in model.module.classifier.state_dict().items():
        assert torch.equal(value, classifier[key]), key


def test_frozen_encoder_fine_tune_leaves_encoder_untouched(pretrained):
    model, _ = pretrained
    encoder = {k: v.clone() for k, v in model.module.encoder.state_dict().items()}
    classifier = {k: v.clone() for k, v in model.module.classifier.state_dict().items()}
    model.module.encoder.zero_grad(set_to_none=True)
    model.train(max_epochs=3, freeze_encoder=True, batch_size=16, **QUIET)
    # The frozen encoder ran without gradient (none left for a later fit to pick up).
    assert all(p.grad is None for p in model.module.encoder.parameters())
    for key, value in model.module.encoder.state_dict().items():
        assert torch.equal(value, encoder[key]), f"encoder {key} changed"
    moved = [
        k
        for k, v in model.module.classifier.state_dict().items()
        if v.is_floating_point() and not torch.equal(v, classifier[k])
    ]
    assert moved, "the classifier head did not train"
    # Without freezing, the encoder moves too.
    model.train(max_epochs=1, batch_size=16, **QUIET)
    assert any(
        not torch.equal(v, encoder[k]) for k, v in model.module.encoder.state_dict().items()
    )


def test_only_labelled_cells_enter_the_fine_tuning_loss(pretrained):
    """Changing the expression of unlabelled cells does not change the fine-tuned model."""
    _, adata = pretrained
    results = []
    for scale in (1.0, 3.0):
        other = adata.copy()
        unlabelled = (other.obs["train_label"] == "Unknown").to_numpy()
        X = np.asarray(other.X.todense())
        X[unlabelled] = np.round(X[unlabelled] * scale) + 1.0
        other.X = sp.csr_matrix(X)
        SCPRETRAIN.setup_anndata(other, labels_key="train_label", batch_key="batch")
        # Batch centring's means are of every cell by design; the loss is the point here.
        fresh = SCPRETRAIN(other, batch_centering=False, **TINY)
        fresh.train(max_epochs=2, pretrain=False, batch_size=16, **QUIET)
        results.append(fresh.module.state_dict())
    for key, value in results[0].items():
        assert torch.equal(value, results[1][key]), key


def test_fine_tuning_stage_settings(pretrained):
    model, _ = pretrained
    options = {**SCPRETRAIN._train_options, "pretrain": False}
    (stage,) = model._training_stages(options)
    assert (stage.name, stage.max_epochs, stage.early_stopping_patience) == ("finetune", 200, 20)
    assert (stage.monitor, stage.monitor_mode) == ("score_validation", "max")
    assert stage.splitter_kwargs == {"include_unlabelled": False}  # labelled cells only
    (stage,) = model._training_stages({**options, "early_stopping_monitor": "validation_loss"})
    assert (stage.monitor, stage.monitor_mode) == ("validation_loss", "min")


def test_validation_score_logged_by_fine_tuning():
    adata = make_counts_adata(cells_per=15)
    SCPRETRAIN.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    fresh = SCPRETRAIN(adata, **TINY)
    fresh.train(max_epochs=3, pretrain=False, batch_size=16, **QUIET)
    history = fresh.history
    accuracy = history["accuracy_validation"].to_numpy(dtype=float).ravel()
    loss = history["validation_loss"].to_numpy(dtype=float).ravel()
    np.testing.assert_allclose(
        history["score_validation"].to_numpy(dtype=float).ravel(),
        accuracy - 1e-4 * loss,
        atol=1e-6,
    )


# -- evaluation and classic classifiers --------------------------------------------------------
def test_evaluation_scores_hand_computed():
    classes = ["A", "B", "C"]
    truth = np.array(["A", "A", "B", "C", "C", "X"])
    probs = np.array(
        [
            [0.7, 0.2, 0.1],
            [0.3, 0.6, 0.1],
            [0.2, 0.5, 0.3],
            [0.1, 0.1, 0.8],
            [0.5, 0.1, 0.4],
            [0.1, 0.1, 0.8],
        ]
    )
    scores = evaluation_scores(truth, probs, classes)
    # Predicted: A B B C A C -> 3 of 6 right (X is never right).
    assert scores["accuracy"] == pytest.approx(0.5)
    auroc = np.mean([roc_auc_score(truth == c, probs[:, j]) for j, c in enumerate(classes)])
    auprc = np.mean(
        [average_precision_score(truth == c, probs[:, j]) for j, c in enumerate(classes)]
    )
    assert scores["macro_auroc"] == pytest.approx(auroc)
    assert scores["macro_auprc"] == pytest.approx(auprc)
    # Class A: positives score 0.7, 0.3; negatives 0.2, 0.1, 0.5, 0.1 -> AUROC (4 + 3) / 8.
    assert roc_auc_score(truth == "A", probs[:, 0]) == pytest.approx(0.875)
    # Perfect probabilities give 1 everywhere and kappa 1.
    perfect = evaluation_scores(["A", "B", "B"], [[1, 0], [0, 1], [0.2, 0.8]], ["A", "B"])
    assert perfect["accuracy"] == perfect["macro_auroc"] == perfect["macro_auprc"] == 1.0
    assert perfect["cohen_kappa"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        evaluation_scores(["A"], [[0.5, 0.5, 0.0]], ["A", "B"])


def test_evaluate_on_model_and_new_data(pretrained):
    model, adata = pretrained
    model.train(max_epochs=20, batch_size=16, lr=1e-2, **QUIET)
    own = model.evaluate()
    assert own["n_cells"] == int((adata.obs["train_label"] != "Unknown").sum())
    assert own["accuracy"] > 0.9 and own["macro_auroc"] > 0.95
    other = adata.copy()
    before = other.obs.copy()
    scores = model.evaluate(other, labels_key="cell_type")
    pd.testing.assert_frame_equal(other.obs, before)
    # The novel type is never predicted right; the 4 known types of all batches are.
    known = (adata.obs["cell_type"] != "Novel").to_numpy()
    assert scores["n_cells"] == adata.n_obs
    assert 0.6 < scores["accuracy"] <= known.mean() + 1e-9
    with pytest.raises(KeyError, match="nope"):
        model.evaluate(other, labels_key="nope")
    with pytest.raises(ValueError, match="labels_key"):
        model.evaluate(other)


@pytest.mark.parametrize("kind", ["lr", "rf", "svm"])
def test_classic_classifier_on_the_representation(pretrained, kind):
    model, adata = pretrained
    clf = celltyper.tl.classic_classifier(model, adata, "cell_type", kind=kind, random_state=0)
    assert sorted(clf.classes_) == sorted(adata.obs["cell_type"].unique())
    other = adata.copy()
    predicted = clf.predict(other)
    accuracy = (predicted == adata.obs["cell_type"].astype(str).to_numpy()).mean()
    assert accuracy > 0.9
    probabilities = clf.predict_proba(other)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    # The estimator saw the model's latent representation.
    latent = model.get_latent_representation(other)
    np.testing.assert_array_equal(clf[-1].predict(latent), predicted)


def test_classic_classifier_registered_labels_and_errors(pretrained):
    model, adata = pretrained
    clf = celltyper.tl.classic_classifier(model)  # labelled cells of the model's data
    assert sorted(clf.classes_) == sorted(model.cell_types)
    with pytest.raises(ValueError, match="kind"):
        celltyper.tl.classic_classifier(model, adata, "cell_type", kind="knn")
    with pytest.raises(KeyError, match="nope"):
        celltyper.tl.classic_classifier(model, adata, "nope")
    with pytest.raises(TypeError, match="AnnData"):
        clf.predict(np.zeros((2, adata.n_vars)))


# -- transfer ------------------------------------------------------------------------------------
def test_transfer_pretrain_collection_then_fine_tune_query_labels():
    raw = make_counts_adata(n_batches=3, cells_per=30, seed=6)
    reference = raw[raw.obs["batch"] != "b2"].copy()
    SCPRETRAIN.setup_anndata(reference, labels_key="train_label", batch_key="batch")
    model = SCPRETRAIN(reference, **TINY)
    model.train(max_epochs=10, batch_size=16, pretrain_epochs=5, **QUIET)
    query = raw[raw.obs["batch"] == "b2"].copy()
    query.obs["train_label"] = query.obs["cell_type"].astype(str).replace("Novel", "Unknown")
    query = query[:, ::-1].copy()  # genes in another order
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        query_model = SCPRETRAIN.load_query_data(query, model)
    trainable = {n for n, p in query_model.module.named_parameters() if p.requires_grad}
    assert trainable == set(query_model.module.query_trainable_parameters())
    assert all(n.startswith("classifier.") for n in trainable)
    encoder = {k: v.clone() for k, v in query_model.module.encoder.state_dict().items()}
    with pytest.raises(ValueError, match="frozen"):
        query_model.pretrain(max_epochs=1)
    query_model.train(max_epochs=5, batch_size=16, **QUIET)  # "auto" does not pretrain
    for key, value in query_model.module.encoder.state_dict().items():
        assert torch.equal(value, encoder[key])
    known = (query.obs["cell_type"] != "Novel").to_numpy()
    predicted = query_model.predict()
    assert (predicted[known] == query.obs["cell_type"].astype(str).to_numpy()[known]).mean() > 0.8
    # A query without any labelled cell adapts its head by entropy minimisation.
    recorder = _StageRecorder()
    query_model.train(max_epochs=1, batch_size=16, callbacks=[recorder], **QUIET)
    assert recorder.stages[0][1] == {}  # labelled query cells: the loss's default, 0
    unlabelled = query.copy()
    unlabelled.obs["train_label"] = "Unknown"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapting = SCPRETRAIN.load_query_data(unlabelled, model)
        adapting.train(max_epochs=1, batch_size=16, callbacks=[recorder], **QUIET)
    assert recorder.stages[1][1] == {"entropy_weight": 1.0}


def test_lognormalised_input_is_used_as_is():
    adata = log_normalize(make_counts_adata(cells_per=10))
    SCPRETRAIN.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    model = SCPRETRAIN(adata, **TINY)
    assert model.input_kind_ == "normalized" and not model.module.normalize_counts
    model.train(max_epochs=1, pretrain_epochs=1, **QUIET)
    assert model.predict().shape == (adata.n_obs,)


def test_save_load_keeps_pretraining_record(pretrained, tmp_path):
    model, adata = pretrained
    if not model.is_trained_:
        model.train(max_epochs=1, batch_size=16, **QUIET)
    model.save(str(tmp_path / "m"), overwrite=True, save_anndata=False)
    loaded = SCPRETRAIN.load(str(tmp_path / "m"), adata=adata)
    assert loaded.is_pretrained_
    np.testing.assert_array_equal(loaded.pseudo_labels_[1], model.pseudo_labels_[1])
    pd.testing.assert_frame_equal(
        loaded.pretrain_history_["kmeans"], model.pretrain_history_["kmeans"]
    )
    assert loaded.pretrain_heads is None  # heads only serve pretraining
    np.testing.assert_allclose(
        loaded.get_latent_representation(), model.get_latent_representation(), atol=1e-6
    )


def test_interpret_ranks_marker_genes(pretrained):
    """The base interpret() reads the module's log-expression input."""
    model, adata = pretrained
    if not model.is_trained_:
        model.train(max_epochs=20, batch_size=16, lr=1e-2, **QUIET)
    assert model.module.interpretable
    ranking, per_cell = model.interpret(
        groupby="cell_type", target="T1", n_samples=8, max_cells=30, seed=0
    )
    assert per_cell.shape == (30, adata.n_vars)
    assert ranking["mean_attribution"].is_monotonic_decreasing
    markers = set(adata.var_names[adata.var["marker_of"] == "T1"])
    top = set(ranking["gene"].head(10))
    assert len(top & markers) >= 3, f"top genes {sorted(top)} vs markers {sorted(markers)}"
