"""RANKFORMER: tokeniser, attention layer, invariances, its loss, training stages and schedule."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from conftest import UNKNOWN, make_counts_adata, tiny_kwargs
from scvi import REGISTRY_KEYS

from celltyper.data import (
    CLS_TOKEN,
    MASK_TOKEN,
    N_SPECIAL_TOKENS,
    PAD_TOKEN,
    RankTokens,
    nonzero_gene_medians,
    rank_value_tokenize,
    tokenize_matrix,
)
from celltyper.model import RANKFORMER
from celltyper.module import RANKFORMERModule
from celltyper.nn import MultiHeadSelfAttention
from celltyper.train import loss_terms, merge_minibatches

P, C = PAD_TOKEN, CLS_TOKEN


def _g(index: int) -> int:
    return N_SPECIAL_TOKENS + index


# A hand-made matrix: 3 cells x 5 genes; gene medians 1, 2, 1, 4, 1.
HAND_X = np.array(
    [
        [4, 0, 2, 8, 0],  # scaled 4, 0, 2, 2, 0 -> gene 0, then the tie 2/3 by index
        [0, 6, 1, 0, 3],  # scaled 0, 3, 1, 0, 3 -> tie 1/4 by index, then gene 2
        [0, 0, 0, 0, 5],  # one expressed gene, then padding
    ],
    dtype=np.float32,
)
HAND_MEDIANS = np.array([1.0, 2.0, 1.0, 4.0, 1.0])
HAND_TOKENS = [
    [C, _g(0), _g(2), _g(3)],
    [C, _g(1), _g(4), _g(2)],
    [C, _g(4), P, P],
]
# Two bins per cell: 1 + floor(2 * (expressed genes with a lower value) / n_expressed).
HAND_BINS = [[0, 1, 1, 2], [0, 2, 1, 1], [0, 1, 0, 0]]


# -- tokeniser --------------------------------------------------------------------------------
def test_tokenizer_on_hand_made_matrix():
    tokens = rank_value_tokenize(
        torch.from_numpy(HAND_X), torch.tensor(HAND_MEDIANS), n_tokens=10, n_bins=2
    )
    assert tokens.tokens.tolist() == HAND_TOKENS
    assert tokens.padding_mask.tolist() == [
        [False, False, False, False],
        [False, False, False, False],
        [False, False, True, True],
    ]
    assert tokens.bins.tolist() == HAND_BINS
    # n_tokens keeps the top genes only.
    top2 = rank_value_tokenize(torch.from_numpy(HAND_X), torch.tensor(HAND_MEDIANS), 2)
    assert top2.tokens.tolist() == [row[:3] for row in HAND_TOKENS]
    assert top2.bins is None
    # Without trimming the sequence has 1 + n_tokens positions, padded.
    long = rank_value_tokenize(torch.from_numpy(HAND_X), torch.tensor(HAND_MEDIANS), 5, trim=False)
    assert long.tokens.shape == (3, 6)
    assert long.tokens[:, 4:].eq(P).all() and long.padding_mask[:, 4:].all()


def test_tokenizer_medians_change_the_ranking():
    # With unit medians gene 3 (8 counts) leads cell 0; its median of 4 demotes it.
    plain = rank_value_tokenize(torch.from_numpy(HAND_X[:1]), torch.ones(5), 3)
    assert plain.tokens.tolist() == [[C, _g(3), _g(0), _g(2)]]


@pytest.mark.parametrize("to_matrix", [sp.csr_matrix, sp.csc_matrix, np.asarray])
def test_tokenize_matrix_sparse_and_dense_match_minibatch_tokens(to_matrix):
    tokens = tokenize_matrix(to_matrix(HAND_X), HAND_MEDIANS, n_tokens=10, n_bins=2)
    assert tokens.tokens.tolist() == HAND_TOKENS
    assert tokens.bins.tolist() == HAND_BINS
    # Random counts, in several chunks: the sparse path gives the dense path's tokens.
    rng = np.random.default_rng(0)
    x = rng.poisson(0.3, size=(300, 40)).astype(np.float32)
    x[5] = 0  # a cell without counts: CLS and padding only
    medians = nonzero_gene_medians(x)
    dense = rank_value_tokenize(torch.from_numpy(x), torch.tensor(medians), 16, 5)
    chunked = tokenize_matrix(to_matrix(x), medians, 16, 5, chunk_size=64)
    assert torch.equal(chunked.tokens, dense.tokens)
    assert torch.equal(chunked.bins, dense.bins)
    assert torch.equal(chunked.padding_mask, dense.padding_mask)
    assert chunked.tokens[5].tolist() == [C] + [P] * (chunked.tokens.shape[1] - 1)


def test_zero_genes_never_become_tokens():
    rng = np.random.default_rng(1)
    x = rng.poisson(0.5, size=(50, 30)).astype(np.float32)
    tokens = rank_value_tokenize(torch.from_numpy(x), torch.ones(30), n_tokens=30)
    for cell in range(50):
        genes = tokens.tokens[cell][~tokens.padding_mask[cell]][1:] - N_SPECIAL_TOKENS
        assert sorted(genes.tolist()) == np.flatnonzero(x[cell]).tolist()
        # Sorted by decreasing scaled expression.
        assert np.all(np.diff(x[cell, genes.numpy()]) <= 0)


def test_nonzero_gene_medians_by_hand():
    x = np.array([[1, 1, 0], [1, 3, 0], [2, 0, 0], [0, 0, 0]], dtype=np.float32)
    # Rows scaled to 1e4: [5000, 5000], [2500, 7500], [10000, 0]; gene 2 never expressed.
    expected = [5000.0, 6250.0, 1.0]
    np.testing.assert_allclose(nonzero_gene_medians(x), expected)
    np.testing.assert_allclose(nonzero_gene_medians(sp.csr_matrix(x), chunk_size=2), expected)


def test_tokenizer_rejects_bad_arguments():
    x = torch.from_numpy(HAND_X)
    with pytest.raises(ValueError, match="n_tokens"):
        rank_value_tokenize(x, torch.ones(5), 0)
    with pytest.raises(ValueError, match="x must be"):
        rank_value_tokenize(x, torch.ones(4), 3)


# -- attention layer ----------------------------------------------------------------------------
def _manual_head(attn: MultiHeadSelfAttention, x, padding_mask, h):
    d, dh = attn.d_model, attn.head_dim
    w, b = attn.qkv.weight, attn.qkv.bias
    rows = slice(h * dh, (h + 1) * dh)
    q = x @ w[:d][rows].T + b[:d][rows]
    k = x @ w[d : 2 * d][rows].T + b[d : 2 * d][rows]
    v = x @ w[2 * d :][rows].T + b[2 * d :][rows]
    scores = q @ k.transpose(1, 2) / math.sqrt(dh)
    scores = scores.masked_fill(padding_mask[:, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def test_attention_heads_match_a_per_head_computation():
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(16, 4).eval()
    x = torch.randn(3, 6, 16)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[1, 4:] = True
    with torch.no_grad():
        heads = attn.heads(x, mask)
        for h in range(4):
            torch.testing.assert_close(heads[:, :, h], _manual_head(attn, x, mask, h))


def test_attention_heads_are_independent():
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(16, 4).eval()
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[False] * 5, [False, False, False, True, True]])
    d, dh, h = 16, 4, 2
    with torch.no_grad():
        before = attn.heads(x, mask).clone()
        out_before = attn(x, mask).clone()
        # Change head h's query, key and value weights: only its slice of the output moves.
        for part in range(3):
            attn.qkv.weight[part * d + h * dh : part * d + (h + 1) * dh] += 0.5
        after = attn.heads(x, mask)
        others = [i for i in range(4) if i != h]
        torch.testing.assert_close(after[:, :, others], before[:, :, others], rtol=0, atol=0)
        assert not torch.allclose(after[:, :, h], before[:, :, h])
        # Changing head h's columns of the output projection adds exactly that head's term.
        heads = attn.heads(x, mask)
        out = attn(x, mask)
        delta = torch.randn(d, dh)
        attn.out.weight[:, h * dh : (h + 1) * dh] += delta
        torch.testing.assert_close(attn(x, mask) - out, heads[:, :, h] @ delta.T)
    assert not torch.equal(out, out_before)


def test_attention_rejects_heads_not_dividing_width():
    with pytest.raises(ValueError, match="n_heads"):
        MultiHeadSelfAttention(10, 4)


# -- module invariances ---------------------------------------------------------------------------
def _module(n_bins: int = 4) -> RANKFORMERModule:
    torch.manual_seed(0)
    module = RANKFORMERModule(
        n_input=20, n_labels=3, n_tokens=8, n_bins=n_bins, d_model=16, n_heads=4, d_ff=32
    )
    # Larger embeddings than the 0.02 initialisation make attention far from uniform, so
    # the checks below would notice a leak.
    with torch.no_grad():
        module.gene_embedding.weight.normal_()
        if module.value_embedding is not None:
            module.value_embedding.weight.normal_()
    return module.eval()


def _tokens() -> RankTokens:
    tokens = torch.tensor([[C, _g(3), _g(7), _g(1), P, P], [C, _g(0), _g(4), _g(9), _g(2), _g(5)]])
    bins = torch.tensor([[0, 4, 3, 1, 0, 0], [0, 4, 3, 2, 2, 1]])
    return RankTokens(tokens, tokens == P, bins)


def test_padding_does_not_change_the_cls_output():
    module = _module()
    tokens = _tokens()
    with torch.no_grad():
        reference = module.cls_embedding(tokens)
        changed_ids = tokens.tokens.clone()
        changed_ids[0, 4:] = torch.tensor([_g(11), _g(12)])
        changed_bins = tokens.bins.clone()
        changed_bins[0, 4:] = 4
        changed = RankTokens(changed_ids, tokens.padding_mask, changed_bins)
        torch.testing.assert_close(module.cls_embedding(changed), reference, rtol=0, atol=1e-6)
        # Without the mask the same change does move the CLS output: the mask is what helps.
        unmasked = RankTokens(changed_ids, torch.zeros_like(tokens.padding_mask), changed_bins)
        assert not torch.allclose(module.cls_embedding(unmasked)[0], reference[0], atol=1e-4)
        # Changing the embedding rows the padding uses does not matter either.
        module.gene_embedding.weight[PAD_TOKEN] += 3.0
        torch.testing.assert_close(module.cls_embedding(tokens), reference, rtol=0, atol=1e-6)


def test_permuting_tokens_does_not_change_the_output():
    module = _module()
    tokens = _tokens()
    with torch.no_grad():
        reference = module.classifier(module.cls_embedding(tokens))
        hidden = module.encode(tokens)
        order = torch.tensor([3, 0, 5, 1, 4, 2])  # CLS moves too: no positional encoding
        permuted = RankTokens(
            tokens.tokens[:, order], tokens.padding_mask[:, order], tokens.bins[:, order]
        )
        hidden_permuted = module.encode(permuted)
        torch.testing.assert_close(hidden_permuted[:, 1], hidden[:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hidden_permuted, hidden[:, order], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            module.classifier(hidden_permuted[:, 1]), reference, atol=1e-5, rtol=1e-5
        )


def test_mask_tokens_masks_gene_tokens_only():
    module = _module()
    tokens = _tokens()
    torch.manual_seed(0)
    masked_tokens, masked = module.mask_tokens(tokens, 0.5)
    assert masked.any()
    assert not masked[:, 0].any() and not (masked & tokens.padding_mask).any()
    assert masked_tokens.tokens[masked].eq(MASK_TOKEN).all()
    assert torch.equal(masked_tokens.tokens[~masked], tokens.tokens[~masked])
    assert torch.equal(masked_tokens.bins, tokens.bins)


def test_drop_tokens_hides_gene_tokens_only():
    module = _module()
    tokens = _tokens()
    torch.manual_seed(0)
    dropped = module.drop_tokens(tokens, 0.5)
    hidden = dropped.padding_mask & ~tokens.padding_mask
    assert hidden.any() and not hidden[:, 0].any()
    assert not (tokens.padding_mask & ~dropped.padding_mask).any(), "padding stays padding"
    assert torch.equal(dropped.tokens, tokens.tokens) and torch.equal(dropped.bins, tokens.bins)
    # A rate of 0 hides nothing.
    assert module.drop_tokens(tokens, 0.0).padding_mask.equal(tokens.padding_mask)


def _encoder_padding(module: RANKFORMERModule) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    module.encoder.register_forward_hook(lambda _m, args, _out: seen.append(args[1]))
    return seen


def test_token_dropout_applies_in_training_only():
    module = _module()
    tensors = _minibatch(module)
    unhidden = module.tokenize(tensors).padding_mask
    seen = _encoder_padding(module)
    module.train()
    torch.manual_seed(0)
    with torch.no_grad():
        inference_outputs, _, _ = module(tensors, loss_kwargs={"token_dropout": 0.4})
    genes = ~unhidden
    genes[:, 0] = False
    share = (seen[-1] & genes).sum() / genes.sum()
    assert 0.25 < share < 0.55, f"about 40 % of the gene tokens hidden, got {share:.2f}"
    assert inference_outputs["token_dropout"] == 0.4
    # The loss reads that pass (no second encoding).
    assert len(seen) == 1
    module.eval()
    with torch.no_grad():
        inference_outputs, _, _ = module(tensors, loss_kwargs={"token_dropout": 0.4})
    assert torch.equal(seen[-1], unhidden), "no token hidden out of training"
    assert inference_outputs["token_dropout"] == 0.0
    with pytest.raises(ValueError, match="token_dropout"):
        module.loss(tensors, inference_outputs, {}, token_dropout=1.0)


def test_module_rejects_bad_sizes():
    with pytest.raises(ValueError, match="gene_medians"):
        RANKFORMERModule(n_input=3, n_labels=2, gene_medians=np.array([1.0, 0.0, 2.0]))
    with pytest.raises(ValueError, match="n_tokens"):
        RANKFORMERModule(n_input=3, n_labels=2, n_tokens=0)


def _minibatch(module: RANKFORMERModule, n_cells: int = 12) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    x = rng.poisson(1.0, size=(n_cells, module.n_input)).astype(np.float32)
    labels = np.arange(n_cells) % (module.n_labels + 1)  # code n_labels: unlabelled
    return {
        REGISTRY_KEYS.X_KEY: torch.from_numpy(x),
        REGISTRY_KEYS.LABELS_KEY: torch.from_numpy(labels)[:, None].float(),
    }


def _count_encoder_passes(module: RANKFORMERModule) -> list[int]:
    calls: list[int] = []
    module.encoder.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_loss_terms_by_hand_from_one_encoder_pass():
    module = _module()
    tensors = _minibatch(module)
    settings = {
        "classification_weight": 2.0,
        "mlm_weight": 0.5,
        "mask_prob": 0.3,
        "label_smoothing": 0.1,
    }
    calls = _count_encoder_passes(module)
    torch.manual_seed(0)
    with torch.no_grad():
        inference_outputs, _, output = module(tensors, loss_kwargs=settings)
    assert len(calls) == 1, "the classifier and the masked-gene head share one encoder pass"
    # The same pass by hand: tokens, masking with the same random draws, encoder.
    torch.manual_seed(0)
    with torch.no_grad():
        tokens = module.tokenize(tensors)
        inputs, masked = module.mask_tokens(tokens, 0.3)
        hidden = module.encode(inputs)
        logits = module.classifier(hidden[:, 0])
        gene_logits = module.masked_gene_logits(hidden[masked])
    assert masked.any() and torch.equal(inference_outputs["masked"], masked)
    labels = tensors[REGISTRY_KEYS.LABELS_KEY].view(-1).long()
    labelled = labels < module.n_labels
    log_p = torch.log_softmax(logits[labelled], dim=1)
    nll = -log_p.gather(1, labels[labelled, None]).squeeze(1)
    smoothed = (0.9 * nll - 0.1 * log_p.mean(dim=1)).mean()
    targets = tokens.tokens[masked] - N_SPECIAL_TOKENS
    gene_nll = -torch.log_softmax(gene_logits, dim=1).gather(1, targets[:, None]).mean()
    terms = loss_terms(output)
    assert set(terms) == {"classification_loss", "masked_gene_loss"}
    torch.testing.assert_close(terms["classification_loss"], 2.0 * smoothed)
    torch.testing.assert_close(terms["masked_gene_loss"], 0.5 * gene_nll)
    torch.testing.assert_close(output.loss, sum(terms.values()))
    accuracy = (gene_logits.argmax(dim=1) == targets).float().mean()
    torch.testing.assert_close(output.extra_metrics["masked_gene_accuracy"], accuracy)


def test_loss_without_masked_gene_term_masks_nothing():
    module = _module()
    tensors = _minibatch(module)
    class_weights = torch.tensor([1.0, 3.0, 0.5])
    with torch.no_grad():
        inference_outputs, _, output = module(
            tensors, loss_kwargs={"label_smoothing": 0.0, "class_weights": class_weights}
        )
        logits = module.classify(tensors)
    assert not inference_outputs["masked"].any()
    labels = tensors[REGISTRY_KEYS.LABELS_KEY].view(-1).long()
    labelled = labels < module.n_labels
    expected = F.cross_entropy(logits[labelled], labels[labelled], weight=class_weights)
    torch.testing.assert_close(output.loss, expected)
    assert loss_terms(output)["masked_gene_loss"] == 0


def test_loss_masks_unmasked_inference_outputs_itself():
    module = _module()
    tensors = _minibatch(module)
    with torch.no_grad():
        unmasked = module.inference(module.tokenize(tensors))
        calls = _count_encoder_passes(module)
        output = module.loss(tensors, unmasked, {}, classification_weight=0.0, mlm_weight=1.0)
    # Called directly with outputs of another masking, the loss encodes masked tokens.
    assert len(calls) == 1
    assert loss_terms(output)["masked_gene_loss"] > 0
    assert loss_terms(output)["classification_loss"] == 0
    with pytest.raises(ValueError, match="Nothing to learn"):
        module.loss(tensors, unmasked, {}, classification_weight=0.0, mlm_weight=0.0)
    with pytest.raises(ValueError, match="mask_prob"):
        module.loss(tensors, unmasked, {}, mask_prob=1.0)


# -- the model --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained():
    adata = make_counts_adata()
    RANKFORMER.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    model = RANKFORMER(adata, **tiny_kwargs(RANKFORMER))
    model.train(max_epochs=3, batch_size=32, enable_progress_bar=False)
    return model, adata


def test_presets_and_parameter_counts():
    assert RANKFORMER.presets["base"]["d_model"] >= 256
    assert RANKFORMER.presets["base"]["n_layers"] >= 4
    adata = make_counts_adata(n_genes=2000, cells_per=5)
    RANKFORMER.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    # 2,000 genes, 4 cell types (the docs give them for 7 types: + 3 x (head width + 1)).
    assert RANKFORMER(adata).n_parameters == 206_804
    assert RANKFORMER(adata, preset="base").n_parameters == 3_810_772
    with pytest.raises(ValueError, match="preset"):
        RANKFORMER(adata, preset="huge")


def test_gene_medians_come_from_labelled_reference_cells(trained):
    model, adata = trained
    labelled = (adata.obs["train_label"] != UNKNOWN).to_numpy()
    expected = nonzero_gene_medians(adata.X[labelled])
    np.testing.assert_allclose(model.module.gene_medians.numpy(), expected, rtol=1e-6)


def test_reference_medians_are_saved_and_reused_for_queries(trained, tmp_path):
    model, adata = trained
    model.save(str(tmp_path / "m"), save_anndata=False)
    loaded = RANKFORMER.load(str(tmp_path / "m"), adata=adata)
    assert torch.equal(loaded.module.gene_medians, model.module.gene_medians)
    # A query with other depths and 30 missing genes: the reference's medians and
    # vocabulary stay; the missing genes are reported and never become tokens.
    query = adata[adata.obs["batch"] == "b1"].copy()
    query.X = query.X * 3
    keep = np.r_[30 : query.n_vars]
    query = query[:, np.random.default_rng(0).permutation(keep)].copy()
    with pytest.warns(UserWarning, match="30 of the model's 100 genes are missing"):
        query_model = RANKFORMER.load_query_data(query, model)
    assert torch.equal(query_model.module.gene_medians, model.module.gene_medians)
    tokens = query_model.tokenize()
    genes = tokens.tokens[~tokens.padding_mask] - N_SPECIAL_TOKENS
    assert genes[genes >= 0].min() >= 30
    # The model's tokens of the query are those of the aligned matrix, gene ids fixed by
    # the reference order.
    aligned = query[:, model.registration.genes[30:]].X
    by_hand = tokenize_matrix(
        sp.hstack([sp.csr_matrix((query.n_obs, 30)), aligned]).tocsr(),
        model.module.gene_medians,
        model.module.n_tokens,
        model.module.n_bins,
    )
    assert torch.equal(tokens.tokens, by_hand.tokens)


def test_forward_tokenises_like_tokenize(trained):
    model, adata = trained
    loader = model._make_data_loader(adata=adata, indices=np.arange(20), batch_size=20)
    batch = next(iter(loader))
    in_forward = model.module.tokenize(batch)
    whole = model.tokenize(indices=np.arange(20))
    length = in_forward.tokens.shape[1]
    assert torch.equal(in_forward.tokens, whole.tokens[:, :length])
    assert whole.padding_mask[:, length:].all()


def test_query_freeze_rule_keeps_embeddings_and_attention(trained):
    model, adata = trained
    query = adata[adata.obs["batch"] == "b1"].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        query_model = RANKFORMER.load_query_data(query, model)
    trainable = {n for n, p in query_model.module.named_parameters() if p.requires_grad}
    assert trainable == set(query_model.module.query_trainable_parameters())
    assert "gene_embedding.weight" not in trainable
    assert not any(".qkv." in n or ".out." in n for n in trainable)
    assert any("norm" in n for n in trainable)


def _new_model(**kwargs) -> tuple[RANKFORMER, object]:
    adata = make_counts_adata()
    RANKFORMER.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    return RANKFORMER(adata, **{**tiny_kwargs(RANKFORMER), **kwargs}), adata


def _curve(history, name: str) -> np.ndarray:
    return history[name].to_numpy(dtype=float).ravel()


def _labelled_accuracy(model, adata) -> float:
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    labelled = (adata.obs["train_label"] != UNKNOWN).to_numpy()
    return float((model.predict()[labelled] == truth[labelled]).mean())


class _Recorder(pl.Callback):
    """Learning rate and label codes of every training step, per stage."""

    def __init__(self):
        self.lrs: list[list[float]] = []
        self.labels: list[list[np.ndarray]] = []
        self.total_steps: list[int] = []

    def on_train_start(self, trainer, pl_module):
        self.lrs.append([])
        self.labels.append([])
        self.total_steps.append(int(trainer.estimated_stepping_batches))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs[-1].append(trainer.optimizers[0].param_groups[0]["lr"])
        labels = merge_minibatches(batch)[REGISTRY_KEYS.LABELS_KEY].view(-1)
        self.labels[-1].append(labels.numpy())


def _record_training(model: RANKFORMER, **train_kwargs) -> _Recorder:
    """Train ``model`` without a progress bar, recording every step."""
    recorder = _Recorder()
    model.train(enable_progress_bar=False, callbacks=[recorder], **train_kwargs)
    return recorder


def test_pretrain_then_train():
    model, adata = _new_model()
    head = {k: v.clone() for k, v in model.module.classifier.state_dict().items()}
    embedding = model.module.gene_embedding.weight.detach().clone()
    recorder = _Recorder()
    model.pretrain(max_epochs=4, batch_size=32, enable_progress_bar=False, callbacks=[recorder])
    history = model.pretrain_history_
    losses = _curve(history, "masked_gene_loss_train")
    assert losses[-1] < losses[0]
    # Pretraining validates on the held-out cells' masked-gene loss.
    np.testing.assert_allclose(
        _curve(history, "validation_loss"),
        _curve(history, "masked_gene_loss_validation"),
    )
    # The masked-gene term alone, on every cell (the unlabelled ones included).
    assert _curve(history, "classification_loss_train").max() == 0.0
    assert (np.concatenate(recorder.labels[0]) >= model.n_labels).any()
    # The head does not move, so the model is no classifier yet and is not calibrated.
    assert not model.is_trained_ and model.novelty_threshold_ is None
    assert not torch.equal(model.module.gene_embedding.weight, embedding)
    for key, value in model.module.classifier.state_dict().items():
        assert torch.equal(value, head[key]), key
    model.train(max_epochs=5, batch_size=32, lr=3e-3, enable_progress_bar=False)
    assert model.is_trained_ and "accuracy_validation" in model.history
    assert model.novelty_threshold_ is not None
    assert model.pretrain_history_ is history
    assert _labelled_accuracy(model, adata) > 0.8


def test_pretrain_stage_inside_train():
    model, _ = _new_model()
    recorder = _record_training(model, max_epochs=3, pretrain_epochs=2, batch_size=32)
    assert len(recorder.lrs) == 2, "a pretraining stage, then the classifier's"
    assert len(model.pretrain_history_["masked_gene_loss_train"]) == 2
    assert len(model.history["classification_loss_train"]) == 3
    assert model.is_trained_ and model.novelty_threshold_ is not None
    # Without mlm_weight the classifier's stage reads labelled cells only.
    assert (np.concatenate(recorder.labels[1]) < model.n_labels).all()


def test_balanced_epochs_cost_the_labelled_cells():
    adata = make_counts_adata()
    # Imbalanced labels: type T0 keeps its labelled cells, the others one in six.
    labels = adata.obs["train_label"].astype(str).to_numpy()
    thinned = (labels != "T0") & (labels != UNKNOWN) & (np.arange(adata.n_obs) % 6 != 0)
    adata.obs["train_label"] = np.where(thinned, UNKNOWN, labels)
    RANKFORMER.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    model = RANKFORMER(adata, **tiny_kwargs(RANKFORMER))
    recorder = _record_training(model, max_epochs=2, batch_size=16)
    n_labelled = (adata.obs["train_label"] != UNKNOWN).sum()
    n_train = n_labelled - round(0.1 * n_labelled)  # about 10 % of each type held out
    steps = len(recorder.labels[0]) / 2
    assert abs(steps - np.ceil(n_train / 16)) <= 1, (steps, n_train)
    assert recorder.total_steps[0] == len(recorder.labels[0])
    # Still class-balanced: T0 is 40 of the 60 labelled cells, but about a quarter of
    # the cells drawn.
    drawn = np.concatenate(recorder.labels[0])
    share_t0 = (drawn == list(model.cell_types).index("T0")).mean()
    assert 0.1 < share_t0 < 0.45, share_t0
    # The user's own limit wins.
    recorder = _record_training(model, max_epochs=2, batch_size=16, limit_train_batches=1)
    assert len(recorder.labels[0]) == 2


def test_pretrain_rejects_masking_nothing():
    model, _ = _new_model()
    with pytest.raises(ValueError, match="mask_prob"):
        model.pretrain(max_epochs=1, mask_prob=0.0, enable_progress_bar=False)


def test_mlm_weight_brings_unlabelled_cells_and_the_masked_gene_term():
    model, _ = _new_model()
    recorder = _Recorder()
    model.train(
        max_epochs=2,
        batch_size=32,
        mlm_weight=0.5,
        enable_progress_bar=False,
        callbacks=[recorder],
    )
    labels = np.concatenate(recorder.labels[0])
    assert (labels >= model.n_labels).any() and (labels < model.n_labels).any()
    history = model.history
    assert _curve(history, "masked_gene_loss_train").min() > 0
    # The logged weighted terms add up to the training loss.
    np.testing.assert_allclose(
        _curve(history, "train_loss"),
        _curve(history, "classification_loss_train") + _curve(history, "masked_gene_loss_train"),
        rtol=1e-5,
    )
    # A query model masks by default (its LayerNorms adapt without labels).
    query = model.adata[model.adata.obs["batch"] == "b1"].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        query_model = RANKFORMER.load_query_data(query, model)
        query_model.train(max_epochs=1, batch_size=32, enable_progress_bar=False)
    assert _curve(query_model.history, "masked_gene_loss_train").min() > 0


def test_learning_rate_warms_up_then_follows_a_cosine_every_step():
    model, _ = _new_model()
    recorder = _Recorder()
    model.train(
        max_epochs=4,
        batch_size=16,
        lr=2e-3,
        warmup_fraction=0.25,
        early_stopping=False,
        enable_progress_bar=False,
        callbacks=[recorder],
    )
    lrs, total = np.array(recorder.lrs[0]), recorder.total_steps[0]
    assert len(lrs) == total
    warmup = round(0.25 * total)
    steps = np.arange(total)
    expected = np.where(
        steps < warmup,
        (steps + 1) / warmup,
        0.5 * (1 + np.cos(np.pi * (steps - warmup) / (total - warmup))),
    )
    np.testing.assert_allclose(lrs, 2e-3 * expected, rtol=1e-6)


def test_loss_weights_are_set_by_the_stages():
    model, _ = _new_model()
    for name in ("mlm_weight", "classification_weight"):
        with pytest.raises(TypeError, match=name):
            model.train(max_epochs=1, plan_kwargs={name: 1.0})
    with pytest.raises(TypeError, match="classification_weight"):
        model.train(max_epochs=1, classification_weight=0.0)
    with pytest.raises(ValueError, match="mlm_weight"):
        model.train(max_epochs=1, mlm_weight=-1.0)


def test_interpret_is_unavailable_for_rank_tokens(trained):
    model, _ = trained
    with pytest.raises(ValueError, match="rank order of genes, not their values"):
        model.interpret(groupby="cell_type", target="T1", n_samples=2)


def test_value_bins_and_supervised_only_training():
    model, adata = _new_model(n_bins=5)
    assert model.module.value_embedding is not None
    model.train(max_epochs=3, batch_size=32, mlm_weight=0.0, enable_progress_bar=False)
    assert model.tokenize(indices=[0]).bins.max() <= 5
    assert _labelled_accuracy(model, adata) > 0.8
    # Without the masked-gene loss nothing is masked: the term stays 0.
    assert _curve(model.history, "masked_gene_loss_train").max() == 0.0
