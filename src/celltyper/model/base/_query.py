"""scArches-style query mapping shared by every celltyper model."""

from __future__ import annotations

import copy
import os
from functools import partial

from anndata import AnnData
from mudata import MuData
from scvi import REGISTRY_KEYS
from scvi.model.base import ArchesMixin, BaseModelClass

from ._confidence import CALIBRATION_ATTRIBUTES
from ._data import Registration, build_model_data
from ._persistence import safe_load_saved_files, safe_scvi_loading

#: What a query model takes over from its reference: the calibration, and the gene totals
#: new data are checked against (``ZeroFilledGenesMixin``).
_REFERENCE_ATTRIBUTES = (
    *CALIBRATION_ATTRIBUTES,
    "reference_gene_sums_",
    "reference_gene_detection_",
)


class QueryMixin(ArchesMixin):
    """``load_query_data``: gene alignment, then surgery through scvi-tools' ArchesMixin."""

    @classmethod
    def load_query_data(
        cls,
        query: AnnData | MuData,
        reference: BaseModelClass | str | os.PathLike,
        *,
        min_gene_overlap: float = 0.5,
        unfrozen: bool = False,
        accelerator: str = "auto",
        device: int | str = "auto",
        gene_column: str | None = None,
    ):
        """Map a query dataset onto a trained reference model (scArches surgery).

        The query's genes are aligned to the reference's (missing genes are zero-filled
        with a warning that gives their number; an overlap below ``min_gene_overlap`` or
        Ensembl IDs on one side and symbols on the other raise). New batch categories
        extend the model's batch-dependent layers; labels the reference never saw count as
        unlabelled. Parameters are then frozen by the module's own rule
        (:meth:`~celltyper.module.CellTyperModule.query_trainable_parameters`), so that
        ``train()`` on the returned model fine-tunes only what the method adapts to a
        query. The model predicts straight away; the query object is never modified
        (the model holds an aligned copy: annotate your object with
        ``model.annotate(query)``).

        Parameters
        ----------
        query
            Query data, the same kind of values (counts or normalised) as the reference.
        reference
            A trained model of this class, or the directory it was saved to.
        min_gene_overlap
            Smallest accepted share of reference genes present in the query.
        unfrozen
            Fine-tune every parameter instead of the module's surgery subset.
        accelerator, device
            Where to put the model, as in scvi-tools.
        gene_column
            A column of ``query.var`` holding gene names of the kind the reference uses,
            aligned on instead of ``query.var_names`` (e.g. ``"gene_ids"`` when the
            reference has Ensembl IDs and the query is indexed by symbols). The query is
            not changed; pass the same ``gene_column`` to ``annotate``/``predict`` of other
            objects indexed like it.

        Returns
        -------
        A model of this class on the query.
        """
        if isinstance(reference, str | os.PathLike):
            attr_dict, _, _, _ = safe_load_saved_files(
                str(reference), load_adata=False, map_location="cpu"
            )
            registry, input_kind = attr_dict["registry_"], attr_dict["input_kind_"]
            calibration = {k: attr_dict[k] for k in _REFERENCE_ATTRIBUTES if k in attr_dict}
            reference = str(reference)
        elif isinstance(reference, cls):
            if not reference.is_trained_:
                raise ValueError("The reference model is not trained; call train() first.")
            registry, input_kind = reference.registry_, reference.input_kind_
            calibration = {k: getattr(reference, k) for k in _REFERENCE_ATTRIBUTES}
        else:
            raise TypeError(
                f"reference must be a {cls.__name__} or the path of a saved one, got "
                f"{type(reference).__name__}."
            )
        internal = build_model_data(
            query,
            Registration.from_registry(registry),
            input_kind=input_kind,
            model_name=cls.__name__,
            min_gene_overlap=min_gene_overlap,
            keep_new_batches=True,
            what="query",
            extra_columns=partial(
                cls._extra_obs_columns, registry, keep_new_batches=True, what="query"
            ),
            extra_layers=partial(cls._extra_layers, registry, what="query"),
            gene_column=gene_column,
        )
        with safe_scvi_loading():
            model = super().load_query_data(
                internal, reference, accelerator=accelerator, device=device, unfrozen=True
            )
        model.module.freeze_for_query(unfrozen=unfrozen)
        batch_field = registry["field_registries"][REGISTRY_KEYS.BATCH_KEY]
        model._after_query_surgery(int(batch_field["summary_stats"]["n_batch"]))
        # The reference's weights already give usable predictions on the query, with its
        # calibrated confidence and novelty threshold (a query without labels keeps them).
        for name, value in calibration.items():
            setattr(model, name, copy.deepcopy(value))
        model.is_trained_ = True
        model.min_gene_overlap_ = min_gene_overlap
        model.is_query_model_ = True
        model._warn_zero_filled_genes(query, "query", gene_column)
        return model

    def _after_query_surgery(self, n_reference_batches: int) -> None:
        """Hook run on a new query model once the reference's weights are loaded.

        Batch categories ``0 .. n_reference_batches - 1`` are the reference's; those after
        are the query's new batches. Models with state computed from the data of each
        batch fill in the new batches here.
        """
