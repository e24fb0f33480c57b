"""The shared model contract: annotation, query mapping, input checks."""

from celltyper._utils import (
    GeneOverlap,
    align_genes,
    check_labels,
    check_matrix_values,
    gene_identifier_type,
    seeded,
)

from ._annotation import AnnotationMixin
from ._centering import BatchCenteringMixin, UnmeasuredGenesMixin
from ._data import Registration, build_model_data
from ._fields import FieldFactory
from ._model import CellTyperModel
from ._output import read_annotation
from ._persistence import PersistenceMixin, convert_legacy_model
from ._query import QueryMixin
from ._training import TrainingMixin, TrainingStage, plan_parameters

__all__ = [
    "AnnotationMixin",
    "BatchCenteringMixin",
    "CellTyperModel",
    "FieldFactory",
    "GeneOverlap",
    "PersistenceMixin",
    "QueryMixin",
    "Registration",
    "TrainingMixin",
    "TrainingStage",
    "UnmeasuredGenesMixin",
    "align_genes",
    "build_model_data",
    "check_labels",
    "check_matrix_values",
    "convert_legacy_model",
    "gene_identifier_type",
    "plan_parameters",
    "read_annotation",
    "seeded",
]
