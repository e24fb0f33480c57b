"""SCNYM: its building blocks, its training plan, configurations, novelty and interpretation."""

from __future__ import annotations

import inspect
import itertools
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import NOVEL_TYPE, assert_unchanged, log_normalize, make_counts_adata, snapshot
from scvi import REGISTRY_KEYS

from celltyper.model import SCNYM
from celltyper.model._scnym import SCNYM_CONFIGS
from celltyper.nn import (
    DomainAdversary,
    GradientReversal,
    drop_values_augmentation,
    grad_reverse,
    linear_ramp,
    log1p_normalize,
    mixup,
    sample_dominant_mixup_lambda,
    sharpen,
    sigmoid_ramp,
    soft_cross_entropy,
)
from celltyper.train import MixMatchTrainingPlan, loss_terms

QUIET = {"enable_progress_bar": False}


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(dim=1)


# -- functional building blocks --------------------------------------------------------------
def test_sharpen_hand_computed():
    p = torch.tensor([[0.6, 0.3, 0.1], [0.25, 0.25, 0.5]])
    out = sharpen(p, 0.5)
    # p ** 2 renormalised: [.36, .09, .01] / .46 and [.0625, .0625, .25] / .375
    expected = torch.tensor([[0.36 / 0.46, 0.09 / 0.46, 0.01 / 0.46], [1 / 6, 1 / 6, 2 / 3]])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(sharpen(p, 1.0), p)


def test_sharpen_lower_temperature_lowers_entropy():
    p = torch.softmax(torch.randn(20, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    entropies = [_entropy(sharpen(p, t)) for t in (1.0, 0.5, 0.25, 0.1)]
    for higher, lower in itertools.pairwise(entropies):
        assert (lower < higher).all()
    # The argmax never changes.
    assert torch.equal(sharpen(p, 0.1).argmax(1), p.argmax(1))
    with pytest.raises(ValueError, match="temperature"):
        sharpen(p, 0.0)


def test_sample_dominant_mixup_lambda():
    torch.manual_seed(0)
    lam = sample_dominant_mixup_lambda(2000, 0.3, "cpu")
    assert lam.shape == (2000,)
    assert (lam >= 0.5).all() and (lam <= 1.0).all()
    assert lam.std() > 0.05  # random, not a constant
    # Beta(0.3, 0.3) puts most mass near 0 and 1, so max(l, 1-l) is mostly near 1.
    assert (lam > 0.9).float().mean() > 0.3
    assert torch.equal(sample_dominant_mixup_lambda(5, 0.0, "cpu"), torch.ones(5))


def test_mixup_is_convex_combination():
    g = torch.Generator().manual_seed(0)
    x, x2 = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    y, y2 = torch.eye(4)[:, :2], torch.eye(4)[[1, 0, 3, 2]][:, :2]
    lam = torch.tensor([1.0, 0.5, 0.75, 0.9])
    xm, ym = mixup(x, y, x2, y2, lam)
    for i in range(4):
        torch.testing.assert_close(xm[i], lam[i] * x[i] + (1 - lam[i]) * x2[i])
        torch.testing.assert_close(ym[i], lam[i] * y[i] + (1 - lam[i]) * y2[i])
    torch.testing.assert_close(xm[0], x[0])


def test_soft_cross_entropy_matches_hard_labels():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 1])
    torch.testing.assert_close(
        soft_cross_entropy(logits, torch.eye(3)[labels]),
        torch.nn.functional.cross_entropy(logits, labels),
    )


def test_grad_reverse_flips_and_scales_gradient():
    x = torch.randn(5, 3, requires_grad=True)
    y = grad_reverse(x, 0.3)
    torch.testing.assert_close(y, x)  # identity forward
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, -0.3))

    x.grad = None
    (grad_reverse(x, 1.0) * 2.0).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, -2.0))

    layer = GradientReversal(0.5)
    x.grad = None
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, -0.5))


def test_domain_adversary_reverses_gradient_to_its_input():
    torch.manual_seed(0)
    adversary = DomainAdversary(4, 3, n_hidden=8)
    h = torch.randn(6, 4, requires_grad=True)
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    loss = torch.nn.functional.cross_entropy(adversary(h, reversal_weight=0.7), target)
    (g_reversed,) = torch.autograd.grad(loss, h)
    plain = torch.nn.functional.cross_entropy(adversary.layers(h), target)
    (g_plain,) = torch.autograd.grad(plain, h)
    torch.testing.assert_close(g_reversed, -0.7 * g_plain)


