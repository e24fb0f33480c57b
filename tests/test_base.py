"""Unit tests of the shared base: gene alignment, input checks, splitting, callbacks, seeding."""

# The legacy global numpy RNG is what `seeded` must save and restore, so it is used on purpose.
# ruff: noqa: NPY002

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import UNKNOWN, make_counts_adata
from torch import nn

from celltyper._utils import gene_names
from celltyper.data import stratified_split
from celltyper.model.base import (
    GeneOverlap,
    align_genes,
    check_labels,
    check_matrix_values,
    gene_identifier_type,
    seeded,
)
from celltyper.train import RestoreBestWeights

GENES = pd.Index(["a", "b", "c", "d"])
MATRIX = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], dtype=np.float32)


# -- align_genes --------------------------------------------------------------------------------
@pytest.mark.parametrize("to_matrix", [np.asarray, sp.csr_matrix], ids=["dense", "sparse"])
def test_align_genes_reorders(to_matrix):
    reference = pd.Index(["d", "b", "a", "c"])
    out, overlap = align_genes(to_matrix(MATRIX), GENES, reference)
    dense = out.toarray() if sp.issparse(out) else out
    np.testing.assert_array_equal(dense, MATRIX[:, [3, 1, 0, 2]])
    assert sp.issparse(out) == (to_matrix is sp.csr_matrix)
    assert dense.dtype == np.float32
    assert overlap == GeneOverlap(4, 4, 4)
    assert overlap.n_missing == 0 and overlap.fraction == 1.0


@pytest.mark.parametrize("to_matrix", [np.asarray, sp.csr_matrix], ids=["dense", "sparse"])
def test_align_genes_zero_fills_missing_and_drops_extra(to_matrix):
    reference = pd.Index(["c", "x", "a", "b", "y"])  # x, y missing; d extra
    with pytest.warns(UserWarning, match="2 of the model's 5 genes are missing"):
        out, overlap = align_genes(to_matrix(MATRIX), GENES, reference, min_overlap=0.5)
    dense = out.toarray() if sp.issparse(out) else out
    expected = np.zeros((2, 5), dtype=np.float32)
    expected[:, [0, 2, 3]] = MATRIX[:, [2, 0, 1]]
    np.testing.assert_array_equal(dense, expected)
    assert (overlap.n_reference, overlap.n_query, overlap.n_shared) == (5, 4, 3)
    assert overlap.n_missing == 2 and overlap.n_extra == 1
    assert overlap.fraction == pytest.approx(0.6)


def test_align_genes_overlap_below_minimum_raises():
    reference = pd.Index(["a", "x", "y", "z"])  # 25 % present
    with pytest.raises(ValueError, match="min_gene_overlap") as info:
        align_genes(MATRIX, GENES, reference, min_overlap=0.5)
    assert "1 of the model's 4 genes" in str(info.value)
    # The same overlap passes a lower bar.
    with pytest.warns(UserWarning, match="3 of the model's 4"):
        align_genes(MATRIX, GENES, reference, min_overlap=0.25)


def test_align_genes_duplicates_raise():
    with pytest.raises(ValueError, match="duplicated"):
        align_genes(MATRIX, pd.Index(["a", "b", "a", "d"]), GENES[::-1])


def test_align_genes_ensembl_vs_symbols_raises():
    ensembl = pd.Index([f"ENSG{i:011d}" for i in range(4)])
    with pytest.raises(ValueError, match="Ensembl"):
        align_genes(MATRIX, ensembl, GENES)
    with pytest.raises(ValueError, match="Ensembl"):
        align_genes(MATRIX, GENES, ensembl)


def test_ensembl_vs_symbols_error_names_the_fix():
    ensembl = pd.Index([f"ENSG{i:011d}" for i in range(4)])
    var = pd.DataFrame({"kind": "Gene Expression", "gene_symbols": list(GENES)}, index=ensembl)
    with pytest.raises(ValueError, match=r"var\['gene_symbols'\] holds gene symbols: pass "):
        align_genes(MATRIX, ensembl, GENES, var=var)
    # Without a suitable column, the message lists the columns there are.
    with pytest.raises(ValueError, match=r"Pass gene_column='<column>'.*\['kind'\]"):
        align_genes(MATRIX, ensembl, GENES, var=var[["kind"]])


