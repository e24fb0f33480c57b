"""SCATLASVAE: atlas-scale integration and label transfer (Xue et al., Nature Methods 2024)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from mudata import MuData
from scvi import REGISTRY_KEYS
from scvi.model._utils import get_max_epochs_heuristic

from celltyper._utils import check_labels, check_obs_key
from celltyper.data import AllCellsSplitter
from celltyper.module import SCATLASVAEModule
from celltyper.module._scatlasvae import extra_labels_registry_key
from celltyper.tl import knn_transfer
from celltyper.train import SCATLASVAETrainingPlan

from .base import (
    CellTyperModel,
    FieldFactory,
    Registration,
    TrainingStage,
    UnmeasuredGenesMixin,
    seeded,
)
from .base._annotation import _obs_names
from .base._data import _batch_column, _labels_column

#: Most epochs by default: scvi's 400 cost CellBench 0.14 balanced accuracy, diverged on the demo.
DEFAULT_MAX_EPOCHS = 30


def _as_key_list(keys: str | Sequence[str] | None, argument: str) -> list[str]:
    if keys is None:
        return []
    keys = [keys] if isinstance(keys, str) else list(keys)
    if not all(isinstance(k, str) for k in keys):
        raise TypeError(f"{argument} must be a column name or a list of them, got {keys!r}.")
    if len(set(keys)) != len(keys):
        raise ValueError(f"{argument} lists a column twice: {keys}.")
    return keys


def _normalise_setup(setup: dict[str, Any]) -> dict[str, Any]:
    """Setup keywords with one form of the keys: ``labels_key`` the primary label column
    (or ``None``), ``extra_labels_keys`` the others, covariates a list (or ``None``)."""
    keys = _as_key_list(setup.get("labels_key"), "labels_key")
    extra = _as_key_list(setup.get("extra_labels_keys"), "extra_labels_keys")
    if extra and not keys:
        raise ValueError("extra_labels_keys needs a labels_key (the primary label column).")
    keys += [k for k in extra if k not in keys]
    covariates = setup.get("categorical_covariate_keys")
    covariates = _as_key_list(covariates, "categorical_covariate_keys")
    return {
        **setup,
        "labels_key": keys[0] if keys else None,
        "extra_labels_keys": keys[1:],
        "categorical_covariate_keys": covariates or None,
    }


class SCATLASVAE(UnmeasuredGenesMixin, CellTyperModel):
    """scAtlasVAE: a batch-invariant encoder, a batch-conditioned decoder and label heads.

    A VAE on raw counts whose encoder never reads the batch and whose decoder reads a
    learned table row per batch key (``batch_key``, ``categorical_covariate_keys``), with a
    linear cell-type head on the latent mean per label key (see
    :class:`~celltyper.module.SCATLASVAEModule`). :meth:`load_query_data` (scArches
    surgery) adds rows for a query's new categories, the only weights a query model
    trains. Labels transfer through the heads (:meth:`predict`, :meth:`predict_all_keys`)
    or by nearest neighbours (:func:`celltyper.tl.knn_transfer`).

    Parameters
    ----------
    adata
        AnnData or MuData registered with :meth:`setup_anndata` / :meth:`setup_mudata`.
    n_hidden, n_layers
        Width and number of the hidden layers (BatchNorm, ReLU, dropout) of the encoder
        and of the decoder.
    n_latent, dropout_rate
        Dimension of the latent space; dropout after each hidden layer.
    covariate_representation, embedding_dim
        ``"embedding"``: a learned vector of ``embedding_dim`` per category of each batch
        key, concatenated to ``z``; ``"one-hot"``: one-hot vectors.
    likelihood
        ``"zinb"``, ``"nb"``, or ``"mse"`` (squared error between ``log1p`` of the counts
        and of the decoded mean).
    normalize_total
        When set, the encoder reads ``log1p`` of the counts scaled to this total per cell.
    head_weights
        Weight of each label key's cross-entropy; defaults to 1 for every key.
    mmd_key
        Batch key whose groups ``train(mmd_weight=...)`` aligns (default ``batch_key``).
    skip_unmeasured_genes
        Whether the encoder leaves out genes that some batch did not measure (zero in all
        its cells where the other batches predict 10 or more counts, as with a smaller
        gene panel filled with zeros; see :attr:`unread_genes`). Their zeros would tell
        the batch-invariant encoder the batch. The decoder still reconstructs them.
    seed
        Seed of the weight initialisation (and the default seed of :meth:`train`).

    Notes
    -----
    :meth:`train` (shared) runs one stage of at most :data:`DEFAULT_MAX_EPOCHS` (30)
    epochs, fewer where scvi-tools' heuristic gives fewer (over 20,000 x 400 / 30 cells), on
    minibatches of 128, each cell once per epoch (:class:`~celltyper.data.AllCellsSplitter`),
    10 % of each labelled type held out; no early stopping and, unlike the other models,
    no best-weight restoring by default. Hyperparameters (by name or in ``plan_kwargs``):
    :class:`~celltyper.train.SCATLASVAETrainingPlan`'s ``n_epochs_prediction=None`` (the
    heads train throughout; an integer: only in the last epochs, as published),
    scvi-tools' ``n_epochs_kl_warmup=400`` and ``max_kl_weight=1``, Adam (``lr=1e-3``, no
    weight decay) and ``mmd_weight=30`` (MMD between batches in the latent space).
    """

    _module_cls = SCATLASVAEModule
    _training_plan_cls = SCATLASVAETrainingPlan
    _data_splitter_cls = AllCellsSplitter
    _input_kind = "counts"
    _requires_labels = False
    # Novelty AUROC, kNN vs Mahalanobis: Baron's mouse-only types 0.93/0.57, Kang 0.71/0.70.
    novelty_method_ = "knn_distance"
    # Like scvi-tools' VAEs: the last epoch's weights.
    _train_defaults = dict(
        batch_size=128, validation_size=0.1, early_stopping=False, restore_best_weights=False
    )

    def __init__(
        self,
        adata: AnnData | MuData,
        n_hidden: int = 128,
        n_layers: int = 1,
        n_latent: int = 10,
        dropout_rate: float = 0.1,
        covariate_representation: Literal["embedding", "one-hot"] = "embedding",
        embedding_dim: int = 8,
        likelihood: Literal["zinb", "nb", "mse"] = "zinb",
        normalize_total: float | None = None,
        head_weights: Sequence[float] | None = None,
        mmd_key: str | None = None,
        skip_unmeasured_genes: bool = True,
        seed: int = 0,
    ):
        super().__init__(adata)
        self._init_data_checks()
        batch_keys = self._batch_keys
        if mmd_key is not None and mmd_key not in batch_keys:
            raise KeyError(f"mmd_key={mmd_key!r} is not a registered batch key ({batch_keys}).")
        n_labels_per_key = [len(self.cell_types_of(key)) for key in self.labels_keys]
        with seeded(seed):
            self.module = self._module_cls(
                n_input=self.summary_stats.n_vars,
                n_categories=[len(c) for c in _covariate_categories(self.registry_)],
                n_labels_per_key=n_labels_per_key,
                n_hidden=n_hidden,
                n_layers=n_layers,
                n_latent=n_latent,
                dropout_rate=dropout_rate,
                covariate_representation=covariate_representation,
                embedding_dim=embedding_dim,
                likelihood=likelihood,
                target_sum=normalize_total,
                head_weights=None if head_weights is None else list(head_weights),
                mmd_covariate=0 if mmd_key is None else batch_keys.index(mmd_key),
            )
        for k in range(len(self.labels_keys)):
            codes = self.get_from_registry(self.adata, extra_labels_registry_key(k))
            self.module.set_class_weights(k, torch.as_tensor(np.asarray(codes)))
        self._init_encoder_genes(skip_unmeasured_genes)
        heads = dict(zip(self.labels_keys, n_labels_per_key, strict=True))
        self._model_summary_string = (
            f"SCATLASVAE: {n_layers} x {n_hidden} hidden, {n_latent}-d latent, {likelihood} "
            f"likelihood, batch keys {batch_keys} ({covariate_representation}), label heads "
            f"(types): {heads or 'none'}" + self._unread_genes_summary()
        )
        self.init_params_ = self._get_init_params(locals())

    # -- training ---------------------------------------------------------------------------
    @functools.wraps(CellTyperModel.train)
    def _training_stages(self, options: dict[str, Any]) -> list[TrainingStage]:
        # A query, or an atlas without labels, trains without labelled cells.
        splitter = {"allow_unlabelled_only": self._is_query_model or not self.labels_keys}
        epochs = min(DEFAULT_MAX_EPOCHS, get_max_epochs_heuristic(self.adata.n_obs))
        return [TrainingStage("train", self._training_plan_cls, epochs, splitter_kwargs=splitter)]

    # -- setup ----------------------------------------------------------------------------
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        labels_key: str | Sequence[str] | None = None,
        unlabeled_category: str = "Unknown",
        batch_key: str | None = None,
        layer: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        extra_labels_keys: Sequence[str] | None = None,
        **kwargs,
    ):
        """Register an AnnData (raw counts in ``X`` or ``layers[layer]``) with SCATLASVAE.

        Parameters
        ----------
        labels_key
            Column of ``obs`` with cell types, or a list of columns (e.g. a coarse and a
            fine annotation): one head per column, the first the primary key that
            :meth:`predict` and :meth:`annotate` use. ``None``: an unsupervised atlas.
        unlabeled_category, batch_key, layer
            The label of unlabelled cells (per key), the batch column (read by the decoder
            only) and the layer of counts, as in every celltyper model.
        categorical_covariate_keys
            Further batch-like ``obs`` columns (e.g. donor), each with its own table.
        extra_labels_keys
            Label columns after the first; the same as listing them in ``labels_key``.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        setup = {**setup_method_args["setup_args"], **kwargs}
        cls._register(adata, adata, adata.obs, FieldFactory(), setup_method_args, setup)

    @staticmethod
    def _get_setup_method_args(**setup_locals) -> dict:
        # The registry keeps one form of the keys, whichever setup method was called.
        return CellTyperModel._get_setup_method_args(**_normalise_setup(setup_locals))

    @classmethod
    def _setup_keywords(cls, kwargs: dict) -> dict:
        return _normalise_setup(super()._setup_keywords(kwargs))

    @classmethod
    def _setup_fields(
        cls, make: FieldFactory, categorical_covariate_keys, extra_labels_keys, **setup
    ) -> list:
        first = setup["labels_key"]
        keys = [first, *extra_labels_keys] if first is not None else []
        return [
            make.layer(REGISTRY_KEYS.X_KEY, setup["layer"]),
            make.categorical(REGISTRY_KEYS.BATCH_KEY, setup["batch_key"]),
            *[
                make.labels(extra_labels_registry_key(i), key, setup["unlabeled_category"])
                for i, key in enumerate(keys)
            ],
            # Without labels: scvi's placeholder column of zeros (no cell type).
            *([] if keys else [make.categorical(REGISTRY_KEYS.LABELS_KEY, None)]),
            make.categorical_joint(REGISTRY_KEYS.CAT_COVS_KEY, categorical_covariate_keys),
        ]

    @classmethod
    def _check_setup_inputs(
        cls, rna, obs, categorical_covariate_keys=None, extra_labels_keys=(), **setup
    ) -> None:
        super()._check_setup_inputs(rna, obs, **setup)
        for key in categorical_covariate_keys or []:
            check_obs_key(obs, key, "categorical_covariate_keys")
            if obs[key].isna().any():
                raise ValueError(
                    f"categorical_covariate_keys: obs[{key!r}] has missing values; fill them."
                )
        for key in [] if setup["transferring"] else extra_labels_keys:
            check_obs_key(obs, key, "labels_key")
            check_labels(obs, key, setup["unlabeled_category"])

    @classmethod
    def _extra_obs_columns(
        cls, registry: dict, obs: pd.DataFrame, *, keep_new_batches: bool, what: str
    ) -> dict[str, np.ndarray]:
        args = registry["setup_args"]
        base = Registration.from_registry(registry)
        columns = {}
        for k, key in enumerate(args.get("extra_labels_keys") or [], start=1):
            state = registry["field_registries"][extra_labels_registry_key(k)]["state_registry"]
            cell_types = [c for c in state["categorical_mapping"] if c != base.unlabeled_category]
            view = dataclasses.replace(base, labels_key=key, cell_types=cell_types)
            columns[key] = _labels_column(obs, view, what)
        categories = _covariate_categories(registry)[1:]
        covariates = args.get("categorical_covariate_keys") or []
        for key, cats in zip(covariates, categories, strict=True):
            view = dataclasses.replace(base, batch_key=key, batches=cats)
            columns[key] = _batch_column(obs, view, keep_new_batches, what)
        return columns

    @property
    def labels_keys(self) -> list[str]:
        """Label columns, the primary first (empty for an unsupervised atlas)."""
        args = self.registry_["setup_args"]
        first = args.get("labels_key")
        return [] if first is None else [first, *(args.get("extra_labels_keys") or [])]

    @property
    def covariate_keys(self) -> list[str]:
        """Categorical covariates beyond ``batch_key``."""
        return list(self.registry_["setup_args"].get("categorical_covariate_keys") or [])

    @property
    def _batch_keys(self) -> list[str | None]:
        return [self.registration.batch_key, *self.covariate_keys]

    @property
    def cell_types(self) -> list[str]:
        """Cell types of the primary label key, in the order of its head's outputs."""
        return self.cell_types_of(None) if self.labels_keys else []

    def cell_types_of(self, label_key: str | None) -> list[str]:
        """Cell types of ``label_key`` (``None``: the primary key)."""
        k = self._label_index(label_key)
        state = self.registry_["field_registries"][extra_labels_registry_key(k)]["state_registry"]
        unlabeled = state["unlabeled_category"]
        return [str(c) for c in state["categorical_mapping"] if c != unlabeled]

    def _label_index(self, label_key: str | None) -> int:
        keys = self.labels_keys
        if not keys:
            raise ValueError(
                "SCATLASVAE was set up without labels_key, so it has no cell-type head: use "
                "SCATLASVAE.from_unsupervised(model, labelled_adata), or celltyper.tl."
                "knn_transfer(model, query, reference=labelled_adata, labels_key=...)."
            )
        if label_key is None:
            return 0
        if label_key not in keys:
            raise KeyError(f"label_key={label_key!r} is not a registered label key ({keys}).")
        return keys.index(label_key)

    # -- prediction -------------------------------------------------------------------------
    def _logits(self, tensors) -> torch.Tensor:
        self._label_index(None)
        return self.module.classify(tensors)

    def _logits_available(self) -> None:
        self._label_index(None)

    def _head_probabilities(
        self, adata, indices, batch_size, keys, gene_column=None
    ) -> dict[str, pd.DataFrame]:
        """Probabilities of the heads of the label ``keys`` (``None``: primary), one
        DataFrame (cells x cell types) per key."""
        heads = {key: self._label_index(key) for key in keys}
        self._check_if_trained(warn=True)
        outputs = {
            key: (lambda tensors, k=k: torch.softmax(self.module.classify_key(tensors, k), -1))
            for key, k in heads.items()
        }
        with self._model_data(adata, gene_column=gene_column) as data:
            probabilities = self._collect(data, indices, batch_size, outputs)
            names = _obs_names(data, indices)
        return {
            key: pd.DataFrame(p, index=names, columns=self.cell_types_of(key))
            for key, p in probabilities.items()
        }

    def predict(
        self,
        adata: AnnData | MuData | None = None,
        indices: Sequence[int] | None = None,
        soft: bool = False,
        batch_size: int | None = None,
        label_key: str | None = None,
        gene_column: str | None = None,
    ) -> np.ndarray | pd.DataFrame:
        """As :meth:`~celltyper.model.base.AnnotationMixin.predict`, from the head of
        ``label_key`` (``None``: the primary key), whose cell types are the columns."""
        heads = self._head_probabilities(adata, indices, batch_size, [label_key], gene_column)
        soft_table = heads[label_key]
        return soft_table if soft else soft_table.idxmax(axis=1).to_numpy(dtype=object)

    def predict_all_keys(
        self,
        adata: AnnData | MuData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        gene_column: str | None = None,
    ) -> pd.DataFrame:
        """Predictions of every label key's head: one column per key, indexed by cell
        (``gene_column`` as in :meth:`predict`)."""
        self._label_index(None)  # raises for an atlas without label keys
        tables = self._head_probabilities(
            adata, indices, batch_size, self.labels_keys, gene_column
        )
        return pd.DataFrame(
            {k: t.idxmax(axis=1).astype(pd.CategoricalDtype(t.columns)) for k, t in tables.items()}
        )

    def knn_transfer(self, query: AnnData | MuData, **kwargs) -> pd.DataFrame:
        """:func:`celltyper.tl.knn_transfer` with this model (same keywords)."""
        return knn_transfer(self, query, **kwargs)

    def get_normalized_expression(
        self,
        adata: AnnData | MuData | None = None,
        indices: Sequence[int] | None = None,
        transform_batch: str | None = None,
        gene_list: Sequence[str] | None = None,
        library_size: float | Literal["observed"] = 1.0,
        batch_size: int | None = None,
        return_numpy: bool = False,
    ) -> np.ndarray | pd.DataFrame:
        """Expression decoded from each cell's latent mean, as in scvi-tools (``rho`` x
        library size), for the cells ``indices`` of ``adata`` (default: the model's data).

        ``transform_batch`` decodes every cell as if from this category of ``batch_key``
        (``None``: its own); ``gene_list`` selects genes; ``library_size`` is the total the
        proportions are scaled to (1: proportions) or ``"observed"`` (each cell's counts).
        """
        self._check_if_trained(warn=True)
        genes = pd.Index(self.registration.genes)
        columns = np.arange(len(genes)) if gene_list is None else genes.get_indexer(gene_list)
        if (columns < 0).any():
            missing = list(np.asarray(gene_list)[columns < 0][:5])
            raise KeyError(f"gene_list has genes the model does not know: {missing}.")
        batches = [str(b) for b in self.registration.batches]
        if transform_batch is not None and str(transform_batch) not in batches:
            raise ValueError(f"transform_batch={transform_batch!r} is not one of {batches}.")
        batch_code = None if transform_batch is None else batches.index(str(transform_batch))
        if not (library_size == "observed" or isinstance(library_size, int | float)):
            raise ValueError(f"library_size must be a number or 'observed', got {library_size!r}.")

        def decode(tensors):
            scale, library = self.module.decode_mean(tensors, batch_code)
            scale = scale[:, torch.as_tensor(columns, device=scale.device)]
            return scale * (library if library_size == "observed" else float(library_size))

        with self._model_data(adata) as data:
            values = self._collect(data, indices, batch_size, {"x": decode})["x"]
            names = _obs_names(data, indices)
        if return_numpy:
            return values
        return pd.DataFrame(values, index=names, columns=genes[columns])

    @classmethod
    def from_unsupervised(
        cls, reference: SCATLASVAE, adata: AnnData | MuData, **init_overrides
    ) -> SCATLASVAE:
        """A labelled model that starts from a trained (e.g. unsupervised) atlas.

        ``adata``, registered with label keys, must have the ``reference``'s genes (in its
        order) and batch keys. The encoder, the decoder and the rows of every category the
        reference knows are copied; the label heads are new. Train the result.
        ``init_overrides`` change constructor arguments (not the architecture).
        """
        if not isinstance(reference, cls) or not reference.is_trained_:
            raise ValueError("reference must be a trained SCATLASVAE.")
        init = {**reference.init_params_["non_kwargs"], **init_overrides}
        model = cls(adata, **init)
        if not model.registration.genes.equals(reference.registration.genes):
            raise ValueError("adata must have the reference's genes, in the same order.")
        keys, ref_keys = model._batch_keys, reference._batch_keys
        if ref_keys != keys:
            raise ValueError(f"adata must be set up with the batch keys {ref_keys}, got {keys}.")
        model.module.load_atlas_weights(
            reference.module.state_dict(),
            _covariate_categories(reference.registry_),
            _covariate_categories(model.registry_),
        )
        return model


def _covariate_categories(registry: dict) -> list[list]:
    """Categories of the batch key, then of each categorical covariate."""
    fields = registry["field_registries"]
    batch = fields[REGISTRY_KEYS.BATCH_KEY]["state_registry"]["categorical_mapping"]
    covariates = fields.get(REGISTRY_KEYS.CAT_COVS_KEY, {}).get("state_registry", {})
    return [
        list(batch),
        *(list(covariates["mappings"][k]) for k in covariates.get("field_keys", [])),
    ]


__all__ = ["SCATLASVAE"]