def test_linear_ramp_values():
    assert linear_ramp(0, 10) == 0.0
    assert linear_ramp(5, 10) == pytest.approx(0.5)
    assert linear_ramp(10, 10) == 1.0
    assert linear_ramp(25, 10) == 1.0
    assert linear_ramp(-3, 10) == 0.0
    assert linear_ramp(5, 10, max_value=2.0) == pytest.approx(1.0)
    assert linear_ramp(4, 10, burn_in=4) == 0.0
    assert linear_ramp(9, 10, burn_in=4) == pytest.approx(0.5)
    assert linear_ramp(3, 0, max_value=0.7) == 0.7


def test_sigmoid_ramp_values():
    assert sigmoid_ramp(0, 20) == pytest.approx(math.exp(-5.0))
    assert sigmoid_ramp(10, 20) == pytest.approx(math.exp(-1.25))
    assert sigmoid_ramp(20, 20) == pytest.approx(1.0)
    assert sigmoid_ramp(50, 20) == pytest.approx(1.0)
    assert sigmoid_ramp(10, 20, max_value=0.1) == pytest.approx(0.1 * math.exp(-1.25))
    values = [sigmoid_ramp(e, 20) for e in range(21)]
    assert values == sorted(values)
    assert sigmoid_ramp(5, 0, max_value=0.3) == 0.3


def _counts_tensor(n_cells=300, n_genes=400, seed=0):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(rng.gamma(0.5, 2.0, size=n_genes), size=(n_cells, n_genes))
    counts[:, 0] += 1  # no empty cell
    return torch.tensor(counts, dtype=torch.float32)


def test_log1p_normalize_is_log_cpm():
    counts = _counts_tensor(20, 30)
    expected = np.log1p(counts.numpy() / counts.numpy().sum(1, keepdims=True) * 1e6)
    np.testing.assert_allclose(log1p_normalize(counts).numpy(), expected, rtol=1e-5)
    # An all-zero cell stays zero instead of NaN.
    zero = log1p_normalize(torch.zeros(2, 5))
    assert torch.equal(zero, torch.zeros(2, 5))


def test_drop_values_augmentation():
    torch.manual_seed(0)
    counts = _counts_tensor()
    x_log = log1p_normalize(counts)
    out = drop_values_augmentation(x_log, rate=0.1)
    expression_in, expression_out = torch.expm1(x_log), torch.expm1(out)
    # Each cell is rescaled back to 1e6.
    torch.testing.assert_close(
        expression_out.sum(dim=1), torch.full((counts.shape[0],), 1e6), rtol=1e-4, atol=0
    )
    nonzero = expression_in > 0
    dropped = nonzero & (expression_out == 0)
    assert not (~nonzero & (expression_out > 0)).any(), "zeros must stay zero"
    assert 0.08 < dropped.sum() / nonzero.sum() < 0.12
    # Kept values keep their proportions within a cell.
    ratio = expression_out[nonzero & ~dropped] / expression_in[nonzero & ~dropped]
    row = torch.nonzero(nonzero & ~dropped)[:, 0]
    per_row = ratio[row == 0]
    torch.testing.assert_close(
        per_row, torch.full_like(per_row, per_row[0].item()), rtol=1e-3, atol=0
    )
    assert drop_values_augmentation(x_log, rate=0.0) is x_log
    # Profiles not at 1e6 (CPM over a gene subset) keep their own totals.
    x_half = torch.log1p(expression_in * 0.5)
    out_half = drop_values_augmentation(x_half, rate=0.1)
    torch.testing.assert_close(
        torch.expm1(out_half).sum(dim=1), torch.full((counts.shape[0],), 5e5), rtol=1e-4, atol=0
    )


# -- training plan ------------------------------------------------------------------------------
@pytest.fixture
def small_model():
    adata = make_counts_adata(cells_per=20, n_genes=50)
    SCNYM.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    return SCNYM(adata, n_hidden=16), adata


def test_mixmatch_weights_follow_ramps(small_model):
    model, _ = small_model
    plan = MixMatchTrainingPlan(
        model.module,
        unsup_max_weight=2.0,
        n_epochs_unsup_ramp=10,
        adversary_max_weight=0.5,
        n_epochs_adversary_ramp=4,
    )
    for epoch in (0, 2.5, 5, 10, 30):
        assert plan.unsup_weight(epoch) == pytest.approx(linear_ramp(epoch, 10, 2.0))
        assert plan.adversary_weight(epoch) == pytest.approx(sigmoid_ramp(epoch, 4, 0.5))
    assert plan.unsup_weight(5) == pytest.approx(1.0)
    assert plan.adversary_weight(2) == pytest.approx(0.5 * math.exp(-5 * 0.25))
    assert plan.adversary_weight(4) == pytest.approx(0.5)


