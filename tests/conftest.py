"""Shared fixtures: a seeded synthetic single-cell generator and small model settings.

``make_counts_adata`` plants cell types with distinct expression profiles (each type also
has its own block of marker genes), draws Poisson counts and applies a multiplicative
batch effect. Batch ``b0`` is the labelled reference; every other batch and the planted
novel type are unlabelled (``train_label == "Unknown"``).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

# The test machine has 2 cores shared with other jobs: several torch threads fighting over
# them make a small training step ~25x slower than one thread.
torch.set_num_threads(1)

NOVEL_TYPE = "Novel"
UNKNOWN = "Unknown"

#: Constructor kwargs that keep each model small, by class name (merged over the generic
#: defaults below, which are only passed when the constructor accepts them).
_TINY_BY_MODEL: dict[str, dict] = {
    "SCNYM": {"n_hidden": 32},
    "CELLULAR": {"n_hidden": (32, 16), "n_latent": 8, "classifier_hidden": 32},
    "SCATLASVAE": {"n_hidden": 32, "n_latent": 8},
    "SCPRETRAIN": {"n_hidden": (), "n_latent": 16, "classifier_hidden": 16},
    "RANKFORMER": {"d_model": 16, "n_heads": 2, "d_ff": 32, "head_hidden": 16, "n_tokens": 32},
}
_TINY_GENERIC: dict = {"n_hidden": 32, "n_latent": 8}

#: Keyword arguments of ``train`` for the contract suite.
TRAIN_KWARGS: dict = {"max_epochs": 2, "enable_progress_bar": False}
#: Per-model additions to ``TRAIN_KWARGS``: CELLULAR's contrastive stage needs a few
#: optimizer steps per epoch to get anywhere in two epochs on 160 labelled cells.
_TRAIN_BY_MODEL: dict[str, dict] = {
    "CELLULAR": {"batch_size": 32},
    # Two epochs: minibatches of 32 and a larger step let the linear heads learn.
    "SCATLASVAE": {"batch_size": 32, "lr": 1e-2},
    # Pretraining kept to 2 epochs per phase; small minibatches for the fine-tuning.
    "SCPRETRAIN": {"batch_size": 16, "lr": 1e-2, "pretrain_epochs": 2},
    # Reference training reads only the ~144 labelled training cells: small minibatches
    # and a larger step give the transformer enough steps in two epochs.
    "RANKFORMER": {"batch_size": 16, "lr": 3e-3},
}


def make_counts_adata(
    n_types: int = 4,
    n_batches: int = 2,
    cells_per: int = 40,
    n_genes: int = 100,
    novel_type: bool = True,
    seed: int = 0,
    marker_boost: float = 6.0,
) -> ad.AnnData:
    """Synthetic counts with planted cell types, a novel type and a batch effect.

    Parameters
    ----------
    n_types
        Reference cell types ``T0 .. T{n_types-1}``.
    n_batches
        Batches ``b0 .. b{n_batches-1}``; each holds ``cells_per`` cells of every type.
    cells_per
        Cells per type and batch.
    n_genes
        Genes ``g0 ..``.
    novel_type
        Add the type :data:`NOVEL_TYPE`, unlabelled everywhere.
    seed
        Seed of everything.
    marker_boost
        Added to the mean of each type's marker genes.

    Returns
    -------
    AnnData with CSR float32 counts in ``X``; ``obs``: ``cell_type``, ``batch``,
    ``train_label``; ``var["marker_of"]``: the type a gene marks ("" for none).
    """
    rng = np.random.default_rng(seed)
    types = [f"T{i}" for i in range(n_types)] + ([NOVEL_TYPE] if novel_type else [])
    n_profiles = len(types)
    profiles = rng.gamma(shape=0.5, scale=2.0, size=(n_profiles, n_genes))
    block = max(1, n_genes // (2 * n_profiles))
    marker_of = np.full(n_genes, "", dtype=object)
    for t, name in enumerate(types):
        genes = slice(t * block, (t + 1) * block)
        profiles[t, genes] += marker_boost
        marker_of[genes] = name
    # Multiplicative batch effect: gene-wise log-normal factors times a depth factor.
    batch_factors = np.ones((n_batches, n_genes))
    for b in range(1, n_batches):
        batch_factors[b] = rng.lognormal(0.0, 0.3, size=n_genes) * (1.0 + 0.5 * b)

    blocks, cell_types, batches = [], [], []
    for b in range(n_batches):
        for t, name in enumerate(types):
            mu = profiles[t] * batch_factors[b]
            blocks.append(rng.poisson(mu, size=(cells_per, n_genes)))
            cell_types += [name] * cells_per
            batches += [f"b{b}"] * cells_per
    X = sp.csr_matrix(np.vstack(blocks).astype(np.float32))
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(cell_types, categories=types),
            "batch": pd.Categorical(batches, categories=[f"b{b}" for b in range(n_batches)]),
        },
        index=[f"c{i}" for i in range(X.shape[0])],
    )
    labelled = (obs["batch"] == "b0").to_numpy() & (obs["cell_type"] != NOVEL_TYPE).to_numpy()
    obs["train_label"] = np.where(labelled, obs["cell_type"].astype(str), UNKNOWN)
    var = pd.DataFrame({"marker_of": marker_of}, index=[f"g{i}" for i in range(n_genes)])
    return ad.AnnData(X=X, obs=obs, var=var)


def zero_filled(adata: ad.AnnData, batch: str, genes: slice) -> ad.AnnData:
    """A copy of ``adata`` with ``genes`` set to 0 in every cell of ``obs["batch"] == batch``
    (a smaller gene panel filled with zeros), ``X`` of the same type."""
    out = adata.copy()
    x = out.X.toarray()
    x[(out.obs["batch"] == batch).to_numpy(), genes] = 0
    out.X = type(adata.X)(x)
    return out


def log_normalize(adata: ad.AnnData, target_sum: float = 1e6) -> ad.AnnData:
    """A copy with ``X = log1p(counts per million)`` (dense float32)."""
    out = adata.copy()
    x = np.asarray(out.X.todense() if sp.issparse(out.X) else out.X, dtype=np.float64)
    totals = x.sum(axis=1, keepdims=True)
    totals[totals == 0] = 1.0
    out.X = np.log1p(x / totals * target_sum).astype(np.float32)
    return out


def _settings_of(model_cls, by_model: dict[str, dict]) -> dict:
    """The settings of ``model_cls`` or, for a subclass (e.g. a test's variant of a model),
    of its nearest parent that has some."""
    for cls in model_cls.__mro__:
        if cls.__name__ in by_model:
            return by_model[cls.__name__]
    return {}


def tiny_kwargs(model_cls) -> dict:
    """Small constructor kwargs for ``model_cls`` (only those its ``__init__`` accepts)."""
    params = inspect.signature(model_cls.__init__).parameters
    kwargs = {k: v for k, v in _TINY_GENERIC.items() if k in params}
    kwargs.update(_settings_of(model_cls, _TINY_BY_MODEL))
    return kwargs


def train_kwargs(model_cls=None, **overrides) -> dict:
    """Keyword arguments of ``train`` for a short run (2 epochs, no progress bar)."""
    by_model = _settings_of(model_cls, _TRAIN_BY_MODEL) if model_cls is not None else {}
    return {**TRAIN_KWARGS, **by_model, **overrides}


# -- snapshot helpers: the user's object must never change ---------------------------------
def _dense(x):
    return np.asarray(x.todense() if sp.issparse(x) else x)


def snapshot(adata: ad.AnnData) -> dict:
    """What must stay identical in a user's AnnData across a celltyper call."""
    return {
        "X": None if adata.X is None else _dense(adata.X).copy(),
        "X_type": type(adata.X),
        "obs": adata.obs.copy(),
        "var_names": adata.var_names.copy(),
        "obs_names": adata.obs_names.copy(),
        "uns_keys": set(adata.uns.keys()),
        "obsm_keys": set(adata.obsm.keys()),
        "layers": set(adata.layers.keys()),
    }


def assert_unchanged(adata: ad.AnnData, before: dict) -> None:
    """Fail when ``adata`` differs from its :func:`snapshot`."""
    assert type(adata.X) is before["X_type"]
    if before["X"] is None:
        assert adata.X is None
    else:
        np.testing.assert_array_equal(_dense(adata.X), before["X"])
    assert list(adata.obs.columns) == list(before["obs"].columns)
    pd.testing.assert_frame_equal(adata.obs, before["obs"])
    assert adata.var_names.equals(before["var_names"])
    assert adata.obs_names.equals(before["obs_names"])
    assert set(adata.uns.keys()) == before["uns_keys"]
    assert set(adata.obsm.keys()) == before["obsm_keys"]
    assert set(adata.layers.keys()) == before["layers"]
    assert not any(str(c).startswith("_scvi") for c in adata.obs.columns)
    assert not any(str(k).startswith("_scvi") for k in adata.uns.keys())


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def _counts_adata_cached() -> ad.AnnData:
    return make_counts_adata()


@pytest.fixture
def counts_adata(_counts_adata_cached) -> ad.AnnData:
    """A fresh copy of the default synthetic dataset (4 types + novel, 2 batches, 100 genes)."""
    return _counts_adata_cached.copy()


@pytest.fixture
def counts_adata_factory():
    """``make_counts_adata`` itself, for tests that need other sizes."""
    return make_counts_adata


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """``../shared/data`` next to the repository; skips the test when it is absent."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip("../shared/data not present")
    return path


@pytest.fixture
def disk_reads(monkeypatch) -> list:
    """Every read of a backed sparse matrix, recorded: ``slice(start, stop)`` for a
    contiguous range (celltyper's direct reader or anndata's slicing), the row array for
    a scattered read."""
    from anndata._core.sparse_dataset import BaseCompressedSparseDataset

    from celltyper._utils import _matrix, _rows

    reads: list = []
    original_range = _matrix.read_row_range
    original_getitem = BaseCompressedSparseDataset.__getitem__

    def read_range(matrix, start, stop):
        if isinstance(matrix, BaseCompressedSparseDataset):
            reads.append(slice(int(start), int(stop)))
        return original_range(matrix, start, stop)

    def getitem(self, index):
        reads.append(index[0] if isinstance(index, tuple) else index)
        return original_getitem(self, index)

    for module in (_matrix, _rows):
        monkeypatch.setattr(module, "read_row_range", read_range)
    monkeypatch.setattr(BaseCompressedSparseDataset, "__getitem__", getitem)
    return reads


def read_size(index) -> int:
    """Rows of one read recorded by :func:`disk_reads`."""
    if isinstance(index, slice):
        return index.stop - index.start
    return len(np.atleast_1d(np.asarray(index)))