def test_gene_names_from_a_column_never_change_the_table():
    var = pd.DataFrame({"symbol": ["A", "B", "A", None]}, index=["e1", "e2", "e3", "e4"])
    before = var.copy()
    assert list(gene_names(var.index, var, None)) == ["e1", "e2", "e3", "e4"]
    with pytest.warns(UserWarning) as caught:
        names = gene_names(var.index, var, "symbol")
    messages = " ".join(str(w.message) for w in caught)
    assert "1 genes of the query have no name" in messages and "repeats 1 gene" in messages
    assert names[:3].tolist() == ["A", "B", "A-1"] and names.is_unique
    pd.testing.assert_frame_equal(var, before)
    with pytest.raises(KeyError, match=r"gene_column='gene_ids' is not a column.*\['symbol'\]"):
        gene_names(var.index, var, "gene_ids")


def test_align_genes_identity_returns_same_object():
    for matrix in (MATRIX, sp.csr_matrix(MATRIX)):
        out, overlap = align_genes(matrix, GENES, pd.Index(list(GENES)))
        assert out is matrix
        assert overlap.fraction == 1.0


def test_gene_identifier_type():
    assert gene_identifier_type(pd.Index(["ENSG00000141510", "ENSG00000012048.21"])) == "ensembl"
    assert gene_identifier_type(pd.Index(["ENSMUSG00000059552"])) == "ensembl"
    assert gene_identifier_type(pd.Index(["TP53", "BRCA1", "CD3E"])) == "symbol"
    assert gene_identifier_type(pd.Index([])) == "symbol"


# -- check_matrix_values -----------------------------------------------------------------------
def test_check_matrix_values_counts_vs_normalized():
    counts = np.array([[0, 3, 1], [2, 0, 7]])
    assert check_matrix_values(counts) == "counts"
    assert check_matrix_values(counts.astype(np.float32)) == "counts"
    assert check_matrix_values(sp.csr_matrix(counts, dtype=np.float32)) == "counts"
    assert check_matrix_values(np.zeros((0, 3))) == "counts"
    lognorm = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    assert check_matrix_values(lognorm) == "normalized"
    assert check_matrix_values(sp.csr_matrix(lognorm)) == "normalized"


@pytest.mark.parametrize(
    ("value", "match"), [(np.nan, "NaN"), (np.inf, "infinite"), (-1.0, "negative")]
)
@pytest.mark.parametrize("to_matrix", [np.asarray, sp.csr_matrix], ids=["dense", "sparse"])
def test_check_matrix_values_rejects(value, match, to_matrix):
    matrix = np.array([[1.0, 2.0], [3.0, 4.0]])
    matrix[1, 0] = value
    with pytest.raises(ValueError, match=match) as info:
        check_matrix_values(to_matrix(matrix), "my.X")
    assert "my.X" in str(info.value)


def test_check_matrix_values_rejects_non_numeric():
    with pytest.raises(ValueError, match="non-numeric"):
        check_matrix_values(np.array([["a", "b"]], dtype=object))


# -- check_labels -------------------------------------------------------------------------------
def test_check_labels():
    obs = pd.DataFrame({"y": ["B", "A", "Unknown", "A"]})
    assert check_labels(obs, "y", "Unknown") == ["A", "B"]
    with pytest.raises(ValueError, match="at least two"):
        check_labels(pd.DataFrame({"y": ["A", "Unknown", "A"]}), "y", "Unknown")
    with pytest.raises(ValueError, match="1 missing"):
        check_labels(pd.DataFrame({"y": ["A", None, "B"]}), "y", "Unknown")


# -- stratified_split ------------------------------------------------------------------------
def test_stratified_split_every_class_in_train_and_sizes():
    labels = np.array([0] * 50 + [1] * 20 + [2] * 1 + [3] * 3)
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(len(labels))]
    train, val = stratified_split(labels, 0.2, seed=0)
    assert np.intersect1d(train, val).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    assert (np.diff(train) > 0).all() and (np.diff(val) > 0).all()
    assert set(labels[train]) == {0, 1, 2, 3}
    counts = pd.Series(labels[val]).value_counts().to_dict()
    assert counts.get(0) == 10 and counts.get(1) == 4
    assert counts.get(2, 0) == 0  # a single cell stays in training
    assert counts.get(3, 0) == 1


def test_stratified_split_seeding_and_bounds():
    labels = np.repeat([0, 1, 2], 30)
    a, b = stratified_split(labels, 0.3, seed=1), stratified_split(labels, 0.3, seed=1)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], stratified_split(labels, 0.3, seed=2)[1])
    train, val = stratified_split(labels, 0.0)
    assert len(val) == 0 and len(train) == len(labels)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="validation_size"):
            stratified_split(labels, bad)