def _minibatch(adata, model):
    codes = model.get_from_registry(adata, REGISTRY_KEYS.LABELS_KEY).reshape(-1, 1)
    batches = model.get_from_registry(adata, REGISTRY_KEYS.BATCH_KEY).reshape(-1, 1)
    return {
        REGISTRY_KEYS.X_KEY: torch.tensor(np.asarray(adata.X.todense())),
        REGISTRY_KEYS.LABELS_KEY: torch.tensor(np.asarray(codes)),
        REGISTRY_KEYS.BATCH_KEY: torch.tensor(np.asarray(batches)),
    }


def _loss(model, adata, **loss_kwargs):
    torch.manual_seed(0)
    _, _, output = model.module(_minibatch(adata, model), loss_kwargs=loss_kwargs)
    return output


def test_module_loss_is_the_weighted_sum_of_its_terms(small_model):
    model, adata = small_model
    output = _loss(model, adata, unsup_weight=2.0, adversary_weight=0.5)
    terms = loss_terms(output)
    assert set(terms) == {"supervised_loss", "mixmatch_loss", "adversary_loss"}
    torch.testing.assert_close(output.loss, sum(terms.values()))
    assert float(terms["mixmatch_loss"].detach()) > 0
    assert float(terms["adversary_loss"].detach()) > 0
    # The same draws with the weights halved halve the weighted terms.
    half = loss_terms(_loss(model, adata, unsup_weight=1.0, adversary_weight=0.25))
    torch.testing.assert_close(half["mixmatch_loss"], terms["mixmatch_loss"] / 2)
    torch.testing.assert_close(half["adversary_loss"], terms["adversary_loss"] / 2)
    torch.testing.assert_close(half["supervised_loss"], terms["supervised_loss"])
    output.loss.backward()
    assert model.module.classifier.weight.grad is not None
    assert model.module.adversary.parameters().__next__().grad is not None


def test_plan_passes_ramped_weights_to_the_loss(small_model):
    model, adata = small_model
    plan = MixMatchTrainingPlan(
        model.module,
        unsup_max_weight=2.0,
        n_epochs_unsup_ramp=10,
        adversary_max_weight=0.5,
        n_epochs_adversary_ramp=4,
    )
    plan.epoch_progress = lambda batch_idx: 5.0
    scheduled = plan.scheduled_loss_kwargs(0)
    assert scheduled == pytest.approx(
        {"unsup_weight": 1.0, "adversary_weight": sigmoid_ramp(5.0, 4, 0.5)}
    )
    # The plan's forward pass is the module's, with the scheduled weights.
    torch.manual_seed(0)
    _, _, output = plan.forward(_minibatch(adata, model), loss_kwargs=scheduled)
    expected = _loss(model, adata, **scheduled)
    assert output.loss.item() == pytest.approx(expected.loss.item(), rel=1e-5)


def test_pseudolabel_min_confidence_filters_unlabelled_cells(small_model):
    model, adata = small_model
    everyone = _loss(model, adata, pseudolabel_min_confidence=0.0).extra_metrics
    assert float(everyone["confident_fraction"]) == 1.0
    nobody = _loss(model, adata, pseudolabel_min_confidence=1.01).extra_metrics
    assert float(nobody["confident_fraction"]) == 0.0
    assert float(nobody["mixmatch_loss"]) == 0.0


def test_label_shift_weights_hand_computed():
    from celltyper.module._scnym import label_shift_weights

    labels = torch.tensor([0, 0, 0, 1])
    weights = label_shift_weights(labels, torch.tensor([0.25, 0.75, 0.0]), n_labels=3)
    # shares 3/4 and 1/4 -> 1/3 and 3; the mean is already 1.
    torch.testing.assert_close(weights, torch.tensor([1 / 3, 1 / 3, 1 / 3, 3.0]))
    # The weighted classes come in the target proportions.
    assert float(weights[3] / weights.sum()) == pytest.approx(0.75)


def test_adversary_label_shift_reweights_only_the_adversary(small_model):
    model, adata = small_model
    on = loss_terms(_loss(model, adata, adversary_weight=1.0, adversary_label_shift=True))
    off = loss_terms(_loss(model, adata, adversary_weight=1.0, adversary_label_shift=False))
    assert float(on["adversary_loss"]) != pytest.approx(float(off["adversary_loss"]), rel=1e-4)
    torch.testing.assert_close(on["supervised_loss"], off["supervised_loss"])
    torch.testing.assert_close(on["mixmatch_loss"], off["mixmatch_loss"])


