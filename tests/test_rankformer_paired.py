"""RANKFORMER's paired mode: CLS + current genes + SEP + context genes, with segments."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import assert_unchanged, make_counts_adata, snapshot, tiny_kwargs

from celltyper.data import (
    CLS_TOKEN,
    MASK_TOKEN,
    N_SPECIAL_TOKENS,
    PAD_TOKEN,
    PREVIOUS_LAYER,
    RankTokens,
    paired_rank_value_tokenize,
    planted_state_changes,
    rank_value_tokenize,
    sep_token,
    tokenize_paired_matrices,
)
from celltyper.model import RANKFORMER
from celltyper.module import RANKFORMERModule

P, C = PAD_TOKEN, CLS_TOKEN


def _g(index: int) -> int:
    return N_SPECIAL_TOKENS + index


# -- tokens of a hand-made pair ---------------------------------------------------------------
# 3 cells x 5 genes, gene medians 1, 2, 1, 4, 1 (scaled value = count / median after
# normalize_total, which keeps the order within a cell).
HAND_NOW = np.array([[4, 0, 2, 8, 0], [0, 6, 1, 0, 3], [0, 0, 0, 0, 5]], dtype=np.float32)
HAND_BEFORE = np.array([[0, 0, 0, 0, 9], [2, 0, 0, 8, 1], [0, 0, 0, 0, 0]], dtype=np.float32)
HAND_MEDIANS = np.array([1.0, 2.0, 1.0, 4.0, 1.0])
SEP = sep_token(5)
# Now: scaled 4, 0, 2, 2, 0 -> g0, then the tie g2/g3 by index; 0, 3, 1, 0, 3 -> g1, g4,
# g2; g4 alone. Before: g4 alone; scaled 2, 0, 0, 2, 1 -> g0, g3, g4; no counts (no pair).
HAND_TOKENS = [
    [C, _g(0), _g(2), _g(3), SEP, _g(4), P, P],
    [C, _g(1), _g(4), _g(2), SEP, _g(0), _g(3), _g(4)],
    [C, _g(4), P, P, P, P, P, P],
]
HAND_SEGMENTS = [[0, 0, 0, 0, 1, 1, 1, 1]] * 3


def test_paired_tokens_on_a_hand_made_pair():
    tokens = paired_rank_value_tokenize(
        torch.from_numpy(HAND_NOW),
        torch.from_numpy(HAND_BEFORE),
        torch.tensor(HAND_MEDIANS),
        n_tokens_current=10,
        n_tokens_context=10,
    )
    assert SEP == N_SPECIAL_TOKENS + 5, "SEP takes the id after the last gene"
    assert tokens.tokens.tolist() == HAND_TOKENS
    assert tokens.segments.tolist() == HAND_SEGMENTS
    assert tokens.padding_mask.tolist() == [[t == P for t in row] for row in HAND_TOKENS]
    # The third cell has no context: its SEP is padding and its unmasked tokens are those
    # of the base mode.
    assert tokens.padding_mask[2, 4]
    base = rank_value_tokenize(torch.from_numpy(HAND_NOW), torch.tensor(HAND_MEDIANS), 10)
    assert tokens.tokens[2][~tokens.padding_mask[2]].tolist() == base.tokens[2][:2].tolist()
    # Each half keeps its own budget: the top 2 genes now, the top 1 before.
    short = paired_rank_value_tokenize(
        torch.from_numpy(HAND_NOW), torch.from_numpy(HAND_BEFORE), torch.tensor(HAND_MEDIANS), 2, 1
    )
    assert short.tokens.tolist() == [
        [C, _g(0), _g(2), SEP, _g(4)],
        [C, _g(1), _g(4), SEP, _g(0)],
        [C, _g(4), P, P, P],
    ]


@pytest.mark.parametrize("to_matrix", [sp.csr_matrix, np.asarray])
def test_whole_matrices_tokenise_like_the_minibatch(to_matrix):
    medians = torch.tensor(HAND_MEDIANS)
    expected = paired_rank_value_tokenize(
        torch.from_numpy(HAND_NOW), torch.from_numpy(HAND_BEFORE), medians, 10, 10, n_bins=2
    )
    whole = tokenize_paired_matrices(
        to_matrix(HAND_NOW), to_matrix(HAND_BEFORE), HAND_MEDIANS, 10, 10, n_bins=2, chunk_size=2
    )
    for field in ("tokens", "padding_mask", "bins", "segments"):
        assert torch.equal(getattr(whole, field), getattr(expected, field)), field
    with pytest.raises(ValueError, match="context must have the shape"):
        tokenize_paired_matrices(HAND_NOW, HAND_BEFORE[:2], HAND_MEDIANS, 4, 4)
    with pytest.raises(ValueError, match="n_tokens_context"):
        tokenize_paired_matrices(HAND_NOW, HAND_BEFORE, HAND_MEDIANS, 4, 0)


# -- the module -------------------------------------------------------------------------------
def _paired_module() -> RANKFORMERModule:
    torch.manual_seed(0)
    module = RANKFORMERModule(
        n_input=20, n_labels=3, n_tokens=4, n_tokens_context=4, n_bins=4, d_model=16, d_ff=32
    )
    # Embeddings far larger than the 0.02 initialisation make attention far from uniform,
    # so the checks below would notice an order or segment effect.
    with torch.no_grad():
        module.gene_embedding.weight.normal_()
        module.segment_embedding.weight.normal_()
    return module.eval()


def _paired_tokens() -> RankTokens:
    sep = sep_token(20)
    tokens = torch.tensor(
        [
            [C, _g(3), _g(7), _g(1), P, sep, _g(5), _g(7), P, P],
            [C, _g(0), _g(4), _g(9), _g(2), sep, _g(9), _g(0), _g(6), _g(11)],
        ]
    )
    bins = torch.tensor([[0, 4, 3, 1, 0, 0, 4, 2, 0, 0], [0, 4, 3, 2, 1, 0, 4, 3, 2, 1]])
    segments = torch.tensor([[0] * 5 + [1] * 5] * 2)
    return RankTokens(tokens, tokens == P, bins, segments)


def _reorder(tokens: RankTokens, order: list[int]) -> RankTokens:
    return RankTokens(
        tokens.tokens[:, order],
        tokens.padding_mask[:, order],
        tokens.bins[:, order],
        tokens.segments[:, order],
    )


def test_permuting_genes_within_each_half_changes_nothing():
    module = _paired_module()
    tokens = _paired_tokens()
    with torch.no_grad():
        reference = module.classifier(module.cls_embedding(tokens))
        within = [0, 3, 1, 4, 2, 5, 9, 7, 6, 8]  # CLS and SEP stay, genes shuffle per half
        permuted = module.classifier(module.cls_embedding(_reorder(tokens, within)))
        torch.testing.assert_close(permuted, reference, atol=1e-5, rtol=1e-5)
        # Moving a gene to the other half is a different cell: the segments are read.
        swapped = _paired_tokens()
        swapped.segments[1, 2], swapped.segments[1, 6] = 1, 0
        moved = module.classifier(module.cls_embedding(swapped))
        assert not torch.allclose(moved[1], reference[1], atol=1e-3)
        torch.testing.assert_close(moved[0], reference[0], atol=1e-5, rtol=1e-5)


def test_paired_module_vocabulary_segments_and_masking():
    module = _paired_module()
    base = RANKFORMERModule(n_input=20, n_labels=3, n_tokens=4, d_model=16, d_ff=32)
    # The paired vocabulary adds SEP after the genes; a base module is unchanged.
    assert module.gene_embedding.num_embeddings == base.gene_embedding.num_embeddings + 1
    assert base.segment_embedding is None and "segment_embedding.weight" not in base.state_dict()
    assert module.masked_gene_logits(torch.zeros(2, 16)).shape == (2, 20)
    tokens = _paired_tokens()
    torch.manual_seed(0)
    masked_tokens, masked = module.mask_tokens(tokens, 0.9)
    sep_positions = tokens.tokens == sep_token(20)
    assert masked.any() and not (masked & sep_positions).any(), "SEP is never masked"
    assert masked_tokens.tokens[masked].eq(MASK_TOKEN).all()
    assert torch.equal(masked_tokens.segments, tokens.segments)
    with pytest.raises(ValueError, match="paired module got tokens with no segments"):
        module.encode(RankTokens(tokens.tokens, tokens.padding_mask, tokens.bins))
    with pytest.raises(KeyError, match="context"):
        module.tokenize({"X": torch.ones(2, 20)})


# -- the planted task: the label is in the change only ----------------------------------------
def _planted_accuracy(paired: bool) -> float:
    train, test = planted_state_changes(seed=0), planted_state_changes(seed=1)
    context = {"context_layer": PREVIOUS_LAYER} if paired else {}
    RANKFORMER.setup_anndata(train, labels_key="label", **context)
    model = RANKFORMER(
        train, d_model=32, n_heads=2, d_ff=64, head_hidden=32, n_tokens=32, dropout=0.0
    )
    model.train(max_epochs=15, batch_size=32, lr=3e-3, early_stopping=False)
    truth = test.obs["label"].to_numpy()
    return float((model.predict(test) == truth).mean())


def test_planted_change_is_learnt_by_the_paired_mode_only():
    # 200 training and 200 new cells; either profile alone is independent of the label.
    paired, base = _planted_accuracy(True), _planted_accuracy(False)
    assert paired >= 0.95, f"paired mode: {paired:.3f}"
    assert 0.35 <= base <= 0.65, f"base mode should stay at chance (0.5): {base:.3f}"


# -- setup: layers, obs columns and missing pairs ---------------------------------------------
def _with_previous_layer(seed: int = 0):
    adata = make_counts_adata()
    rng = np.random.default_rng(seed)
    adata.layers["previous"] = adata.X[rng.permutation(adata.n_obs)]
    return adata


def _setup(adata, **kwargs):
    RANKFORMER.setup_anndata(adata, labels_key="train_label", batch_key="batch", **kwargs)


def test_context_key_pairs_give_the_tokens_of_the_same_context_layer():
    by_layer = _with_previous_layer()
    by_key = by_layer.copy()
    partner = np.random.default_rng(0).permutation(by_key.n_obs)
    by_key.obs["previous_cell"] = by_key.obs_names[partner]
    by_layer.layers["previous"] = by_layer.X[partner]
    _setup(by_layer, context_layer="previous")
    _setup(by_key, context_key="previous_cell")
    tokens = [RANKFORMER(a, **tiny_kwargs(RANKFORMER)).tokenize() for a in (by_layer, by_key)]
    assert torch.equal(tokens[0].tokens, tokens[1].tokens)
    assert torch.equal(tokens[0].segments, tokens[1].segments)
    # n_tokens splits in two halves by default: CLS + 16 + SEP + 16 here.
    assert tokens[0].tokens.shape[1] == 1 + 16 + 1 + 16
    assert (tokens[0].tokens[:, 17] == sep_token(by_layer.n_vars)).all()


MISSING_CASES = {
    "zero_context_row": ("context_layer", "no counts"),
    "unknown_partner": ("context_key", "missing, unknown"),
}


@pytest.mark.parametrize("case", list(MISSING_CASES))
def test_missing_pairs_raise_or_fall_back_to_the_base_mode(case):
    argument, reason = MISSING_CASES[case]
    adata = _with_previous_layer()
    previous = adata.layers["previous"].tolil()
    previous[:7] = 0
    adata.layers["previous"] = previous.tocsr()
    names = np.asarray(adata.obs_names, dtype=object)
    adata.obs["previous_cell"] = np.r_[["nowhere"] * 3, [None] * 4, names[7:][::-1]]
    setup = {argument: "previous" if argument == "context_layer" else "previous_cell"}
    before = snapshot(adata)
    with pytest.raises(
        ValueError, match=rf"7 of the 400 cells .*{reason}.*missing_context='none'"
    ):
        _setup(adata, **setup)
    assert_unchanged(adata, before)
    with pytest.warns(UserWarning, match="7 of the 400 cells .* base mode"):
        _setup(adata, **setup, missing_context="none")
    model = RANKFORMER(adata, **tiny_kwargs(RANKFORMER))
    tokens = model.tokenize(indices=np.arange(10))
    base = rank_value_tokenize(
        torch.from_numpy(np.asarray(adata.X[:10].todense())), model.module.gene_medians, 16
    )
    for cell in range(7):  # no pair: CLS and the cell's own genes, nothing else
        kept = tokens.tokens[cell][~tokens.padding_mask[cell]]
        assert kept.tolist() == base.tokens[cell][~base.padding_mask[cell]].tolist()
    assert (tokens.tokens[7:, 17] == sep_token(adata.n_vars)).all()


BAD_SETUPS = {
    "both": ({"context_layer": "previous", "context_key": "batch"}, ValueError, "not both"),
    "no_layer": ({"context_layer": "earlier"}, KeyError, "context_layer='earlier'"),
    "no_column": ({"context_key": "earlier"}, KeyError, "context_key='earlier'"),
    "bad_fallback": (
        {"context_layer": "previous", "missing_context": "base"},
        ValueError,
        "missing_context must be one of",
    ),
    "normalised_layer": ({"context_layer": "lognorm"}, ValueError, "non-integer"),
}


@pytest.mark.parametrize("case", list(BAD_SETUPS))
def test_bad_context_setup_raises_and_leaves_adata_unchanged(case):
    kwargs, error, match = BAD_SETUPS[case]
    adata = _with_previous_layer()
    adata.layers["lognorm"] = adata.X.log1p()
    before = snapshot(adata)
    with pytest.raises(error, match=match):
        _setup(adata, **kwargs)
    assert_unchanged(adata, before)


def test_token_budget_defaults_to_half_each_and_base_models_refuse_it():
    adata = _with_previous_layer()
    _setup(adata, context_layer="previous")
    model = RANKFORMER(adata, **{**tiny_kwargs(RANKFORMER), "n_tokens": 31})
    assert (model.module.n_tokens, model.module.n_tokens_context) == (15, 16)
    explicit = RANKFORMER(adata, n_tokens_current=8, n_tokens_context=4, d_model=16, n_heads=2)
    assert (explicit.module.n_tokens, explicit.module.n_tokens_context) == (8, 4)
    assert "top 8 genes of the cell + SEP + top 4 of its context" in explicit._model_summary_string
    with pytest.raises(ValueError, match="n_tokens_current must be >= 1"):
        RANKFORMER(adata, n_tokens=1)
    base = make_counts_adata()
    _setup(base)
    with pytest.raises(ValueError, match="n_tokens_context=8 applies to the paired mode"):
        RANKFORMER(base, n_tokens_context=8)
    assert not RANKFORMER(base, **tiny_kwargs(RANKFORMER)).is_paired


# -- new data: predict and queries read the context too ---------------------------------------
@pytest.fixture(scope="module")
def trained_paired():
    adata = _with_previous_layer()
    _setup(adata, context_layer="previous")
    model = RANKFORMER(adata, **tiny_kwargs(RANKFORMER))
    model.train(max_epochs=2, batch_size=16, lr=3e-3)
    return model, adata


def test_new_data_must_carry_the_context(trained_paired):
    model, _ = trained_paired
    data = _with_previous_layer()
    query = data[data.obs["batch"] == "b1"].copy()
    del query.layers["previous"]
    before = snapshot(query)
    for call in (lambda: model.predict(query), lambda: RANKFORMER.load_query_data(query, model)):
        with pytest.raises(KeyError, match="context_layer='previous' is not in the"):
            call()
        assert_unchanged(query, before)


def test_context_changes_predictions_of_new_data(trained_paired):
    model, _ = trained_paired
    other = _with_previous_layer()
    soft = model.predict(other, soft=True).to_numpy()
    np.testing.assert_allclose(soft, model.predict(soft=True).to_numpy(), atol=1e-6)
    other.layers["previous"] = other.layers["previous"][::-1]
    assert not np.allclose(model.predict(other, soft=True).to_numpy(), soft, atol=1e-4)


def test_paired_setup_in_a_mudata_reads_the_obs_column_of_the_mudata():
    import mudata as md

    rna = make_counts_adata()
    obs = rna.obs.copy()
    rna.obs = pd.DataFrame(index=rna.obs_names)
    mdata = md.MuData({"rna": rna})
    for column in ("train_label", "batch"):
        mdata.obs[column] = obs[column].to_numpy()
    mdata.obs["previous_cell"] = np.asarray(rna.obs_names)[::-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        RANKFORMER.setup_mudata(mdata, labels_key="train_label", context_key="previous_cell")
    model = RANKFORMER(mdata, **tiny_kwargs(RANKFORMER))
    assert model.is_paired
    tokens = model.tokenize(indices=[0])
    flipped = tokenize_paired_matrices(
        rna.X[:1], rna.X[-1:], model.module.gene_medians, 16, 16, model.module.n_bins
    )
    assert torch.equal(tokens.tokens, flipped.tokens)
