"""Genes a batch did not measure: found by ``unmeasured_genes`` and left out of the encoder
of every model with ``skip_unmeasured_genes`` (``UnmeasuredGenesMixin``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_counts_adata, tiny_kwargs, train_kwargs, zero_filled
from scvi import REGISTRY_KEYS

import celltyper.model
from celltyper.model.base import UnmeasuredGenesMixin
from celltyper.model.base._centering import unmeasured_genes

MASKING_MODELS = [
    name
    for name in celltyper.model.__all__
    if issubclass(getattr(celltyper.model, name), UnmeasuredGenesMixin)
]
#: Genes 60 and above are zero-filled in batch b0.
PANEL = slice(60, None)


def test_every_log_expression_model_and_scatlasvae_skip_unmeasured_genes():
    assert set(MASKING_MODELS) >= {"SCNYM", "CELLULAR", "SCATLASVAE"}


def test_unmeasured_genes_need_zero_counts_where_the_other_batches_expect_ten():
    # Batch 0 (40 counts) has no count of gene 0, which holds 20 of batch 1's 30 counts:
    # 40 * 20 / 30 = 26.7 expected. Gene 2 is zero in batch 0 too, but expects 2.7 only.
    counts = np.array([[0, 20, 0], [0, 20, 0], [10, 0, 1], [10, 8, 1]], dtype=np.float32)
    codes = np.array([0, 0, 1, 1])
    missing = unmeasured_genes(counts, codes, 2)
    np.testing.assert_array_equal(missing, [[True, False, False], [False, False, False]])
    assert not unmeasured_genes(counts, np.zeros(4, dtype=int), 1).any()


def _zero_filled_panel(raw, batch="b0", genes=PANEL):
    return zero_filled(raw, batch, genes)


def _swap_two_panel_genes(adata):
    """The same cells with two of the panel's genes swapped: every total is unchanged, so
    only genes outside the panel can tell the two apart."""
    swapped = adata.copy()
    x = swapped.X.toarray()
    x[:, [60, 61]] = x[:, [61, 60]]
    swapped.X = type(adata.X)(x)
    return swapped


@pytest.fixture(scope="module", params=MASKING_MODELS)
def masked_model(request):
    model_cls = getattr(celltyper.model, request.param)
    adata = _zero_filled_panel(make_counts_adata(n_batches=2, cells_per=20))
    model_cls.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    model = model_cls(adata, **tiny_kwargs(model_cls))
    model.train(**train_kwargs(model_cls, max_epochs=1))
    return model


def test_encoder_skips_genes_a_batch_did_not_measure(masked_model):
    adata = masked_model.adata
    assert masked_model.unread_genes == list(adata.var_names[PANEL])
    assert "skips 40 genes" in masked_model._model_summary_string
    b1 = adata[(adata.obs["batch"] == "b1").to_numpy()].copy()
    assert not np.array_equal(b1.X[:, 60].toarray(), b1.X[:, 61].toarray())
    latent = masked_model.get_latent_representation(b1)
    np.testing.assert_allclose(
        masked_model.get_latent_representation(_swap_two_panel_genes(b1)), latent, atol=1e-5
    )
    # Inference reads sparse rows; the dense path of training gives the same latent.
    module = masked_model.module.eval()
    codes = np.asarray(masked_model.get_from_registry(b1, REGISTRY_KEYS.BATCH_KEY))
    dense = {
        REGISTRY_KEYS.X_KEY: torch.as_tensor(b1.X.toarray()),
        REGISTRY_KEYS.BATCH_KEY: torch.as_tensor(codes.reshape(-1, 1)),
    }
    with torch.no_grad():
        np.testing.assert_allclose(module.embed(dense).numpy(), latent, atol=1e-4)


def test_genes_measured_everywhere_are_all_read(masked_model):
    model_cls = type(masked_model)
    adata = make_counts_adata(n_batches=2, cells_per=20)
    model_cls.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    assert model_cls(adata, **tiny_kwargs(model_cls)).unread_genes == []


def test_skip_unmeasured_genes_false_reads_every_gene_and_bad_values_raise(masked_model):
    model_cls, adata = type(masked_model), masked_model.adata
    reading_all = model_cls(adata, skip_unmeasured_genes=False, **tiny_kwargs(model_cls))
    assert reading_all.unread_genes == []
    assert "skips" not in reading_all._model_summary_string
    with pytest.raises(TypeError, match="skip_unmeasured_genes must be True or False, got 'yes'"):
        model_cls(adata, skip_unmeasured_genes="yes", **tiny_kwargs(model_cls))


def test_gene_mask_is_saved_and_files_without_it_read_every_gene(masked_model, tmp_path):
    model_cls, adata = type(masked_model), masked_model.adata
    masked_model.save(tmp_path / "m")
    loaded = model_cls.load(tmp_path / "m", adata=adata)
    assert loaded.unread_genes == masked_model.unread_genes
    older = {k: v for k, v in masked_model.module.state_dict().items() if k != "encoder_genes"}
    fresh = model_cls(adata, **tiny_kwargs(model_cls))
    assert fresh.unread_genes
    fresh.module.load_state_dict(older)
    assert fresh.unread_genes == []


def test_query_surgery_keeps_the_reference_mask(masked_model):
    adata = masked_model.adata
    query = make_counts_adata(n_batches=2, cells_per=10, seed=3)
    query.obs["batch"] = query.obs["batch"].astype(str) + "-query"
    query.obs["train_label"] = "Unknown"
    mapped = type(masked_model).load_query_data(query, masked_model)
    assert mapped.unread_genes == list(adata.var_names[PANEL])
