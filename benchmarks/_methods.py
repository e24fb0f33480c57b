"""The methods the harness compares: every celltyper model and the peers users would pick.

Every method trains transductively on one AnnData of raw counts: the reference cells
labelled in ``obs["train_label"]`` and the query cells marked ``"Unknown"`` (the
semi-supervised methods use them; the supervised peers see only the reference). A fitted
method answers :meth:`Fitted.annotate` (prediction, confidence, novelty score and novelty
flag of chosen cells) and/or :meth:`Fitted.latent` (an embedding of every cell).

celltyper models are picked up from ``celltyper.model.__all__`` and run through one
generic recipe (:func:`fit_celltyper`); :data:`RECIPES` may override its arguments per
class name, but a new model needs no entry.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._tasks import UNLABELLED

#: Epochs of every neural method under ``--quick``.
QUICK_EPOCHS = 2

#: Optional per-model overrides of the generic recipe, by class name:
#: ``{"init": {...}, "train": {...}, "init_quick": {...}, "train_quick": {...}}``; the
#: ``*_quick`` entries apply on top of the others (and of ``max_epochs=QUICK_EPOCHS``)
#: under ``--quick`` only. A model without an entry runs with its defaults.
RECIPES: dict[str, dict[str, dict]] = {
    # The full run must fit 60 minutes on 2 CPU cores (docs/benchmarks.md), so the slow
    # models get a fixed epoch budget; each budget is printed in the results' notes.
    # 256 rank tokens per cell cost ~25 CPU s per epoch on 400 cells: --quick checks the
    # wiring, so it uses 64 tokens. Its epochs read as many cells as there are labelled
    # ones (since 2026-12-08; n_types x the largest type's before): 20 of them cost
    # what 6 did on Kang and Baron.
    "RANKFORMER": {"train": {"max_epochs": 20}, "init_quick": {"n_tokens": 64}},
    # The self-supervised pretraining stages have their own epochs (default 10).
    "SCPRETRAIN": {"train_quick": {"pretrain_epochs": 2, "n_phases": 1}},
}

#: scVI / scANVI settings (those of ``benchmarks/scnym_kang.py``).
SCVI_KWARGS = {"n_layers": 2, "n_latent": 30, "gene_likelihood": "nb"}
SCVI_EPOCHS, SCANVI_EPOCHS = 100, 20
#: scPoli settings (scArches' reference-mapping tutorial).
SCPOLI_EPOCHS, SCPOLI_PRETRAIN_FRACTION = 50, 0.8
N_PCS, KNN_NEIGHBOURS = 50, 15
CELLTYPIST_P_THRESHOLD = 0.5


@dataclass
class FitInput:
    """What every method trains on."""

    adata: ad.AnnData
    batch_key: str
    seed: int
    quick: bool
    #: Work of this unit that methods of one process share (scVI for scVI and scANVI).
    shared: dict = field(default_factory=dict)

    @property
    def reference(self) -> np.ndarray:
        """Cells whose label the method may train on."""
        return (self.adata.obs["train_label"] != UNLABELLED).to_numpy()


class Fitted:
    """A trained method. Subclasses implement what the method can do."""

    #: (wall, CPU) seconds of training reused from another method of the unit, which
    #: count towards this method's training time.
    reused_seconds: tuple[float, float] = (0.0, 0.0)

    def annotate(self, indices: np.ndarray) -> pd.DataFrame:
        """Columns ``prediction``, ``confidence``, ``novelty`` and ``novel`` (1.0 / 0.0,
        NaN for a method without a default novelty threshold), one row per index."""
        raise NotImplementedError

    def latent(self) -> np.ndarray:
        """Embedding of every cell of the training AnnData."""
        raise NotImplementedError


@dataclass
class Method:
    name: str
    family: str  # "celltyper" or "peer"
    fit: Callable[[FitInput], Fitted]
    classifies: bool = True
    embeds: bool = True
    note: str = ""
    requirement: str | None = None  # module that must be importable
    #: Imports done before the clock starts, so that no unit's time includes them.
    preload: Callable[[], object] | None = None
    #: Rough cost of a whole run relative to a typical celltyper model (0: seconds). When
    #: methods run side by side, the costliest processes start first, so that no long
    #: one is left to finish alone.
    cost_hint: float = 1.0
    #: Methods naming the same process run in one worker, unit by unit, and may reuse
    #: each other's work on a unit through :attr:`FitInput.shared`.
    process: str | None = None

    def unavailable(self) -> str | None:
        """Why the method cannot run here, or ``None``."""
        if self.requirement and importlib.util.find_spec(self.requirement) is None:
            return f"{self.requirement} is not installed"
        return None

    def runs(self, task: str) -> bool:
        return self.embeds if task == "integration" else self.classifies


# -- helpers ----------------------------------------------------------------------------
def _table_from_proba(
    proba: np.ndarray, classes: np.ndarray, novel: np.ndarray | None = None
) -> pd.DataFrame:
    proba = np.asarray(proba, dtype=float)
    return pd.DataFrame(
        {
            "prediction": np.asarray(classes, dtype=object)[proba.argmax(axis=1)],
            "confidence": proba.max(axis=1),
            "novelty": 1.0 - proba.max(axis=1),
            "novel": np.full(len(proba), np.nan) if novel is None else novel.astype(float),
        }
    )


def log_normalised(adata: ad.AnnData) -> sp.csr_matrix:
    """log1p of counts scaled to 10,000 per cell over the genes present."""
    x = sp.csr_matrix(adata.X, dtype=np.float32)
    totals = np.asarray(x.sum(axis=1)).reshape(-1)
    return sp.csr_matrix(np.log1p(sp.diags(1e4 / np.maximum(totals, 1.0)) @ x))


def pca_embedding(adata: ad.AnnData, seed: int) -> np.ndarray:
    """PCA of the scaled log-normalised expression of every cell."""
    import scanpy as sc

    work = ad.AnnData(log_normalised(adata))
    sc.pp.scale(work, max_value=10)
    n_comps = min(N_PCS, work.n_obs - 1, work.n_vars - 1)
    sc.pp.pca(work, n_comps=n_comps, random_state=seed)
    return np.asarray(work.obsm["X_pca"], dtype=np.float32)


class _SklearnOnFeatures(Fitted):
    def __init__(self, classifier, features: np.ndarray | sp.csr_matrix, latent=None):
        self.classifier, self.features, self._latent = classifier, features, latent

    def annotate(self, indices):
        proba = self.classifier.predict_proba(self.features[indices])
        return _table_from_proba(proba, self.classifier.classes_)

    def latent(self):
        if self._latent is None:
            raise NotImplementedError
        return self._latent


# -- celltyper models -------------------------------------------------------------------
class _CellTyperFitted(Fitted):
    def __init__(self, model):
        self.model = model

    def annotate(self, indices):
        table = self.model.annotation_table(indices=indices).reset_index(drop=True)
        table["prediction"] = table["prediction"].astype(object)
        table["novel"] = table["novel"].astype(float)
        return table

    def latent(self):
        return self.model.get_latent_representation()


def fit_celltyper(model_cls, inp: FitInput) -> Fitted:
    """The generic recipe: setup_anndata, construct, train with the model's defaults."""
    from celltyper.model.base import seeded

    recipe = RECIPES.get(model_cls.__name__, {})
    adata = inp.adata.copy()
    model_cls.setup_anndata(
        adata, labels_key="train_label", unlabeled_category=UNLABELLED, batch_key=inp.batch_key
    )
    init = dict(recipe.get("init", {}))
    if inp.quick:
        init.update(recipe.get("init_quick", {}))
    if "seed" in inspect.signature(model_cls.__init__).parameters:
        init.setdefault("seed", inp.seed)
    train = {"enable_progress_bar": False, **recipe.get("train", {})}
    if inp.quick:
        train.update({"max_epochs": QUICK_EPOCHS, **recipe.get("train_quick", {})})
    # Seeds models whose constructor takes no seed; the others are seeded by it as well.
    with seeded(inp.seed):
        model = model_cls(adata, **init)
        model.train(**train)
    return _CellTyperFitted(model)