class _LossKwargs(pl.Callback):
    """Records the loss keywords of the plan a fit runs with."""

    def on_train_start(self, trainer, pl_module):
        self.loss_kwargs = dict(pl_module.loss_kwargs)
        self.lr = pl_module.lr


def test_config_and_keyword_overrides_reach_the_loss(small_model):
    model, _ = small_model
    seen = _LossKwargs()
    model.train(max_epochs=1, config="new_identity_discovery", callbacks=[seen], **QUIET)
    assert seen.loss_kwargs["pseudolabel_min_confidence"] == 0.9
    assert seen.loss_kwargs["adversary_confident_only"] is True
    model.train(
        max_epochs=1,
        config="new_identity_discovery",
        pseudolabel_min_confidence=0.7,
        plan_kwargs={"lr": 0.5},
        callbacks=[seen],
        **QUIET,
    )
    assert seen.loss_kwargs["pseudolabel_min_confidence"] == 0.7
    assert seen.loss_kwargs["adversary_confident_only"] is True
    assert seen.lr == 0.5
    assert SCNYM_CONFIGS["new_identity_discovery"]["pseudolabel_min_confidence"] == 0.9


def test_scheduled_weights_cannot_be_set_by_hand(small_model):
    model, _ = small_model
    with pytest.raises(TypeError, match="unsup_weight"):
        model.train(max_epochs=1, unsup_weight=3.0, **QUIET)


def test_unknown_config_raises(small_model):
    model, _ = small_model
    with pytest.raises(ValueError, match="no_new_identity"):
        model.train(config="bogus")
    with pytest.raises(ValueError, match="max_epochs"):
        model.train(max_epochs=0, **QUIET)


# -- behaviour on synthetic data ----------------------------------------------------------------
@pytest.fixture(scope="module")
def discovery():
    """SCNYM trained 30 epochs (new_identity_discovery) on ~100 cells per type and batch."""
    adata = make_counts_adata(cells_per=100, seed=0)
    SCNYM.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    model = SCNYM(adata, n_hidden=64)
    model.train(max_epochs=30, config="new_identity_discovery", **QUIET)
    return model, adata


def test_training_loss_decreases(discovery):
    model, _ = discovery
    loss = model.history["train_loss"].to_numpy().ravel()
    assert len(loss) >= 5
    assert loss[-3:].mean() < 0.6 * loss[0]
    supervised = model.history["supervised_loss_train"].to_numpy().ravel()
    assert supervised[-1] < supervised[0]


def test_logged_weights_follow_ramps(discovery):
    model, _ = discovery
    config = {
        name: parameter.default
        for name, parameter in inspect.signature(MixMatchTrainingPlan).parameters.items()
    }
    unsup = model.history["unsup_weight"].to_numpy().ravel()
    adv = model.history["adversary_weight"].to_numpy().ravel()
    for epoch, (w_u, w_a) in enumerate(zip(unsup, adv, strict=True)):
        low = linear_ramp(epoch, config["n_epochs_unsup_ramp"], config["unsup_max_weight"])
        high = linear_ramp(epoch + 1, config["n_epochs_unsup_ramp"], config["unsup_max_weight"])
        assert low - 1e-6 <= w_u <= high + 1e-6
        ramp, top = config["n_epochs_adversary_ramp"], config["adversary_max_weight"]
        low, high = sigmoid_ramp(epoch, ramp, top), sigmoid_ramp(epoch + 1, ramp, top)
        assert low - 1e-6 <= w_a <= high + 1e-6


def test_novel_type_scores_higher_novelty(discovery):
    model, adata = discovery
    table = model.annotation_table()
    novel = (adata.obs["cell_type"] == NOVEL_TYPE).to_numpy()
    known = ~novel
    assert NOVEL_TYPE not in model.cell_types
    assert table["novelty"][novel].mean() > table["novelty"][known].mean()
    assert table["confidence"][novel].mean() < table["confidence"][known].mean()
    assert table["novel"][novel].mean() > 0.5
    assert table["novel"][known].mean() < 0.25
    # Known types, in both batches, are classified correctly.
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    accuracy = (table["prediction"].astype(str).to_numpy()[known] == truth[known]).mean()
    assert accuracy > 0.9


