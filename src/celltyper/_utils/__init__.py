"""Private helpers below ``pp``, ``model`` and the command line: input validation,
normalisation, gene alignment and seeding. Nothing here imports the rest of celltyper."""

from ._genes import (
    GeneOverlap,
    align_genes,
    columns_holding,
    gene_identifier_type,
    gene_kind_advice,
    gene_names,
    gene_positions,
    select_gene_columns,
)
from ._matrix import (
    CHUNK_VALUES,
    default_chunk_size,
    dense_float32,
    is_in_memory,
    iter_row_chunks,
    log1p_scaled_counts,
    n_columns,
    n_rows,
    row_totals,
)
from ._seed import seeded
from ._validation import (
    InputKind,
    check_labels,
    check_matrix_values,
    check_not_empty,
    check_obs_key,
    get_matrix,
    require_counts,
    sampled_input_kind,
)

__all__ = [
    "CHUNK_VALUES",
    "GeneOverlap",
    "InputKind",
    "align_genes",
    "check_labels",
    "check_matrix_values",
    "check_not_empty",
    "check_obs_key",
    "columns_holding",
    "default_chunk_size",
    "dense_float32",
    "gene_identifier_type",
    "gene_kind_advice",
    "gene_names",
    "gene_positions",
    "get_matrix",
    "is_in_memory",
    "iter_row_chunks",
    "log1p_scaled_counts",
    "n_columns",
    "n_rows",
    "require_counts",
    "row_totals",
    "sampled_input_kind",
    "seeded",
    "select_gene_columns",
]