def recipe_note(name: str) -> str:
    """The full-run settings :data:`RECIPES` changes from a model's defaults, in words."""

    def settings(kwargs: dict, prefix: str = "") -> list[str]:
        out = []
        for key, value in kwargs.items():
            if isinstance(value, dict):
                out += settings(value, f"{prefix}{key}.")
            elif key != "enable_progress_bar":
                out.append(f"{prefix}{key}={value!r}")
        return out

    recipe = RECIPES.get(name, {})
    parts = [
        f"{stage}({', '.join(items)})"
        for stage in ("init", "train")
        if (items := settings(recipe.get(stage, {})))
    ]
    return "defaults except " + "; ".join(parts) if parts else "the model's defaults"


def celltyper_methods() -> list[Method]:
    """One :class:`Method` per class of ``celltyper.model.__all__``."""
    import celltyper.model

    return [
        Method(
            name,
            "celltyper",
            functools.partial(fit_celltyper, getattr(celltyper.model, name)),
            note=recipe_note(name),
        )
        for name in celltyper.model.__all__
    ]


# -- peers ------------------------------------------------------------------------------
def fit_logistic_regression(inp: FitInput, **options) -> Fitted:
    """scikit-learn's LogisticRegression on log1p(CP10k); ``options`` go to its constructor
    (the harness's LR uses its defaults)."""
    from sklearn.linear_model import LogisticRegression

    x = log_normalised(inp.adata)
    ref = inp.reference
    options = {"max_iter": 200 if inp.quick else 1000, "random_state": inp.seed, **options}
    classifier = LogisticRegression(**options)
    classifier.fit(x[ref], inp.adata.obs["train_label"].to_numpy()[ref])
    return _SklearnOnFeatures(classifier, x)


