"""Property-based inputs: a clear error or a right answer, and the user's object untouched.

Each generated AnnData mixes matrix formats (dense, CSR and CSC
matrices and arrays: anndata 0.12 refuses COO) and dtypes, counts or log-normalised values,
NaN / inf / negative entries, empty cells and genes, single cells, duplicated names,
label and batch columns of every kind, and Ensembl IDs or symbols; each query overlaps
the reference's genes fully, partly or not at all. For each one, ``setup_anndata``,
``train(max_epochs=1)``, ``predict`` and ``load_query_data`` either work (finite
probabilities that sum to 1) or raise ``ValueError``, ``KeyError`` or ``TypeError`` with
a message naming what is wrong; the generated objects never change, beyond the
``_scvi_*`` registration entries of a successful ``setup_anndata``.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import tiny_kwargs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import celltyper.model

MODELS = [getattr(celltyper.model, name) for name in celltyper.model.__all__]
EXAMPLES = 200
#: What a clear error names: the argument, the object or the values at fault.
NAMED = re.compile(
    r"adata|query|reference|labels?_key|batch_key|label|batch|layer|obs|var|gene|cell|"
    r"counts|value|NaN|inf|negative|empty|duplicate|class|type",
    re.IGNORECASE,
)
OUTCOMES: Counter = Counter()
MESSAGES: Counter = Counter()


def _matrix(values: np.ndarray, fmt: str):
    return {
        "dense": lambda v: v,
        "csr": sp.csr_matrix,
        "csc": sp.csc_matrix,
        "csr_array": sp.csr_array,
        "csc_array": sp.csc_array,
    }[fmt](values)


def _log_normalise(values: np.ndarray) -> np.ndarray:
    totals = np.maximum(values.sum(axis=1, keepdims=True), 1)
    return np.log1p(values / totals * 1e4).astype(np.float32)


@st.composite
def user_data(draw) -> tuple[ad.AnnData, ad.AnnData]:
    """A reference AnnData and a query, built from several of the hazards above."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    # The usual input first: hypothesis leans towards the first choices.
    n_cells = draw(st.sampled_from([30, 12, 2, 1]))
    n_genes = draw(st.sampled_from([20, 3, 1]))
    counts = rng.poisson(rng.gamma(0.8, 2.0, size=(1, n_genes)), size=(n_cells, n_genes))
    values = counts.astype(draw(st.sampled_from(["int64", "float32", "float64"])))
    lognormalised = draw(st.booleans())
    if lognormalised:
        values = _log_normalise(values)
    hazards = ["empty_cell", "empty_gene", "nan", "inf", "negative"]
    for hazard in draw(st.lists(st.sampled_from(hazards), max_size=2, unique=True)):
        if hazard in ("nan", "inf", "negative"):
            values = values.astype(np.float32)
            values[rng.integers(n_cells), rng.integers(n_genes)] = {
                "nan": np.nan, "inf": np.inf, "negative": -1.0
            }[hazard]  # fmt: skip
        elif hazard == "empty_cell":
            values[rng.integers(n_cells)] = 0
        else:
            values[:, rng.integers(n_genes)] = 0
    ensembl = draw(st.booleans())
    genes = [f"ENSG{i:011d}" if ensembl else f"GENE{i}" for i in range(n_genes)]
    cells = [f"cell{i}" for i in range(n_cells)]
    if draw(st.booleans()) and n_cells > 1:
        cells[1] = cells[0]
    if draw(st.booleans()) and n_genes > 1:
        genes[1] = genes[0]
    n_types = draw(st.sampled_from([3, 2, 1]))
    labels = rng.integers(0, n_types, n_cells)
    label_kind = draw(st.sampled_from(["str", "categorical", "int", "nan"]))
    # "int": numbers are refused with a TypeError naming the column and its dtype.
    obs_labels: object = np.array([f"T{c}" for c in labels], dtype=object)
    if label_kind == "int":
        obs_labels = labels
    elif label_kind == "categorical":
        obs_labels = pd.Categorical(obs_labels)
    elif label_kind == "nan":
        obs_labels[rng.random(n_cells) < 0.3] = np.nan
    batch_kind = draw(st.sampled_from(["two", "one", "per_cell"]))
    batch = {"one": ["b0"] * n_cells, "two": [f"b{i % 2}" for i in range(n_cells)],
             "per_cell": [f"b{i}" for i in range(n_cells)]}[batch_kind]  # fmt: skip
    obs = pd.DataFrame({"label": obs_labels, "batch": batch}, index=cells)
    # anndata 0.12 holds no COO matrix: scipy sparse arrays instead.
    fmt = draw(st.sampled_from(["dense", "csr", "csc", "csr_array", "csc_array"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicated names
        adata = ad.AnnData(_matrix(values, fmt), obs=obs, var=pd.DataFrame(index=genes))
    overlap = draw(st.sampled_from(["all", "half", "none"]))
    query_genes = {
        "all": genes,
        "half": genes[: max(1, n_genes // 2)] + [f"NEW{i}" for i in range(n_genes // 2)],
        "none": [f"OTHER{i}" for i in range(n_genes)],
    }[overlap]
    query_values = rng.poisson(1.0, size=(8, len(query_genes))).astype(np.float32)
    if lognormalised:  # the same kind of values as the reference
        query_values = _log_normalise(query_values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        query = ad.AnnData(
            sp.csr_matrix(query_values),
            obs=pd.DataFrame({"batch": ["q"] * 8}, index=[f"q{i}" for i in range(8)]),
            var=pd.DataFrame(index=query_genes),
        )
    return adata, query


def _dense(x) -> np.ndarray:
    return np.array(x.todense() if sp.issparse(x) else x, copy=True)


def deep_snapshot(adata: ad.AnnData) -> dict:
    x = adata.X
    return {
        "X": (type(x), x.dtype, _dense(x)),
        "layers": {
            k: np.array(v.todense() if sp.issparse(v) else v) for k, v in adata.layers.items()
        },
        "obs": adata.obs.copy(deep=True),
        "var": adata.var.copy(deep=True),
        "obsm": {k: np.array(v, copy=True) for k, v in adata.obsm.items()},
        "uns": set(adata.uns),
        "names": (adata.obs_names.copy(), adata.var_names.copy()),
    }


def assert_same(adata: ad.AnnData, before: dict) -> None:
    kind, dtype, values = before["X"]
    x = adata.X
    assert type(x) is kind and x.dtype == dtype
    np.testing.assert_array_equal(_dense(x), values)
    assert set(adata.layers) == set(before["layers"])
    registration = [c for c in adata.obs.columns if str(c).startswith("_scvi_")]
    pd.testing.assert_frame_equal(adata.obs.drop(columns=registration), before["obs"])
    pd.testing.assert_frame_equal(adata.var, before["var"])
    assert set(adata.obsm) == set(before["obsm"])
    for key, value in before["obsm"].items():
        np.testing.assert_array_equal(np.asarray(adata.obsm[key]), value)
    assert {k for k in adata.uns if not str(k).startswith("_scvi")} == before["uns"]
    assert adata.obs_names.equals(before["names"][0])
    assert adata.var_names.equals(before["names"][1])


def _check_probabilities(probabilities: pd.DataFrame) -> None:
    values = probabilities.to_numpy()
    assert np.isfinite(values).all()
    np.testing.assert_allclose(values.sum(axis=1), 1.0, atol=1e-5)


def _run(model_cls, adata: ad.AnnData, query: ad.AnnData) -> str:
    model_cls.setup_anndata(adata, labels_key="label", batch_key="batch")
    model = model_cls(adata, **tiny_kwargs(model_cls))
    options = {"max_epochs": 1, "batch_size": 8, "enable_progress_bar": False}
    if model_cls.__name__ == "SCPRETRAIN":
        options["pretrain_epochs"] = 1
    model.train(**options)
    _check_probabilities(model.predict(soft=True))
    query_model = model_cls.load_query_data(query, model)
    _check_probabilities(query_model.predict(soft=True))
    return "worked"


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=user_data(), model_index=st.integers(0, len(MODELS) - 1))
def test_any_input_gives_a_clear_error_or_a_right_answer(data, model_index):
    adata, query = data
    model_cls = MODELS[model_index]
    before, before_query = deep_snapshot(adata), deep_snapshot(query)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            outcome = _run(model_cls, adata, query)
        except (ValueError, KeyError, TypeError) as err:
            message = str(err)
            assert message and NAMED.search(message), (type(err).__name__, message)
            outcome = type(err).__name__
            MESSAGES[f"{outcome}: {message[:90]}"] += 1
    OUTCOMES[outcome] += 1
    assert_same(adata, before)
    assert_same(query, before_query)


def test_fuzzing_reports_its_outcomes():
    """Runs after the property test (same module): what the inputs gave, by outcome."""
    if not OUTCOMES:
        pytest.skip("the property test did not run in this session")
    print(f"\nfuzzed inputs: {sum(OUTCOMES.values())}, outcomes: {dict(OUTCOMES)}")
    for message, count in MESSAGES.most_common():
        print(f"{count:4d}  {message}")
    assert sum(OUTCOMES.values()) >= EXAMPLES