# -- RestoreBestWeights ----------------------------------------------------------------------
def _fake_trainer(epoch, score, monitor="validation_loss", sanity=False):
    metrics = {} if score is None else {monitor: torch.tensor(score)}
    return SimpleNamespace(sanity_checking=sanity, callback_metrics=metrics, current_epoch=epoch)


def _set_weight(pl_module, value):
    with torch.no_grad():
        pl_module.module.weight.fill_(value)  # in place: the stored copy must not follow


def _splitter(ratio, n_unlabelled_per_batch=40, seed=0):
    from scvi import REGISTRY_KEYS

    from celltyper.data import LabelledUnlabelledSplitter
    from celltyper.model import SCNYM

    adata = make_counts_adata(cells_per=n_unlabelled_per_batch)
    SCNYM.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    manager = SCNYM(adata, n_hidden=8).adata_manager
    splitter = LabelledUnlabelledSplitter(
        manager, n_labels=4, batch_size=16, seed=seed, unlabelled_ratio=ratio
    )
    return splitter, REGISTRY_KEYS.LABELS_KEY


def test_labelled_epoch_keeps_its_length_whatever_the_unlabelled_cells():
    lengths = []
    for per_batch in (20, 80):  # four times as many unlabelled cells
        splitter, labels_key = _splitter(0.5, per_batch)
        loader = splitter.train_dataloader()
        steps = list(loader)
        n_labelled = len(splitter.labelled_sampling_idx)
        assert len(loader) == len(steps) == -(-n_labelled // 16)
        for labelled, unlabelled in steps:
            assert (labelled[labels_key] < 4).all() and (unlabelled[labels_key] >= 4).all()
            assert len(unlabelled[labels_key]) == 8  # ratio 0.5 of 16
        lengths.append(len(loader))
    assert lengths[0] == -(-int(0.9 * 4 * 20) // 16)  # the labelled cells set the length
    # Without a ratio an epoch runs over the larger (unlabelled) set instead.
    splitter, _ = _splitter(None, 80)
    assert len(splitter.train_dataloader()) > lengths[1]


@pytest.mark.parametrize("ratio", [1.0, None])
def test_balanced_epochs_read_as_many_cells_as_are_labelled(ratio):
    from scvi import REGISTRY_KEYS

    from celltyper.data import LabelledUnlabelledSplitter
    from celltyper.model import SCNYM

    adata = make_counts_adata(cells_per=20)
    # Imbalanced: T0 keeps its labelled cells, T1-T3 one in five, so balancing triples
    # the labelled set; no unlabelled cell is left for the pass over the larger set.
    labels = adata.obs["train_label"].astype(str).to_numpy()
    thinned = np.isin(labels, ["T1", "T2", "T3"]) & (np.arange(adata.n_obs) % 5 != 0)
    adata.obs["train_label"] = np.where(thinned, UNKNOWN, labels)
    if ratio is None:
        adata = adata[adata.obs["train_label"] != UNKNOWN].copy()
    SCNYM.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    manager = SCNYM(adata, n_hidden=8).adata_manager
    splitter = LabelledUnlabelledSplitter(
        manager, n_labels=4, batch_size=16, balance_classes=True, unlabelled_ratio=ratio
    )
    n_labelled = len(splitter.labelled_train_idx)
    assert len(splitter.labelled_sampling_idx) > 2 * n_labelled
    loader = splitter.train_dataloader()
    assert len(loader) == -(-n_labelled // 16)
    torch.manual_seed(0)
    epochs = []
    for _ in range(2):
        steps = list(loader)
        assert len(steps) == len(loader)
        epochs.append(torch.cat([step[0][REGISTRY_KEYS.LABELS_KEY] for step in steps]))
    for drawn in epochs:
        counts = np.bincount(drawn.long().ravel().numpy(), minlength=4)
        # Balanced: T0 is two thirds of the labelled cells, about a quarter drawn.
        assert counts.min() > 0 and counts[0] / counts.sum() < 0.4, counts
    assert not torch.equal(epochs[0], epochs[1])  # a new part of the resample each time


def test_labelled_epoch_draws_every_unlabelled_cell_in_turn():
    splitter, _ = _splitter(1.0, 20)
    loader = splitter.train_dataloader()
    seen = []
    torch.manual_seed(0)
    for _ in range(6):
        for _, unlabelled in loader:
            seen.append(unlabelled["X"].sum(dim=1))
    n_drawn = sum(len(x) for x in seen)
    n_unlabelled = len(splitter.unlabelled_idx)
    assert n_drawn > n_unlabelled
    # The first full pass over the unlabelled cells holds each of them exactly once.
    first_pass = torch.cat(seen)[:n_unlabelled]
    counts = splitter.adata_manager.get_from_registry("X")[splitter.unlabelled_idx]
    expected = np.sort(np.asarray(counts.sum(axis=1)).ravel())
    np.testing.assert_allclose(np.sort(first_pass.numpy()), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="unlabelled_ratio"):
        _splitter(0.0)


def test_the_smaller_set_starts_a_new_shuffled_pass_when_it_runs_out():
    # The smaller set repeats within an epoch, each repeat a new pass in a new order (not
    # a replay of minibatches kept from the first pass).
    from celltyper.data import CyclingConcatDataLoader

    splitter, _ = _splitter(None, 80)
    small = splitter.labelled_sampling_idx[:32]
    loader = CyclingConcatDataLoader(
        splitter.adata_manager,
        [splitter.unlabelled_idx, small],
        shuffle=True,
        batch_size=16,
        drop_last=[False, False],
    )
    torch.manual_seed(0)
    repeated = torch.cat([b["X"].sum(dim=1) for _, b in loader])
    assert len(repeated) >= 4 * len(small)
    counts = splitter.adata_manager.get_from_registry("X")[small]
    expected = np.sort(np.asarray(counts.sum(axis=1)).ravel())
    passes = repeated[: 4 * len(small)].view(4, len(small))
    for one_pass in passes:  # each pass holds every cell of the set once
        np.testing.assert_allclose(np.sort(one_pass.numpy()), expected, rtol=1e-6)
    assert len({tuple(p.tolist()) for p in passes}) > 1


def test_a_small_set_keeps_its_only_minibatch_when_another_drops_its_tail():
    from celltyper.data import CyclingConcatDataLoader

    splitter, _ = _splitter(None, 80)
    manager = splitter.adata_manager
    large, small = np.arange(33), np.arange(40, 45)  # 33 = 2 x 16 + 1: a one-cell tail
    loader = CyclingConcatDataLoader(
        manager, [large, small], shuffle=True, batch_size=16, drop_last=[True, False]
    )
    steps = list(loader)
    assert len(steps) == 2
    assert all(len(a["X"]) == 16 and len(b["X"]) == 5 for a, b in steps)
    with pytest.raises(ValueError, match=r"Set 1 of indices_list \(5 cells\).*drop_last"):
        CyclingConcatDataLoader(
            manager, [large, small], shuffle=True, batch_size=16, drop_last=[True, True]
        )


def test_restore_best_weights_min_mode():
    pl_module = SimpleNamespace(module=nn.Linear(3, 2))
    callback = RestoreBestWeights("validation_loss", "min")
    for epoch, (weight, loss) in enumerate([(0.0, 3.0), (1.0, 1.0), (2.0, 2.0), (3.0, 1.5)]):
        _set_weight(pl_module, weight)
        callback.on_validation_epoch_end(_fake_trainer(epoch, loss), pl_module)
    # Sanity checks and epochs without the metric are ignored.
    _set_weight(pl_module, 9.0)
    callback.on_validation_epoch_end(_fake_trainer(4, 0.1, sanity=True), pl_module)
    callback.on_validation_epoch_end(_fake_trainer(5, None), pl_module)
    assert callback.best_epoch == 1 and callback.best_score == 1.0
    callback.on_train_end(_fake_trainer(5, None), pl_module)
    assert torch.equal(pl_module.module.weight, torch.full((2, 3), 1.0))


def test_restore_best_weights_max_mode_and_validation():
    pl_module = SimpleNamespace(module=nn.Linear(2, 2))
    callback = RestoreBestWeights("validation_accuracy", "max")
    for epoch, (weight, acc) in enumerate([(0.0, 0.5), (1.0, 0.9), (2.0, 0.7)]):
        _set_weight(pl_module, weight)
        callback.on_validation_epoch_end(
            _fake_trainer(epoch, acc, monitor="validation_accuracy"), pl_module
        )
    callback.on_train_end(None, pl_module)
    assert torch.equal(pl_module.module.weight, torch.full((2, 2), 1.0))
    with pytest.raises(ValueError, match="mode"):
        RestoreBestWeights(mode="best")


def test_restore_best_weights_without_validation_keeps_weights():
    pl_module = SimpleNamespace(module=nn.Linear(2, 2))
    _set_weight(pl_module, 4.0)
    RestoreBestWeights().on_train_end(None, pl_module)
    assert torch.equal(pl_module.module.weight, torch.full((2, 2), 4.0))


def test_restore_best_weights_in_a_lightning_fit():
    """In a real fit the callback sees the current epoch's metric (not the previous one)."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    losses = [3.0, 1.0, 2.0, 2.5]

    class Plan(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.module = nn.Linear(1, 1, bias=False)

        def training_step(self, batch, batch_idx):
            # Weights during epoch e's validation: 10 + e.
            with torch.no_grad():
                self.module.weight.fill_(10.0 + self.current_epoch)
            return (self.module(batch[0]) ** 2).mean() * 0.0

        def validation_step(self, batch, batch_idx):
            self.log("validation_loss", losses[self.current_epoch], on_epoch=True)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    loader = DataLoader(TensorDataset(torch.ones(4, 1)), batch_size=4)
    plan, callback = Plan(), RestoreBestWeights()
    trainer = pl.Trainer(
        max_epochs=len(losses),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    trainer.fit(plan, loader, loader)
    assert callback.best_epoch == 1 and callback.best_score == 1.0
    assert plan.module.weight.item() == 11.0


# -- seeded ---------------------------------------------------------------------------------
def test_seeded_is_reproducible_and_restores_caller_rng():
    def draws():
        return random.random(), np.random.rand(), torch.rand(1).item()

    with seeded(7):
        first = draws()
    with seeded(7):
        second = draws()
    assert first == second
    with seeded(8):
        assert draws() != first

    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    with seeded(7):
        draws()
    after = draws()
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    assert after == draws()

    # seed=None does nothing: the caller's stream continues.
    np.random.seed(3)
    expected = np.random.rand(2)
    np.random.seed(3)
    with seeded(None):
        value = np.random.rand()
    assert value == expected[0] and np.random.rand() == expected[1]


# -- batch centring: every model with BatchCenteringMixin ---------------------------------
def _centring_models() -> list[str]:
    import celltyper.model
    from celltyper.model.base import BatchCenteringMixin

    return [
        name
        for name in celltyper.model.__all__
        if issubclass(getattr(celltyper.model, name), BatchCenteringMixin)
    ]


def _batch_means_by_hand(adata, target_sum: float) -> dict[str, np.ndarray]:
    counts = adata.X.toarray().astype(np.float64)
    x = np.log1p(counts / counts.sum(axis=1, keepdims=True) * target_sum)
    batches = adata.obs["batch"].astype(str).to_numpy()
    return {b: x[batches == b].mean(axis=0) for b in np.unique(batches)}


@pytest.mark.parametrize("model_name", _centring_models())
def test_batch_centering_subtracts_each_batch_mean_and_survives_surgery(model_name, tmp_path):
    import warnings

    from conftest import make_counts_adata, tiny_kwargs, train_kwargs

    import celltyper.model

    model_cls = getattr(celltyper.model, model_name)
    adata = make_counts_adata(cells_per=20)
    model_cls.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    model = model_cls(adata, **tiny_kwargs(model_cls), batch_centering=True)
    target_sum = model.module.target_sum()
    # Means over every cell of a batch, the unlabelled ones (all of b1) included.
    by_hand = _batch_means_by_hand(adata, target_sum)
    means = model.module.batch_means.numpy().copy()
    np.testing.assert_allclose(means, np.stack([by_hand["b0"], by_hand["b1"]]), atol=1e-4)
    # The model's input: each batch centred on its own mean.
    codes = np.array(adata.obs["batch"].cat.codes)
    tensors = {"X": torch.as_tensor(adata.X.toarray()), "batch": torch.as_tensor(codes[:, None])}
    x = model.module.log_expression(tensors).numpy()
    for code in (0, 1):
        np.testing.assert_allclose(x[codes == code].mean(axis=0), 0.0, atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(**train_kwargs(model_cls))

    # A query batch never seen by the reference is centred on its own mean.
    query = make_counts_adata(n_batches=3, cells_per=20, seed=5)
    query = query[query.obs["batch"] == "b2"].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        query_model = model_cls.load_query_data(query, model)
    query_means = query_model.module.batch_means.numpy()
    assert query_means.shape == (3, adata.n_vars)
    np.testing.assert_allclose(query_means[:2], means, atol=1e-6)
    expected = _batch_means_by_hand(query, target_sum)["b2"]
    np.testing.assert_allclose(query_means[2], expected, atol=1e-4)

    # The buffer is saved and loaded with the model.
    model.save(tmp_path / "centred")
    loaded = model_cls.load(tmp_path / "centred", adata=adata)
    np.testing.assert_array_equal(loaded.module.batch_means.numpy(), means)
    np.testing.assert_array_equal(loaded.predict(), model.predict())


@pytest.mark.parametrize("model_name", _centring_models())
def test_batch_centering_needs_two_batches(model_name):
    from conftest import make_counts_adata, tiny_kwargs

    import celltyper.model

    model_cls = getattr(celltyper.model, model_name)
    adata = make_counts_adata(n_batches=1, cells_per=10)
    model_cls.setup_anndata(adata, labels_key="train_label")
    with pytest.raises(ValueError, match=r"batch_centering.*2 batches"):
        model_cls(adata, **tiny_kwargs(model_cls), batch_centering=True)


@pytest.mark.parametrize("model_name", _centring_models())
def test_batch_centering_auto_centres_when_there_are_batches(model_name):
    from conftest import make_counts_adata, tiny_kwargs

    import celltyper.model

    model_cls = getattr(celltyper.model, model_name)
    single = make_counts_adata(n_batches=1, cells_per=10)
    model_cls.setup_anndata(single, labels_key="train_label", batch_key="batch")
    model = model_cls(single, **tiny_kwargs(model_cls), batch_centering="auto")
    assert not model.module.batch_centering
    assert model.init_params_["non_kwargs"]["batch_centering"] is False

    two = make_counts_adata(n_batches=2, cells_per=10)
    model_cls.setup_anndata(two, labels_key="train_label", batch_key="batch")
    model = model_cls(two, **tiny_kwargs(model_cls), batch_centering="auto")
    assert model.module.batch_centering
    # Stored resolved: a query adding batches cannot turn centring on in a query model.
    assert model.init_params_["non_kwargs"]["batch_centering"] is True
    with pytest.raises(ValueError, match=r"batch_centering must be True, False or 'auto'.*'yes'"):
        model_cls(two, **tiny_kwargs(model_cls), batch_centering="yes")


@pytest.mark.parametrize("model_name", _centring_models())
def test_files_saved_without_batch_means_load_uncentred(model_name):
    from conftest import make_counts_adata, tiny_kwargs

    import celltyper.model

    model_cls = getattr(celltyper.model, model_name)
    adata = make_counts_adata(n_batches=2, cells_per=10)
    model_cls.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    uncentred = model_cls(adata, **tiny_kwargs(model_cls), batch_centering=False)
    centred = model_cls(adata, **tiny_kwargs(model_cls), batch_centering=True)
    # As a file saved before the model could centre: no batch_means in its state.
    centred.module.load_state_dict(uncentred.module.state_dict())
    assert not centred.module.batch_centering
    assert "batch_means" not in centred.module.state_dict()
    np.testing.assert_array_equal(centred.predict(soft=True), uncentred.predict(soft=True))


def test_cellular_centres_batches_by_default():
    from conftest import make_counts_adata, tiny_kwargs

    import celltyper.model

    adata = make_counts_adata(n_batches=2, cells_per=10)
    celltyper.model.CELLULAR.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    model = celltyper.model.CELLULAR(adata, **tiny_kwargs(celltyper.model.CELLULAR))
    assert model.module.batch_centering


@pytest.mark.parametrize("model_name", _centring_models())
def test_batch_centering_warns_on_batches_the_model_never_saw(model_name):
    import warnings

    from conftest import make_counts_adata, tiny_kwargs, train_kwargs

    import celltyper.model

    model_cls = getattr(celltyper.model, model_name)
    adata = make_counts_adata(cells_per=20)
    model_cls.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    model = model_cls(adata, **tiny_kwargs(model_cls), batch_centering=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(**train_kwargs(model_cls))
    known = make_counts_adata(cells_per=20, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model.predict(known)
    query = make_counts_adata(n_batches=3, cells_per=20, seed=5)
    before = query.obs.copy()
    with pytest.warns(
        UserWarning, match=r"\d+ cells of the adata are in batches the model never saw.*b2"
    ):
        model.predict(query)
    pd.testing.assert_frame_equal(query.obs, before)
    no_batch = known.copy()
    del no_batch.obs["batch"]
    with pytest.warns(UserWarning, match=r"never saw \(no obs\['batch'\]\)"):
        model.predict(no_batch)