def fit_knn(inp: FitInput) -> Fitted:
    from sklearn.neighbors import KNeighborsClassifier

    z = pca_embedding(inp.adata, inp.seed)
    ref = inp.reference
    classifier = KNeighborsClassifier(n_neighbors=min(KNN_NEIGHBOURS, int(ref.sum())))
    classifier.fit(z[ref], inp.adata.obs["train_label"].to_numpy()[ref])
    return _SklearnOnFeatures(classifier, z)


class _Embedding(Fitted):
    def __init__(self, z: np.ndarray):
        self.z = z

    def latent(self):
        return self.z


def fit_pca(inp: FitInput) -> Fitted:
    return _Embedding(pca_embedding(inp.adata, inp.seed))


def _quiet_scvi() -> None:
    for name in ("lightning", "lightning.pytorch", "scvi", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _train_scvi(inp: FitInput) -> tuple:
    """The unit's scVI model, and the (wall, CPU) seconds of its training when another
    method of the unit trained it already (``(0, 0)`` when trained here)."""
    import scvi

    if "scvi" in inp.shared:
        vae, wall, cpu = inp.shared["scvi"]
        return vae, (wall, cpu)
    _quiet_scvi()
    scvi.settings.seed = inp.seed
    adata = inp.adata.copy()
    start, cpu_start = time.perf_counter(), time.process_time()
    scvi.model.SCVI.setup_anndata(adata, batch_key=inp.batch_key, labels_key="train_label")
    vae = scvi.model.SCVI(adata, **SCVI_KWARGS)
    vae.train(max_epochs=QUICK_EPOCHS if inp.quick else SCVI_EPOCHS, enable_progress_bar=False)
    inp.shared["scvi"] = (vae, time.perf_counter() - start, time.process_time() - cpu_start)
    return vae, (0.0, 0.0)


def fit_scvi(inp: FitInput) -> Fitted:
    """scVI, with a logistic regression on its latent mean for the labels."""
    from sklearn.linear_model import LogisticRegression

    vae, reused = _train_scvi(inp)
    z = vae.get_latent_representation()
    ref = inp.reference
    classifier = LogisticRegression(max_iter=1000, random_state=inp.seed)
    classifier.fit(z[ref], inp.adata.obs["train_label"].to_numpy()[ref])
    fitted = _SklearnOnFeatures(classifier, z, latent=z)
    fitted.reused_seconds = reused
    return fitted


class _ScanviFitted(Fitted):
    def __init__(self, model):
        self.model = model

    def annotate(self, indices):
        proba = self.model.predict(indices=indices, soft=True)
        return _table_from_proba(proba.to_numpy(), np.asarray(proba.columns))

    def latent(self):
        return self.model.get_latent_representation()


def fit_scanvi(inp: FitInput) -> Fitted:
    import scvi

    vae, reused = _train_scvi(inp)
    # from_scvi_model copies the weights: the scVI model stays as it was.
    model = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category=UNLABELLED)
    model.train(
        max_epochs=QUICK_EPOCHS if inp.quick else SCANVI_EPOCHS,
        n_samples_per_label=100,
        enable_progress_bar=False,
    )
    fitted = _ScanviFitted(model)
    fitted.reused_seconds = reused
    return fitted


class _CellTypistFitted(Fitted):
    def __init__(self, model, query: ad.AnnData):
        self.model, self.query = model, query

    def annotate(self, indices):
        import celltypist

        with _silenced("celltypist"):
            result = celltypist.annotate(self.query[indices], model=self.model)
        proba = result.probability_matrix.to_numpy()
        # CellTypist's probabilities are one-vs-rest sigmoids; in its probability-match
        # mode a cell is "Unassigned" when none reaches p_thres (0.5 by default).
        novel = proba.max(axis=1) < CELLTYPIST_P_THRESHOLD
        return _table_from_proba(proba, np.asarray(result.probability_matrix.columns), novel)


