"""SCATLASVAE: atlas-scale integration and label transfer (Xue et al., Nature Methods 2024)."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from mudata import MuData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager, fields
from sklearn.neighbors import NearestNeighbors

from celltyper._utils import check_labels, check_obs_key
from celltyper.module import SCATLASVAEModule
from celltyper.module._scatlasvae import extra_labels_registry_key
from celltyper.train import AllCellsSplitter, SCATLASVAETrainingPlan

from .base import CellTyperModel, Registration, seeded
from .base._data import _batch_column, _labels_column, split_modality

logger = logging.getLogger(__name__)

#: Epochs at the end of training whose loss includes the cell-type heads (as published).
DEFAULT_PREDICTION_EPOCHS = 10
#: Fewer head optimisation steps than this in a late window trigger a warning: on Kang's
#: 759-cell reference, 60 steps gave a balanced accuracy of 0.40 and 600 steps 0.72.
MIN_HEAD_STEPS = 500


def _as_key_list(keys: str | Sequence[str] | None, argument: str) -> list[str]:
    if keys is None:
        return []
    keys = [keys] if isinstance(keys, str) else list(keys)
    if not all(isinstance(k, str) for k in keys):
        raise TypeError(f"{argument} must be a column name or a list of them, got {keys!r}.")
    if len(set(keys)) != len(keys):
        raise ValueError(f"{argument} lists a column twice: {keys}.")
    return keys


def _default_max_epochs(n_cells: int) -> int:
    # scvi-tools' heuristic: about 400 epochs for 20,000 cells, fewer for larger data.
    return int(max(1, min(round(20_000 / max(n_cells, 1) * 400), 400)))


class SCATLASVAE(CellTyperModel):
    """scAtlasVAE: a batch-invariant encoder, a batch-conditioned decoder and label heads.

    A variational autoencoder on raw counts. The encoder reads ``log1p`` of the counts
    (optionally after ``normalize_total``) and never the batch, so a cell's latent position
    does not depend on its batch label. The decoder reads the latent ``z`` together with a
    learned representation of each batch key (``batch_key`` plus
    ``categorical_covariate_keys``; an 8-dimensional embedding, or one-hot) and returns gene
    proportions (softmax), multiplied by the cell's observed library size, with a gene-cell
    dispersion and zero-inflation logits (ZINB; NB and MSE are options). The loss is the
    ELBO with a KL warm-up, optionally an MMD between the groups of one batch key, and for
    each label key a linear head on the latent mean trained with class-weighted
    cross-entropy (weights ``N / n_c``, unlabelled cells masked), by default during the
    last 10 epochs only.

    Query data are mapped by :meth:`load_query_data` (scArches surgery): each batch key's
    representation gains rows for the query's new categories, which are the only weights
    that learn when the query model is trained. Labels transfer through the heads
    (:meth:`predict`, :meth:`predict_all_keys`) or through nearest neighbours in the latent
    space (:meth:`knn_transfer`).

    Parameters
    ----------
    adata
        AnnData or MuData registered with :meth:`setup_anndata` / :meth:`setup_mudata`.
    n_hidden
        Width of the hidden layers of the encoder and of the decoder.
    n_layers
        Hidden layers of the encoder and of the decoder (BatchNorm, ReLU, dropout).
    n_latent
        Dimension of the latent space.
    dropout_rate
        Dropout after each hidden layer.
    covariate_representation
        ``"embedding"``: a learned vector of ``embedding_dim`` per category of each batch
        key, concatenated to ``z``; ``"one-hot"``: one-hot vectors.
    embedding_dim
        Length of the learned batch vectors.
    likelihood
        ``"zinb"``, ``"nb"``, or ``"mse"`` (squared error between ``log1p`` of the counts
        and of the decoded mean).
    normalize_total
        When set, the encoder reads ``log1p`` of the counts scaled to this total per cell;
        ``None`` reads ``log1p`` of the raw counts.
    head_weights
        Weight of each label key's cross-entropy; defaults to 1 for every key.
    mmd_key
        Batch key (``batch_key`` or one of ``categorical_covariate_keys``) whose groups the
        MMD penalty aligns when ``train(mmd_weight=...)`` is positive; defaults to
        ``batch_key``.
    seed
        Seed of the weight initialisation (and the default seed of :meth:`train`).

    Examples
    --------
    >>> import celltyper
    >>> adata = celltyper.datasets.kang_pbmc()
    >>> reference = adata[adata.obs["condition"] == "control"].copy()
    >>> query = adata[adata.obs["condition"] == "stimulated"].copy()
    >>> celltyper.model.SCATLASVAE.setup_anndata(
    ...     reference, labels_key="cell_type", batch_key="condition"
    ... )
    >>> model = celltyper.model.SCATLASVAE(reference)
    >>> model.train(max_epochs=100)
    >>> query_model = celltyper.model.SCATLASVAE.load_query_data(query, model)
    >>> query_model.train(max_epochs=20)
    >>> query_model.annotate(query)  # obs["scatlasvae"], ..., obsm["X_scatlasvae"]
    >>> knn = model.knn_transfer(query)  # label transfer by neighbours, with uncertainty
    """

    _module_cls = SCATLASVAEModule
    _training_plan_cls = SCATLASVAETrainingPlan
    _data_splitter_cls = AllCellsSplitter
    _input_kind = "counts"
    _requires_labels = False

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
        seed: int = 0,
    ):
        super().__init__(adata)
        self._init_data_checks()
        covariate_keys = self.covariate_keys
        mmd_index = self._mmd_covariate_index(mmd_key)
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
                mmd_covariate=mmd_index,
            )
        for k in range(len(self.labels_keys)):
            self.module.set_class_weights(k, self._class_weights(k))
        labels = ", ".join(
            f"{k} ({n} types)" for k, n in zip(self.labels_keys, n_labels_per_key, strict=True)
        )
        self._model_summary_string = (
            f"SCATLASVAE: {n_layers} x {n_hidden} hidden, {n_latent}-d latent, {likelihood} "
            f"likelihood, batch keys {[self.registration.batch_key, *covariate_keys]} "
            f"({covariate_representation}), label heads: {labels or 'none'}"
        )
        self.init_params_ = self._get_init_params(locals())

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
        """Register an AnnData with SCATLASVAE.

        Parameters
        ----------
        adata
            Cells x genes, raw counts in ``X`` or ``layers[layer]``.
        labels_key
            Column of ``obs`` with cell types, or a list of columns (e.g. a coarse and a
            fine annotation): one head per column. The first is the primary key that
            :meth:`predict` and :meth:`annotate` use. ``None`` sets up an unsupervised atlas.
        unlabeled_category
            Label marking cells unlabelled (per key: a cell may be labelled in one column
            and not in another).
        batch_key
            Column of ``obs`` with the batch; the decoder (never the encoder) reads it.
        layer
            Layer holding the counts; ``None`` uses ``X``.
        categorical_covariate_keys
            Further batch-like columns of ``obs`` (e.g. donor, technology), each with its
            own learned representation in the decoder.
        extra_labels_keys
            Label columns after the first; the same as listing them in ``labels_key``.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        transferring = "source_registry" in kwargs
        keys, covariates = cls._setup_keys(
            labels_key, extra_labels_keys, categorical_covariate_keys
        )
        args = setup_method_args["setup_args"]
        args.update(
            labels_key=keys[0] if keys else None,
            extra_labels_keys=keys[1:],
            categorical_covariate_keys=covariates or None,
        )
        first = keys[0] if keys else None
        cls._check_setup_inputs(
            adata, adata.obs, layer, first, unlabeled_category, batch_key, transferring
        )
        cls._check_extra_keys(adata.obs, keys[1:], covariates, unlabeled_category, transferring)
        anndata_fields = [
            fields.LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=False),
            fields.CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
            *[
                fields.LabelsWithUnlabeledObsField(
                    extra_labels_registry_key(i), key, unlabeled_category
                )
                for i, key in enumerate(keys)
            ],
            # Without labels: scvi's placeholder column of zeros (no cell type).
            *([] if keys else [fields.CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, None)]),
            fields.CategoricalJointObsField(REGISTRY_KEYS.CAT_COVS_KEY, covariates or None),
        ]
        adata_manager = AnnDataManager(fields=anndata_fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    @classmethod
    def setup_mudata(
        cls,
        mdata: MuData,
        rna_layer: str | None = None,
        labels_key: str | Sequence[str] | None = None,
        unlabeled_category: str = "Unknown",
        batch_key: str | None = None,
        modalities: dict[str, str] | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        extra_labels_keys: Sequence[str] | None = None,
        **kwargs,
    ):
        """Register a MuData with SCATLASVAE.

        Parameters
        ----------
        mdata
            MuData holding an RNA modality of raw counts.
        rna_layer
            Layer of the RNA modality with the counts; ``None`` uses its ``X``.
        labels_key, unlabeled_category, batch_key, categorical_covariate_keys, extra_labels_keys
            As in :meth:`setup_anndata`, read from ``mdata.obs``.
        modalities
            ``{"rna_layer": name}``, the RNA modality; defaults to ``"rna"``.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        modalities = {"rna_layer": "rna"} if modalities is None else dict(modalities)
        if "rna_layer" not in modalities:
            raise ValueError("modalities must name the RNA modality: {'rna_layer': 'rna'}.")
        keys, covariates = cls._setup_keys(
            labels_key, extra_labels_keys, categorical_covariate_keys
        )
        args = setup_method_args["setup_args"]
        args.update(
            modalities=modalities,
            labels_key=keys[0] if keys else None,
            extra_labels_keys=keys[1:],
            categorical_covariate_keys=covariates or None,
        )
        rna_modality = modalities["rna_layer"]
        transferring = "source_registry" in kwargs
        rna, obs = split_modality(mdata, rna_modality)
        first = keys[0] if keys else None
        cls._check_setup_inputs(
            rna, obs, rna_layer, first, unlabeled_category, batch_key, transferring
        )
        cls._check_extra_keys(obs, keys[1:], covariates, unlabeled_category, transferring)
        mudata_fields = [
            fields.MuDataLayerField(
                REGISTRY_KEYS.X_KEY,
                rna_layer,
                mod_key=rna_modality,
                is_count_data=False,
                mod_required=True,
            ),
            fields.MuDataCategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key, mod_key=None),
            *[
                fields.MuDataLabelsWithUnlabeledObsField(
                    extra_labels_registry_key(i), key, unlabeled_category, mod_key=None
                )
                for i, key in enumerate(keys)
            ],
            *(
                []
                if keys
                else [
                    fields.MuDataCategoricalObsField(REGISTRY_KEYS.LABELS_KEY, None, mod_key=None)
                ]
            ),
            fields.MuDataCategoricalJointObsField(
                REGISTRY_KEYS.CAT_COVS_KEY, covariates or None, mod_key=None
            ),
        ]
        adata_manager = AnnDataManager(fields=mudata_fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(mdata, **kwargs)
        cls.register_manager(adata_manager)

    @staticmethod
    def _setup_keys(labels_key, extra_labels_keys, categorical_covariate_keys):
        keys = _as_key_list(labels_key, "labels_key")
        extra = _as_key_list(extra_labels_keys, "extra_labels_keys")
        if extra and not keys:
            raise ValueError("extra_labels_keys needs a labels_key (the primary label column).")
        keys = keys + [k for k in extra if k not in keys]
        covariates = _as_key_list(categorical_covariate_keys, "categorical_covariate_keys")
        return keys, covariates

    @staticmethod
    def _check_extra_keys(obs, extra_keys, covariates, unlabeled_category, transferring):
        """Checks of the further label and covariate columns, before anything is written."""
        for key in covariates:
            check_obs_key(obs, key, "categorical_covariate_keys")
            if obs[key].isna().any():
                raise ValueError(
                    f"categorical_covariate_keys: obs[{key!r}] has missing values; fill them."
                )
        if transferring:
            return
        for key in extra_keys:
            check_obs_key(obs, key, "labels_key")
            check_labels(obs, key, unlabeled_category)

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
        for key, cats in zip(
            args.get("categorical_covariate_keys") or [], categories, strict=True
        ):
            view = dataclasses.replace(base, batch_key=key, batches=cats)
            columns[key] = _batch_column(obs, view, keep_new_batches, what)
        return columns

    # -- registered keys --------------------------------------------------------------------
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
                "SCATLASVAE was set up without labels_key, so it has no cell-type head. Set "
                "up labelled data and call SCATLASVAE.from_unsupervised(model, adata), or "
                "transfer labels with knn_transfer(query, reference=labelled_adata, "
                "labels_key=...)."
            )
        if label_key is None:
            return 0
        if label_key not in keys:
            raise KeyError(f"label_key={label_key!r} is not a registered label key ({keys}).")
        return keys.index(label_key)

    def _mmd_covariate_index(self, mmd_key: str | None) -> int:
        keys = [self.registration.batch_key, *self.covariate_keys]
        if mmd_key is None:
            return 0
        if mmd_key not in keys:
            raise KeyError(f"mmd_key={mmd_key!r} is not a registered batch key ({keys}).")
        return keys.index(mmd_key)

    def _class_weights(self, k: int) -> np.ndarray:
        """``N / n_c`` over the labelled cells of label key ``k`` (0 for absent classes)."""
        n_types = self.module.n_labels_per_key[k]
        codes = np.asarray(self.get_from_registry(self.adata, extra_labels_registry_key(k)))
        codes = codes.reshape(-1).astype(int)
        counts = np.bincount(codes[codes < n_types], minlength=n_types).astype(np.float64)
        total = counts.sum()
        return np.divide(total, counts, out=np.zeros_like(counts), where=counts > 0)

    # -- training ---------------------------------------------------------------------------
    def train(
        self,
        max_epochs: int | None = None,
        *,
        n_epochs_prediction: int | None = DEFAULT_PREDICTION_EPOCHS,
        n_epochs_kl_warmup: float = 400,
        max_kl_weight: float = 1.0,
        mmd_weight: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        batch_size: int = 128,
        validation_size: float = 0.1,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        early_stopping: bool = False,
        early_stopping_patience: int = 20,
        restore_best_weights: bool = False,
        seed: int | None = None,
        **trainer_kwargs,
    ) -> None:
        """Train the VAE and the label heads.

        Parameters
        ----------
        max_epochs
            Defaults to scvi-tools' heuristic ``min(round(20000 / n_cells * 400), 400)``.
        n_epochs_prediction
            The cell-type heads' loss joins for the last this many epochs (10, as
            published); ``None`` trains the heads throughout. A window of fewer than 500
            optimisation steps (small references) warns: the linear heads then underfit.
        n_epochs_kl_warmup
            Epochs over which the KL weight ramps linearly from 0 to ``max_kl_weight``.
        max_kl_weight
            Final KL weight.
        mmd_weight
            Weight of the MMD between the groups of the model's ``mmd_key`` (0: off).
        lr, weight_decay
            Adam settings.
        batch_size
            Cells per minibatch.
        validation_size
            Share of each cell type's labelled cells held out (validation loss, novelty
            threshold calibration).
        accelerator, devices
            As in scvi-tools.
        early_stopping
            Stop when the validation loss stops improving. The last epochs cannot be known
            in advance then, so the heads train throughout.
        early_stopping_patience
            Epochs without improvement before stopping.
        restore_best_weights
            End with the weights of the epoch with the lowest validation loss.
        seed
            Seed of the split and the minibatches; defaults to the model's ``seed``.
        **trainer_kwargs
            Passed to the Lightning trainer.
        """
        max_epochs = _default_max_epochs(self.adata.n_obs) if max_epochs is None else max_epochs
        if n_epochs_prediction is not None and n_epochs_prediction < 1:
            raise ValueError(
                f"n_epochs_prediction must be >= 1 or None, got {n_epochs_prediction}."
            )
        if early_stopping and n_epochs_prediction is not None and n_epochs_prediction < max_epochs:
            warnings.warn(
                "With early_stopping the last epochs are unknown: the cell-type heads train "
                "throughout (n_epochs_prediction=None).",
                UserWarning,
                stacklevel=2,
            )
            n_epochs_prediction = None
        start = 0 if n_epochs_prediction is None else max(0, max_epochs - n_epochs_prediction)
        seed = self._resolve_seed(seed)
        splitter = self._make_splitter(
            validation_size,
            batch_size,
            seed,
            allow_unlabelled_only=self._is_query_model or not self.labels_keys,
        )
        self._warn_short_head_window(start, max_epochs, splitter.n_train, batch_size)
        plan = self._training_plan_cls(
            self.module,
            n_epochs_kl_warmup=n_epochs_kl_warmup,
            max_kl_weight=max_kl_weight,
            prediction_start_epoch=start,
            mmd_weight=mmd_weight,
            lr=lr,
            weight_decay=weight_decay,
        )
        self._run_training(
            plan,
            splitter,
            max_epochs,
            accelerator=accelerator,
            devices=devices,
            early_stopping=early_stopping,
            early_stopping_patience=early_stopping_patience,
            restore_best_weights=restore_best_weights,
            seed=seed,
            **trainer_kwargs,
        )

    def _warn_short_head_window(
        self, start: int, max_epochs: int, n_train: int, batch_size: int
    ) -> None:
        """Warn when a late head window leaves the linear heads too few optimiser steps."""
        if start == 0 or not self.labels_keys or self._is_query_model:
            return
        steps = (max_epochs - start) * max(1, -(-n_train // batch_size))
        if steps < MIN_HEAD_STEPS:
            warnings.warn(
                f"The cell-type heads train only during the last {max_epochs - start} epochs, "
                f"{steps} optimisation steps on {n_train} cells; pass n_epochs_prediction=None "
                "(heads trained throughout) or a larger n_epochs_prediction.",
                UserWarning,
                stacklevel=3,
            )

    # -- prediction -------------------------------------------------------------------------
    def _probabilities(self, tensors) -> torch.Tensor:
        self._label_index(None)
        return torch.softmax(self.module.classify(tensors), dim=-1)

    def predict(
        self,
        adata: AnnData | MuData | None = None,
        indices: Sequence[int] | None = None,
        soft: bool = False,
        batch_size: int | None = None,
        label_key: str | None = None,
    ) -> np.ndarray | pd.DataFrame:
        """Predicted cell type of each cell, from the head of one label key.

        Parameters
        ----------
        adata
            Data to annotate; ``None`` uses the model's data.
        indices
            Positions of the cells to predict; ``None`` predicts all.
        soft
            Return a DataFrame of probabilities (one column per cell type of the key).
        batch_size
            Minibatch size.
        label_key
            Which label key's head; ``None`` is the primary key.

        Returns
        -------
        An array of cell-type names, or the probability DataFrame when ``soft=True``.
        """
        k = self._label_index(label_key)
        if k == 0:
            return super().predict(adata, indices=indices, soft=soft, batch_size=batch_size)
        self._check_if_trained(warn=True)
        types = self.cell_types_of(label_key)

        def probabilities(tensors):
            return torch.softmax(self.module.classify_key(tensors, k), dim=-1)

        with self._model_data(adata) as data:
            probs = self._collect(data, indices, batch_size, {"p": probabilities})["p"]
            names = data.obs_names if indices is None else data.obs_names[np.asarray(indices)]
        if soft:
            return pd.DataFrame(probs, index=names, columns=types)
        return np.asarray(types, dtype=object)[probs.argmax(axis=1)]

    def predict_all_keys(
        self,
        adata: AnnData | MuData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> pd.DataFrame:
        """Predictions of every label key's head: one column per key, indexed by cell."""
        self._label_index(None)
        self._check_if_trained(warn=True)
        heads = {key: k for k, key in enumerate(self.labels_keys)}
        outputs = {
            key: (lambda tensors, k=k: self.module.classify_key(tensors, k).argmax(dim=-1))
            for key, k in heads.items()
        }
        with self._model_data(adata) as data:
            codes = self._collect(data, indices, batch_size, outputs)
            names = data.obs_names if indices is None else data.obs_names[np.asarray(indices)]
        table = {}
        for key in heads:
            types = self.cell_types_of(key)
            table[key] = pd.Categorical(np.asarray(types, dtype=object)[codes[key]], types)
        return pd.DataFrame(table, index=names)

    def knn_transfer(
        self,
        query: AnnData | MuData,
        reference: AnnData | MuData | None = None,
        labels_key: str | None = None,
        n_neighbors: int = 15,
        weighting: Literal["distance", "uniform"] = "distance",
        batch_size: int | None = None,
    ) -> pd.DataFrame:
        """Label transfer by nearest neighbours in the latent space.

        Each query cell takes the label most frequent among its ``n_neighbors`` nearest
        labelled reference cells (Euclidean distance on the latent mean). With
        ``"distance"`` weighting a neighbour at distance ``d`` votes ``1 / (d + 1e-8)``.

        Parameters
        ----------
        query
            Cells to label.
        reference
            Labelled cells; ``None`` uses the model's own data and registered labels.
        labels_key
            Label column: of ``reference.obs`` when a reference is given (defaults to the
            model's primary label key), else a registered label key (``None``: primary).
        n_neighbors
            Neighbours consulted.
        weighting
            ``"distance"`` or ``"uniform"`` votes.
        batch_size
            Minibatch size of the embedding.

        Returns
        -------
        DataFrame indexed by the query's ``obs_names``: ``prediction``, ``probability``
        (the winning label's share of the vote) and ``uncertainty`` (``1 - probability``).
        """
        if n_neighbors < 1:
            raise ValueError(f"n_neighbors must be >= 1, got {n_neighbors}.")
        if weighting not in ("distance", "uniform"):
            raise ValueError(f"weighting must be 'distance' or 'uniform', got {weighting!r}.")
        ref_latent, ref_labels = self._knn_reference(reference, labels_key, batch_size)
        query_latent = self.get_latent_representation(query, batch_size=batch_size)
        k = min(n_neighbors, len(ref_labels))
        distances, neighbours = (
            NearestNeighbors(n_neighbors=k).fit(ref_latent).kneighbors(query_latent)
        )
        votes = 1.0 / (distances + 1e-8) if weighting == "distance" else np.ones_like(distances)
        classes, codes = np.unique(ref_labels, return_inverse=True)
        scores = np.zeros((len(query_latent), len(classes)))
        np.add.at(scores, (np.arange(len(query_latent))[:, None], codes[neighbours]), votes)
        scores /= scores.sum(axis=1, keepdims=True)
        best = scores.argmax(axis=1)
        probability = scores[np.arange(len(best)), best]
        rna, _ = split_modality(query, self.registration.rna_modality)
        return pd.DataFrame(
            {
                "prediction": classes[best],
                "probability": probability,
                "uncertainty": 1.0 - probability,
            },
            index=rna.obs_names.copy(),
        )

    def _knn_reference(self, reference, labels_key, batch_size):
        if reference is None:
            k = self._label_index(labels_key)
            codes = np.asarray(self.get_from_registry(self.adata, extra_labels_registry_key(k)))
            codes = codes.reshape(-1).astype(int)
            types = np.asarray(self.cell_types_of(labels_key), dtype=object)
            labelled = np.flatnonzero(codes < len(types))
            labels = types[codes[labelled]] if len(labelled) else np.array([], dtype=object)
            latent = self.get_latent_representation(indices=labelled, batch_size=batch_size)
        else:
            key = labels_key or (self.labels_keys[0] if self.labels_keys else None)
            _, obs = split_modality(reference, self.registration.rna_modality)
            if key is None or key not in obs.columns:
                raise KeyError(f"labels_key={key!r} is not a column of reference.obs.")
            values = obs[key].astype(object).to_numpy()
            labelled = ~pd.isna(values) & (values != self.registration.unlabeled_category)
            labels = values[labelled].astype(str)
            latent = self.get_latent_representation(reference, batch_size=batch_size)[labelled]
        if len(labels) == 0:
            raise ValueError("The reference has no labelled cell to transfer labels from.")
        return latent, labels

    # -- generative outputs -----------------------------------------------------------------
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
        """Decoded expression of each cell, as in scvi-tools (``rho`` x library size).

        The decoder reads the latent mean and the cell's covariates.

        Parameters
        ----------
        adata
            Data to decode; ``None`` uses the model's data.
        indices
            Positions of the cells; ``None`` uses all.
        transform_batch
            Decode every cell as if it came from this batch (a category of ``batch_key``);
            ``None`` uses each cell's own batch.
        gene_list
            Genes to return; ``None`` returns all.
        library_size
            Total the proportions are scaled to: a number (1 gives proportions), or
            ``"observed"`` for each cell's own total counts.
        batch_size
            Minibatch size.
        return_numpy
            Return an array instead of a DataFrame (cells x genes).
        """
        self._check_if_trained(warn=True)
        genes = pd.Index(self.registration.genes)
        columns = np.arange(len(genes))
        if gene_list is not None:
            missing = [g for g in gene_list if g not in genes]
            if missing:
                raise KeyError(f"gene_list has genes the model does not know: {missing[:5]}.")
            columns = genes.get_indexer(list(gene_list))
        batch_code = None
        if transform_batch is not None:
            batches = [str(b) for b in self.registration.batches]
            if str(transform_batch) not in batches:
                raise ValueError(f"transform_batch={transform_batch!r} is not one of {batches}.")
            batch_code = batches.index(str(transform_batch))
        if not (library_size == "observed" or isinstance(library_size, int | float)):
            raise ValueError(f"library_size must be a number or 'observed', got {library_size!r}.")

        def decode(tensors):
            module = self.module
            inference = module.inference(module.expression(tensors))
            codes = module.covariate_codes(tensors)
            if batch_code is not None:
                codes[0] = torch.full_like(codes[0], batch_code)
            codes = [c.to(inference["qz_m"].device) for c in codes]
            scale = module.decoder(inference["qz_m"], codes)["scale"]
            scale = scale[:, torch.as_tensor(columns, device=scale.device)]
            if library_size == "observed":
                return scale * inference["library"]
            return scale * float(library_size)

        with self._model_data(adata) as data:
            values = self._collect(data, indices, batch_size, {"x": decode})["x"]
            names = data.obs_names if indices is None else data.obs_names[np.asarray(indices)]
        if return_numpy:
            return values
        return pd.DataFrame(values, index=names, columns=genes[columns])

    # -- an unsupervised atlas gains heads --------------------------------------------------
    @classmethod
    def from_unsupervised(
        cls, reference: SCATLASVAE, adata: AnnData | MuData, **init_overrides
    ) -> SCATLASVAE:
        """A labelled model that starts from a trained (e.g. unsupervised) atlas.

        ``adata`` must be registered with :meth:`setup_anndata` with label keys, the same
        genes (in the same order) and the same batch keys as the reference. The encoder,
        the decoder and the rows of every category the reference knows are copied; the
        label heads are new. Train the result (``train(n_epochs_prediction=None)`` trains
        the heads from the first epoch).

        Parameters
        ----------
        reference
            The trained atlas.
        adata
            Labelled data registered with this class.
        **init_overrides
            Constructor arguments to change (the architecture must stay the same).
        """
        if not isinstance(reference, cls) or not reference.is_trained_:
            raise ValueError("reference must be a trained SCATLASVAE.")
        init = {**reference.init_params_["non_kwargs"], **init_overrides}
        model = cls(adata, **init)
        if not model.registration.genes.equals(reference.registration.genes):
            raise ValueError("adata must have the reference's genes, in the same order.")
        ref_keys = [reference.registration.batch_key, *reference.covariate_keys]
        keys = [model.registration.batch_key, *model.covariate_keys]
        if ref_keys != keys:
            raise ValueError(f"adata must be set up with the batch keys {ref_keys}, got {keys}.")
        source = reference.module.state_dict()
        target = model.module.state_dict()
        old_cats = _covariate_categories(reference.registry_)
        new_cats = _covariate_categories(model.registry_)
        for name, value in source.items():
            if name.startswith("heads.") or name.startswith("class_weights_"):
                continue
            if name.startswith("decoder.covariates."):
                i = int(name.split(".")[2])
                _copy_rows(target[name], value, old_cats[i], new_cats[i])
            elif name == "n_reference_categories":
                continue
            elif target[name].shape != value.shape:
                raise ValueError(f"Architecture differs at {name}: pass the same init arguments.")
            else:
                target[name] = value.clone()
        model.module.load_state_dict(target)
        return model


def _covariate_categories(registry: dict) -> list[list]:
    """Categories of the batch key, then of each categorical covariate."""
    field_registries = registry["field_registries"]
    batch = field_registries[REGISTRY_KEYS.BATCH_KEY]["state_registry"]["categorical_mapping"]
    out = [list(batch)]
    covs = field_registries.get(REGISTRY_KEYS.CAT_COVS_KEY, {}).get("state_registry", {})
    for key in covs.get("field_keys", []):
        out.append(list(covs["mappings"][key]))
    return out


def _copy_rows(target: torch.Tensor, source: torch.Tensor, old: list, new: list) -> None:
    """Copy the rows of categories known to both tables, matched by name."""
    position = {str(c): i for i, c in enumerate(old)}
    for j, category in enumerate(new):
        i = position.get(str(category))
        if i is not None:
            target[j] = source[i]


__all__ = ["SCATLASVAE"]
