"""New data whose genes look unmeasured (zero-filled) get a warning from every model
(``ZeroFilledGenesMixin``)."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import (
    assert_unchanged,
    make_counts_adata,
    snapshot,
    tiny_kwargs,
    train_kwargs,
    zero_filled,
)

import celltyper.model
from celltyper.model.base import UnmeasuredGenesMixin
from celltyper.model.base import _zero_filled as zero_filled_module
from celltyper.model.base._centering import zero_against_expected
from celltyper.model.base._zero_filled import gene_sums_and_detection

#: Genes zero-filled in the new data's batch b1: the first 20 hold each type's markers,
#: so every one of them expects far more than 10 counts there.
FILLED = slice(0, 20)
MESSAGE = "look unmeasured"


def test_zero_against_expected_needs_ten_expected_counts():
    # Reference shares 0.5, 0.3, 0.2 and a group of 40 counts: 20, 12 and 8 expected.
    reference = np.array([50.0, 30.0, 20.0])
    group = np.array([0.0, 0.0, 40.0])
    np.testing.assert_array_equal(zero_against_expected(group, reference), [True, True, False])
    np.testing.assert_array_equal(
        zero_against_expected(group, reference, min_expected=15), [True, False, False]
    )
    # A group without any count tells nothing.
    np.testing.assert_array_equal(zero_against_expected(np.zeros(3), reference), [False] * 3)


def test_gene_detection_is_the_share_of_cells_with_a_count():
    x = np.array([[0, 1, 0], [2, 0, 0], [3, 4, 0], [0, 5, 0]], dtype=np.float32)
    expected = [0.5, 0.75, 0.0]
    for matrix in (x, sp.csr_matrix(x)):
        sums, detection = gene_sums_and_detection(matrix)
        np.testing.assert_allclose(detection, expected)
        np.testing.assert_allclose(sums, [5, 10, 0])


def _zero_filled(adata, batch="b1", genes=FILLED):
    return zero_filled(adata, batch, genes)


def _messages(record) -> list[str]:
    return [str(w.message) for w in record if MESSAGE in str(w.message)]


@pytest.fixture(scope="module")
def reference_data():
    return make_counts_adata(n_batches=2, cells_per=20)


@pytest.fixture(scope="module", params=celltyper.model.__all__)
def trained(request, reference_data):
    model_cls = getattr(celltyper.model, request.param)
    adata = reference_data.copy()
    model_cls.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    model = model_cls(adata, **tiny_kwargs(model_cls))
    model.train(**train_kwargs(model_cls, max_epochs=1))
    return model


def test_training_stores_the_reference_gene_totals(trained, reference_data):
    x = reference_data.X
    np.testing.assert_allclose(
        trained.reference_gene_sums_, np.asarray(x.sum(axis=0)).ravel(), rtol=1e-5
    )
    np.testing.assert_allclose(
        trained.reference_gene_detection_, np.asarray((x > 0).mean(axis=0)).ravel(), rtol=1e-6
    )


def test_zero_filled_genes_of_new_data_are_named_in_a_warning(trained, reference_data):
    query = _zero_filled(reference_data)
    before = snapshot(query)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trained.predict(query)
    (message,) = _messages(record)
    assert message.startswith("20 genes the model reads have no count in every cell of batch")
    assert "'b1' (obs['batch'])" in message
    assert re.search(r"e\.g\. g0, g1, g2, g3, g4\)", message)
    assert_unchanged(query, before)


def test_new_data_as_measured_get_no_warning(trained, reference_data):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trained.predict(reference_data)
        # Genes absent from var are the gene alignment's to report, not this check's.
        trained.predict(reference_data[:, 20:].copy())
    assert _messages(record) == []


def test_without_a_batch_column_the_data_are_one_group(trained, reference_data):
    query = _zero_filled(reference_data)[(reference_data.obs["batch"] == "b1").to_numpy()]
    del query.obs["batch"]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trained.predict(query)
    (message,) = _messages(record)
    assert "no count in every cell of the adata, although" in message


def test_the_gene_totals_survive_save_load_and_query_mapping(trained, reference_data, tmp_path):
    trained.save(tmp_path / "model", overwrite=True)
    query = _zero_filled(reference_data)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        mapped = type(trained).load_query_data(query, str(tmp_path / "model"))
    assert len(_messages(record)) == 1
    np.testing.assert_array_equal(mapped.reference_gene_sums_, trained.reference_gene_sums_)
    np.testing.assert_array_equal(
        mapped.reference_gene_detection_, trained.reference_gene_detection_
    )


def _zero_filled_messages(model, data) -> list[str]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model.predict(data)
    return _messages(record)


def test_models_saved_without_the_totals_are_not_checked(trained, reference_data, monkeypatch):
    monkeypatch.setattr(trained, "reference_gene_sums_", None)
    assert _zero_filled_messages(trained, _zero_filled(reference_data)) == []


def test_genes_seen_in_few_reference_cells_are_not_checked(trained, reference_data, monkeypatch):
    # A gene switched off by a condition is seen in few reference cells, unlike a panel's.
    detection = trained.reference_gene_detection_
    few = np.where(np.arange(len(detection)) < 10, 0.04, detection)
    monkeypatch.setattr(trained, "reference_gene_detection_", few)
    (message,) = _zero_filled_messages(trained, _zero_filled(reference_data))
    assert message.startswith("10 genes") and "e.g. g10, g11" in message


@pytest.mark.parametrize(
    "name",
    [
        n
        for n in celltyper.model.__all__
        if issubclass(getattr(celltyper.model, n), UnmeasuredGenesMixin)
    ],
)
def test_genes_the_encoder_already_skips_are_not_reported(name):
    # b0 did not measure the panel in training, so the encoder skips it: new data without
    # it are read exactly as the reference was.
    model_cls = getattr(celltyper.model, name)
    adata = _zero_filled(make_counts_adata(n_batches=2, cells_per=20), batch="b0")
    model_cls.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    model = model_cls(adata, **tiny_kwargs(model_cls))
    model.train(**train_kwargs(model_cls, max_epochs=1))
    assert model.unread_genes[:3] == ["g0", "g1", "g2"]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model.predict(_zero_filled(adata, batch="b1"))
    assert _messages(record) == []
    assert "skip_unmeasured_genes then leaves" in model._zero_filled_advice


def test_large_data_are_checked_on_a_sample_of_cells(trained, reference_data, monkeypatch):
    monkeypatch.setattr(zero_filled_module, "ZERO_FILLED_SAMPLE_ROWS", 30)
    matrix, rows = zero_filled_module._checked_rows(reference_data.X, reference_data.n_obs)
    assert len(rows) == 30 and rows[0] == 0 and rows[-1] == reference_data.n_obs - 1
    np.testing.assert_array_equal(matrix.toarray(), reference_data.X[rows].toarray())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trained.predict(_zero_filled(reference_data))
    (message,) = _messages(record)
    assert "'b1' (obs['batch'])" in message