@contextlib.contextmanager
def _silenced(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def fit_celltypist(inp: FitInput) -> Fitted:
    """CellTypist's logistic regression, trained on the reference (log1p CP10k)."""
    from ._shims import celltypist_train

    expression = ad.AnnData(log_normalised(inp.adata), obs=inp.adata.obs[["train_label"]])
    expression.var_names = inp.adata.var_names
    ref = inp.reference
    with _silenced("celltypist"):
        model = celltypist_train(
            expression[ref],
            labels="train_label",
            n_jobs=1,
            max_iter=100 if inp.quick else None,
            check_expression=False,
        )
    return _CellTypistFitted(model, expression)


class _ScpoliFitted(Fitted):
    def __init__(self, model, adata: ad.AnnData):
        self.model, self.adata = model, adata

    def annotate(self, indices):
        with contextlib.redirect_stdout(io.StringIO()):
            out = self.model.classify(self.adata[indices].copy(), scale_uncertainties=True)
        result = out["train_label"]
        uncertainty = np.clip(np.asarray(result["uncert"], dtype=float), 0.0, 1.0)
        return pd.DataFrame(
            {
                "prediction": np.asarray(result["preds"], dtype=object),
                "confidence": 1.0 - uncertainty,
                "novelty": uncertainty,
                "novel": np.full(len(indices), np.nan),
            }
        )

    def latent(self):
        with contextlib.redirect_stdout(io.StringIO()):
            return np.asarray(self.model.get_latent(self.adata, mean=True), dtype=np.float32)


def fit_scpoli(inp: FitInput) -> Fitted:
    """scArches' scPoli, semi-supervised: labelled reference cells, unlabelled query."""
    import torch

    from celltyper.model.base import seeded

    from ._shims import import_scpoli

    scpoli_cls = import_scpoli()
    adata = inp.adata.copy()
    # scArches 0.6.1 calls ``.A`` on sparse matrices (gone from recent SciPy): dense X.
    adata.X = np.asarray(sp.csr_matrix(adata.X, dtype=np.float32).todense())
    epochs = QUICK_EPOCHS if inp.quick else SCPOLI_EPOCHS
    with seeded(inp.seed), contextlib.redirect_stdout(io.StringIO()):
        torch.manual_seed(inp.seed)
        model = scpoli_cls(
            adata=adata,
            condition_keys=inp.batch_key,
            cell_type_keys="train_label",
            unknown_ct_names=[UNLABELLED],
            labeled_indices=np.flatnonzero(inp.reference).tolist(),
            embedding_dims=5,
            recon_loss="nb",
        )
        model.train(
            n_epochs=epochs,
            pretraining_epochs=max(1, int(SCPOLI_PRETRAIN_FRACTION * epochs)),
            eta=5,
        )
    return _ScpoliFitted(model, adata)


def _import_scvi():
    import scvi

    return scvi


def _import_celltypist():
    import celltypist

    return celltypist


def _import_scpoli():
    from ._shims import import_scpoli

    return import_scpoli()


PEERS: list[Method] = [
    # One scVI model per unit serves both: scANVI starts from the scVI that the scVI
    # peer trained, and its training time includes that scVI's.
    Method(
        "scVI",
        "peer",
        fit_scvi,
        note="logistic regression on the scVI latent mean",
        preload=_import_scvi,
        process="scvi-tools",
        cost_hint=2.0,  # scVI on every unit, for 100 epochs
    ),
    Method(
        "scANVI",
        "peer",
        fit_scanvi,
        note="scVI 100 epochs (shared with the scVI row; its time included), then 20 epochs",
        preload=_import_scvi,
        process="scvi-tools",
        cost_hint=0.5,
    ),
    Method(
        "CellTypist",
        "peer",
        fit_celltypist,
        embeds=False,
        requirement="celltypist",
        preload=_import_celltypist,
        cost_hint=0.0,
    ),
    Method(
        "scPoli",
        "peer",
        fit_scpoli,
        requirement="scarches",
        preload=_import_scpoli,
        note="scArches 0.6.1 through benchmarks/_shims.py; 50 epochs (40 pretraining)",
    ),
    Method(
        "LR",
        "peer",
        fit_logistic_regression,
        embeds=False,
        note="log1p CP10k genes",
        cost_hint=0.0,
    ),
    Method("kNN", "peer", fit_knn, embeds=False, note="15 neighbours on 50 PCs", cost_hint=0.0),
    Method("PCA", "peer", fit_pca, classifies=False, note="integration baseline", cost_hint=0.0),
]


def all_methods() -> dict[str, Method]:
    """celltyper models first, then the peers, by name."""
    return {m.name: m for m in [*celltyper_methods(), *PEERS]}
