"""The shared model contract: annotation, query mapping, input checks."""

from ._annotation import AnnotationMixin
from ._centering import BatchCenteringMixin
from ._data import Registration, build_model_data
from ._genes import GeneOverlap, align_genes, gene_identifier_type
from ._model import CellTyperModel, seeded
from ._query import QueryMixin
from ._validation import check_labels, check_matrix_values

__all__ = [
    "AnnotationMixin",
    "BatchCenteringMixin",
    "CellTyperModel",
    "GeneOverlap",
    "QueryMixin",
    "Registration",
    "align_genes",
    "build_model_data",
    "check_labels",
    "check_matrix_values",
    "gene_identifier_type",
    "seeded",
]