def test_interpret_ranks_marker_genes(discovery):
    model, adata = discovery
    n_target = int((adata.obs["cell_type"] == "T1").sum())
    ranking, per_cell = model.interpret(
        groupby="cell_type", target="T1", n_samples=16, max_cells=40, seed=0
    )
    assert list(ranking.columns) == ["gene", "mean_attribution", "mean_abs_attribution"]
    assert ranking["mean_attribution"].is_monotonic_decreasing
    assert sorted(ranking["gene"]) == sorted(adata.var_names)
    assert per_cell.shape == (min(40, n_target), adata.n_vars)
    assert list(per_cell.columns) == list(adata.var_names)
    assert set(per_cell.index) <= set(adata.obs_names[adata.obs["cell_type"] == "T1"])
    np.testing.assert_allclose(
        ranking.set_index("gene")["mean_attribution"].loc[per_cell.columns].to_numpy(),
        per_cell.mean(axis=0).to_numpy(),
        rtol=1e-5,
        atol=1e-7,
    )
    markers = set(adata.var_names[adata.var["marker_of"] == "T1"])
    # The random gamma profiles separate the types too, so the markers share the top with
    # other informative genes; they must still be clearly enriched. By chance, 1 of the top
    # 10 would be a marker and the markers' mean rank would be ~50 (sd ~9).
    top = set(ranking["gene"].head(10))
    assert len(top & markers) >= 3, f"top genes {sorted(top)} vs markers {sorted(markers)}"
    ranks = np.flatnonzero(ranking["gene"].isin(markers))
    assert ranks.mean() < 30, f"marker ranks {ranks.tolist()}"


def test_interpret_bad_arguments(discovery):
    model, _ = discovery
    with pytest.raises(KeyError, match="nope"):
        model.interpret(groupby="nope", target="T1")
    with pytest.raises(ValueError, match="T9"):
        model.interpret(groupby="cell_type", target="T9")
    with pytest.raises(ValueError, match="cell_type"):
        model.interpret(groupby="cell_type", target="T1", cell_type="Nope", n_samples=2)


# -- counts vs log-normalised input ------------------------------------------------------------
def test_counts_are_normalised_by_the_module():
    adata = make_counts_adata(cells_per=10, n_genes=40)
    SCNYM.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    model = SCNYM(adata, n_hidden=16, batch_centering=False)  # the normalisation alone
    assert model.input_kind_ == "counts"
    assert model.module.normalize_counts is True
    x = torch.tensor(np.asarray(adata.X.todense()))
    expected = np.log1p(x.numpy() / x.numpy().sum(1, keepdims=True) * 1e6)
    out = model.module.log_expression({REGISTRY_KEYS.X_KEY: x})
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5)
    # The user's counts are not touched.
    assert float(adata.X.max()) == float(np.round(adata.X.max()))


def test_lognormalised_input_is_used_as_is_and_kinds_cannot_be_mixed():
    counts = make_counts_adata(cells_per=10, n_genes=40)
    lognorm = log_normalize(counts)
    SCNYM.setup_anndata(lognorm, labels_key="train_label", batch_key="batch")
    model = SCNYM(lognorm, n_hidden=16, batch_centering=False)  # the input as it is
    assert model.input_kind_ == "normalized"
    assert model.module.normalize_counts is False
    x = torch.tensor(np.asarray(lognorm.X))
    assert torch.equal(model.module.log_expression({REGISTRY_KEYS.X_KEY: x}), x)
    model.train(max_epochs=1, **QUIET)
    assert len(model.predict(log_normalize(counts))) == counts.n_obs
    before = snapshot(counts)
    with pytest.raises(ValueError, match="log-normalised"):
        model.predict(counts)
    assert_unchanged(counts, before)


def test_domain_shift_augmentation_moves_labelled_cells_towards_the_query():
    from celltyper.module._scnym import shift_towards_query

    torch.manual_seed(0)
    x_l = torch.zeros(200, 5)
    x_u = torch.full((50, 5), 2.0)
    x_u[:, 0] = 0.0  # a gene the query does not express: no shift below zero
    shifted = shift_towards_query(x_l, x_u, 1.0)
    assert torch.all(shifted >= 0)
    assert torch.all(shifted[:, 0] == 0)
    # Every cell moves by u * shift with u ~ U(0, 1): mean ~ 1, bounded by the full shift.
    assert 0.8 < float(shifted[:, 1:].mean()) < 1.2
    assert float(shifted.max()) <= 2.0
    assert torch.equal(shift_towards_query(x_l, x_u, 0.0), x_l)
