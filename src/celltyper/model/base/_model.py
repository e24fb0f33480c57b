"""``CellTyperModel``: the contract every celltyper model shares."""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar, Literal

import numpy as np
import torch
from anndata import AnnData
from mudata import MuData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager, fields
from scvi.model.base import BaseModelClass
from scvi.train import TrainRunner

from celltyper.train import RestoreBestWeights

from ._annotation import AnnotationMixin
from ._data import split_modality
from ._query import QueryMixin
from ._validation import (
    InputKind,
    check_labels,
    check_matrix_values,
    check_not_empty,
    check_obs_key,
    get_matrix,
    require_counts,
)

logger = logging.getLogger(__name__)


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Seed python, numpy and torch inside the block, restoring the caller's RNG after."""
    if seed is None:
        yield
        return
    # The legacy global numpy state is what third-party code (scanpy, sklearn) draws from.
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)  # noqa: NPY002
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)  # noqa: NPY002


class CellTyperModel(AnnotationMixin, QueryMixin, BaseModelClass):
    """Base class of celltyper's models.

    A subclass sets the class attributes below, builds its module in ``__init__`` (after
    ``super().__init__(adata)`` and :meth:`_init_data_checks`) and implements ``train``
    with :meth:`_run_training`.

    Attributes
    ----------
    _input_kind
        ``"counts"``: the model needs raw counts. ``"log1p"``: the model works on
        log-normalised values; raw counts are accepted and normalised by the module on the
        fly, log-normalised data are used as they are.
    _requires_labels
        Whether training needs at least two labelled cell types.
    """

    _input_kind: ClassVar[Literal["counts", "log1p"]] = "counts"
    _requires_labels: ClassVar[bool] = True

    input_kind_: InputKind = "counts"
    min_gene_overlap_: float = 0.5

    # -- setup ----------------------------------------------------------------------------
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        labels_key: str | None = None,
        unlabeled_category: str = "Unknown",
        batch_key: str | None = None,
        layer: str | None = None,
        **kwargs,
    ):
        """Register an AnnData with the model class.

        Parameters
        ----------
        adata
            Cells x genes. Raw counts in ``X`` or ``layers[layer]`` (log-normalised values
            are accepted by models that work on them).
        labels_key
            Column of ``obs`` with cell types; cells labelled ``unlabeled_category`` are
            unlabelled (used by semi-supervised models, ignored by the loss otherwise).
        unlabeled_category
            Label marking unlabelled cells.
        batch_key
            Column of ``obs`` with batches / domains.
        layer
            Layer holding the expression; ``None`` uses ``X``.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        transferring = "source_registry" in kwargs
        cls._check_setup_inputs(
            adata, adata.obs, layer, labels_key, unlabeled_category, batch_key, transferring
        )
        anndata_fields = [
            fields.LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=False),
            fields.CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
            fields.LabelsWithUnlabeledObsField(
                REGISTRY_KEYS.LABELS_KEY, labels_key, unlabeled_category
            ),
        ]
        adata_manager = AnnDataManager(fields=anndata_fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    @classmethod
    def setup_mudata(
        cls,
        mdata: MuData,
        rna_layer: str | None = None,
        labels_key: str | None = None,
        unlabeled_category: str = "Unknown",
        batch_key: str | None = None,
        modalities: dict[str, str] | None = None,
        **kwargs,
    ):
        """Register a MuData with the model class.

        Parameters
        ----------
        mdata
            MuData holding an RNA modality.
        rna_layer
            Layer of the RNA modality with the expression; ``None`` uses its ``X``.
        labels_key, unlabeled_category, batch_key
            As in :meth:`setup_anndata`, read from ``mdata.obs``.
        modalities
            ``{"rna_layer": name}``, the RNA modality; defaults to ``"rna"``.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        modalities = {"rna_layer": "rna"} if modalities is None else dict(modalities)
        if "rna_layer" not in modalities:
            raise ValueError("modalities must name the RNA modality: {'rna_layer': 'rna'}.")
        setup_method_args["setup_args"]["modalities"] = modalities
        rna_modality = modalities["rna_layer"]
        transferring = "source_registry" in kwargs
        rna, obs = split_modality(mdata, rna_modality)
        cls._check_setup_inputs(
            rna, obs, rna_layer, labels_key, unlabeled_category, batch_key, transferring
        )
        mudata_fields = [
            fields.MuDataLayerField(
                REGISTRY_KEYS.X_KEY,
                rna_layer,
                mod_key=rna_modality,
                is_count_data=False,
                mod_required=True,
            ),
            fields.MuDataCategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key, mod_key=None),
            fields.MuDataLabelsWithUnlabeledObsField(
                REGISTRY_KEYS.LABELS_KEY, labels_key, unlabeled_category, mod_key=None
            ),
        ]
        adata_manager = AnnDataManager(fields=mudata_fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(mdata, **kwargs)
        cls.register_manager(adata_manager)

    @classmethod
    def _check_setup_inputs(
        cls, rna, obs, layer, labels_key, unlabeled_category, batch_key, transferring
    ) -> None:
        check_not_empty(rna)
        check_obs_key(obs, batch_key, "batch_key")
        if not transferring:
            check_obs_key(obs, labels_key, "labels_key")
        where = f"adata.layers[{layer!r}]" if layer else "adata.X"
        kind = check_matrix_values(get_matrix(rna, layer), where)
        if cls._input_kind == "counts":
            require_counts(kind, cls.__name__, where)
        if transferring:
            return
        if labels_key is None:
            if cls._requires_labels:
                raise ValueError(
                    f"{cls.__name__} is a classifier: setup_anndata needs labels_key."
                )
            return
        check_labels(obs, labels_key, unlabeled_category)

    # -- init helpers -----------------------------------------------------------------------
    def _init_data_checks(self) -> None:
        """Record the kind of input and check the labels; call in ``__init__``."""
        matrix = self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        self.input_kind_ = check_matrix_values(matrix)
        if self._input_kind == "counts":
            require_counts(self.input_kind_, type(self).__name__)
        if (
            self._requires_labels
            and self.adata_manager.registry["setup_args"].get("labels_key") is None
        ):
            raise ValueError(f"{type(self).__name__} needs labels: setup with labels_key.")

    @property
    def n_labels(self) -> int:
        """Number of reference cell types."""
        return len(self.cell_types)

    @property
    def n_batches(self) -> int:
        """Number of registered batches."""
        return self.summary_stats.n_batch

    # -- training ---------------------------------------------------------------------------
    def _make_splitter(
        self,
        validation_size: float,
        batch_size: int,
        seed: int | None,
        allow_unlabelled_only: bool | None = None,
        **splitter_kwargs,
    ):
        """The model's ``_data_splitter_cls`` over its registered data.

        ``allow_unlabelled_only`` defaults to whether this is a query model (a query may
        come without labels); further keywords (``balance_classes``,
        ``include_unlabelled``, ...) go to the splitter.
        """
        if allow_unlabelled_only is None:
            allow_unlabelled_only = self._is_query_model
        return self._data_splitter_cls(
            self.adata_manager,
            n_labels=self.n_labels,
            validation_size=validation_size,
            batch_size=batch_size,
            seed=seed,
            allow_unlabelled_only=allow_unlabelled_only,
            **splitter_kwargs,
        )

    def _resolve_seed(self, seed: int | None) -> int:
        """``seed``, or the seed the model was constructed with when it is ``None``."""
        return int(self.init_params_["non_kwargs"]["seed"] if seed is None else seed)

    def _start_fresh_history(self) -> None:
        """Forget the curves of the previous fit before a stage that logs other curves.

        scvi's runner appends a trained model's new curves to the old ones and drops the
        curves the old history lacks, so a method that trains in stages (pretraining,
        then fine-tuning) starts each stage from an empty history; the runner sets
        ``is_trained_`` again at its end.
        """
        self.history_ = None
        self.is_trained_ = False

    def _run_training(
        self,
        training_plan,
        data_splitter,
        max_epochs: int,
        *,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        early_stopping: bool = True,
        early_stopping_patience: int = 20,
        min_epochs: int | None = None,
        restore_best_weights: bool = True,
        seed: int | None = 0,
        calibrate: bool = True,
        monitor: str = "validation_loss",
        monitor_mode: Literal["min", "max"] = "min",
        **trainer_kwargs,
    ) -> None:
        """Fit ``training_plan`` with scvi-tools' runner, then calibrate novelty.

        Early stopping and :class:`~celltyper.train.RestoreBestWeights` follow the logged
        metric ``monitor``, minimised or maximised as ``monitor_mode`` says.
        """
        if max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, got {max_epochs}.")
        has_validation = data_splitter.n_val > 0
        if early_stopping and not has_validation:
            warnings.warn(
                "No held-out labelled cells: early stopping is off.", UserWarning, stacklevel=3
            )
            early_stopping = False
        callbacks = list(trainer_kwargs.pop("callbacks", []))
        if restore_best_weights and has_validation:
            callbacks.append(RestoreBestWeights(monitor, monitor_mode))
        if has_validation:
            trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
        runner = TrainRunner(
            self,
            training_plan=training_plan,
            data_splitter=data_splitter,
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            early_stopping=early_stopping,
            early_stopping_monitor=monitor,
            early_stopping_mode=monitor_mode,
            early_stopping_patience=early_stopping_patience,
            min_epochs=min(min_epochs or 0, max_epochs),
            callbacks=callbacks,
            **trainer_kwargs,
        )
        with seeded(seed):
            runner()
        # A query fine-tuned without labelled cells keeps the reference's threshold.
        if calibrate and self._n_labelled_cells() > 0:
            self.calibrate_novelty()

    def _n_labelled_cells(self) -> int:
        return int((self._label_codes() < self.n_labels).sum())

    def _label_codes(self) -> np.ndarray:
        """Registered label code of every cell; ``n_labels`` and above mean unlabelled."""
        codes = np.asarray(self.get_from_registry(self.adata, REGISTRY_KEYS.LABELS_KEY))
        return codes.reshape(-1).astype(int)

    def _registered_labels(self) -> np.ndarray:
        """Registered cell type of every cell (``None`` for unlabelled cells)."""
        names = np.asarray([*self.cell_types, None], dtype=object)
        return names[np.minimum(self._label_codes(), self.n_labels)]

    def _batch_codes(self) -> np.ndarray:
        """Registered batch code of every cell."""
        codes = np.asarray(self.get_from_registry(self.adata, REGISTRY_KEYS.BATCH_KEY))
        return codes.reshape(-1).astype(int)

    @property
    def _is_query_model(self) -> bool:
        """Whether the model came from :meth:`load_query_data`."""
        return getattr(self, "is_query_model_", False)
