"""``CellTyperModel``: the contract every celltyper model shares."""

from __future__ import annotations

import inspect
import logging
from typing import ClassVar, Literal

import numpy as np
from anndata import AnnData
from mudata import MuData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.dataloaders import CollectionAdapter
from scvi.model.base import BaseModelClass

from celltyper._utils import (
    InputKind,
    check_labels,
    check_matrix_values,
    check_not_empty,
    check_obs_key,
    get_matrix,
    is_in_memory,
    require_counts,
    sampled_input_kind,
)

from ._annotation import AnnotationMixin
from ._data import split_modality
from ._fields import FieldFactory
from ._interpret import InterpretMixin
from ._persistence import PersistenceMixin
from ._query import QueryMixin
from ._training import TrainingMixin

logger = logging.getLogger(__name__)

#: Keywords of scvi-tools' registration (query transfer), not of the model's setup.
_REGISTRATION_KEYWORDS = ("source_registry", "extend_categories", "allow_missing_labels")


class CellTyperModel(
    PersistenceMixin, TrainingMixin, InterpretMixin, AnnotationMixin, QueryMixin, BaseModelClass
):
    """Base class of celltyper's models.

    A subclass sets the class attributes below and builds its module in ``__init__``
    (after ``super().__init__(adata)`` and :meth:`_init_data_checks`). It trains through
    the one ``train()`` of :class:`~celltyper.model.base.TrainingMixin`, declaring its
    stages and defaults there.

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
            are accepted by models that work on them). May be out of core: an AnnData
            opened with ``backed="r"``, or an ``anndata.experimental.AnnCollection`` of
            backed files wrapped in ``scvi.dataloaders.CollectionAdapter`` (with ``layer``
            naming a sparse layer: the adapter has no ``X``). Its values are checked, and
            whole-reference statistics computed, in blocks of consecutive rows; the file
            is never written (registration columns ``_scvi_*`` stay in memory).
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
        setup = {k: v for k, v in locals().items() if k not in ("cls", "adata", "kwargs")}
        setup.pop("setup_method_args")
        cls._register(
            adata, adata, adata.obs, FieldFactory(), setup_method_args, {**setup, **kwargs}
        )

    @classmethod
    def setup_mudata(
        cls,
        mdata: MuData,
        rna_layer: str | None = None,
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
        modalities
            ``{"rna_layer": name}``, the RNA modality; defaults to ``"rna"``.
        **kwargs
            The keywords of :meth:`setup_anndata` (``labels_key``, ``batch_key``, ...),
            whose obs columns are read from ``mdata.obs``.
        """
        modalities = {"rna_layer": "rna"} if modalities is None else dict(modalities)
        if "rna_layer" not in modalities:
            raise ValueError(
                f"modalities must name the RNA modality, e.g. {{'rna_layer': 'rna'}}; got "
                f"{modalities!r}."
            )
        setup = {k: v for k, v in kwargs.items() if k not in _REGISTRATION_KEYWORDS}
        setup_method_args = cls._get_setup_method_args(
            cls=cls, mdata=mdata, rna_layer=rna_layer, modalities=modalities, **setup
        )
        rna, obs = split_modality(mdata, modalities["rna_layer"])
        factory = FieldFactory(modalities["rna_layer"])
        cls._register(mdata, rna, obs, factory, setup_method_args, {**kwargs, "layer": rna_layer})

    @classmethod
    def _register(cls, data, rna, obs, make: FieldFactory, setup_method_args, kwargs) -> None:
        """Check the inputs, build the model's fields and register ``data``."""
        if type(data) is CollectionAdapter and "uns" not in vars(data):
            # scvi-tools' adapter keeps uns on its class, shared by every adapter: each
            # gets its own, or two AnnCollections would share one registration.
            data.uns = {}
        registration = {k: kwargs.pop(k) for k in _REGISTRATION_KEYWORDS if k in kwargs}
        transferring = "source_registry" in registration
        setup = cls._setup_keywords(kwargs)
        cls._check_setup_inputs(rna, obs, transferring=transferring, **setup)
        adata_manager = AnnDataManager(
            fields=cls._setup_fields(make, **setup), setup_method_args=setup_method_args
        )
        adata_manager.register_fields(data, **registration)
        cls.register_manager(adata_manager)

    @classmethod
    def _setup_keywords(cls, kwargs: dict) -> dict:
        """The setup keywords with their defaults; an unknown one raises a TypeError."""
        defaults = {
            name: p.default
            for name, p in inspect.signature(cls.setup_anndata).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
        unknown = sorted(set(kwargs) - set(defaults))
        if unknown:
            raise TypeError(
                f"{cls.__name__} setup got unexpected keyword arguments {unknown}; valid: "
                f"{sorted(defaults)}."
            )
        return {**defaults, **kwargs}

    @classmethod
    def _setup_fields(
        cls,
        make: FieldFactory,
        layer: str | None,
        labels_key: str | None,
        unlabeled_category: str,
        batch_key: str | None,
    ) -> list:
        """The registry fields of the model, built with ``make`` (AnnData or MuData)."""
        return [
            make.layer(REGISTRY_KEYS.X_KEY, layer),
            make.categorical(REGISTRY_KEYS.BATCH_KEY, batch_key),
            make.labels(REGISTRY_KEYS.LABELS_KEY, labels_key, unlabeled_category),
        ]

    @classmethod
    def _check_setup_inputs(
        cls,
        rna,
        obs,
        layer: str | None,
        labels_key: str | None,
        unlabeled_category: str,
        batch_key: str | None,
        transferring: bool,
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
    def _init_data_checks(self, batch_centering: bool = False) -> None:
        """Record the kind of input and check the labels (and that batch centring can
        work, when asked); call in ``__init__``."""
        matrix = self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        if is_in_memory(matrix):
            self.input_kind_ = check_matrix_values(matrix)
        else:  # setup_anndata has read every value of the file; no second pass
            self.input_kind_ = sampled_input_kind(matrix)
        if self._input_kind == "counts":
            require_counts(self.input_kind_, type(self).__name__)
        if (
            self._requires_labels
            and self.adata_manager.registry["setup_args"].get("labels_key") is None
        ):
            raise ValueError(f"{type(self).__name__} needs labels: setup with labels_key.")
        if batch_centering:
            self._check_batch_centering()

    @property
    def n_labels(self) -> int:
        """Number of reference cell types."""
        return len(self.cell_types)

    @property
    def n_batches(self) -> int:
        """Number of registered batches."""
        return self.summary_stats.n_batch

    # -- training ---------------------------------------------------------------------------
    def _route_train_kwargs(self, kwargs: dict, plan_kwargs, datasplitter_kwargs):
        if "datamodule" in kwargs:
            # scvi-tools' custom-dataloader convention (Model(adata=None, registry=...))
            # leaves no registered cells, which every celltyper model reads (labels,
            # split, reference statistics, calibration).
            raise NotImplementedError(
                f"{type(self).__name__}.train(datamodule=...) is not supported: celltyper "
                "models read their registered cells (labels, held-out split, reference "
                "statistics, calibration). For data larger than memory, open the h5ad "
                "with anndata.read_h5ad(path, backed='r'), or join backed files in an "
                "anndata.experimental.AnnCollection wrapped in "
                "scvi.dataloaders.CollectionAdapter, and set that up."
            )
        return super()._route_train_kwargs(kwargs, plan_kwargs, datasplitter_kwargs)

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
