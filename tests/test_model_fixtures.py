"""Saved models keep loading: every committed fixture loads and predicts as it did.

The fixtures (``tests/fixtures/models/format<N>/<MODEL>``) are written once by
``scripts/build_model_fixtures.py`` and never rewritten. A change that stops an old
fixture from loading needs a migration (``celltyper.model.base._persistence.MIGRATIONS``).
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import celltyper.model

FIXTURES = Path(__file__).parent / "fixtures"
SAVED = sorted((FIXTURES / "models").glob("format*/*"))


def test_every_model_has_a_fixture_in_the_current_format():
    from celltyper.model.base._persistence import SAVE_FORMAT

    current = {p.name for p in SAVED if p.parent.name == f"format{SAVE_FORMAT}"}
    assert current == set(celltyper.model.__all__), "run scripts/build_model_fixtures.py"


@pytest.mark.parametrize("path", SAVED, ids=lambda p: f"{p.parent.name}-{p.name}")
def test_fixture_loads_and_predicts_as_saved(path):
    cls = getattr(celltyper.model, path.name)
    adata = ad.read_h5ad(FIXTURES / "tiny_counts.h5ad")
    expected = pd.read_csv(path / "predictions.csv", index_col=0)
    model = cls.load(path, adata=adata.copy())
    soft = model.predict(adata, soft=True)
    assert list(soft.columns) == list(expected.columns)
    np.testing.assert_array_equal(soft.to_numpy().argmax(1), expected.to_numpy().argmax(1))
    np.testing.assert_allclose(soft.to_numpy(), expected.to_numpy(), rtol=1e-5, atol=1e-6)
