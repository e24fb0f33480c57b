"""Data helpers: splitting for training and the demo datasets bundled with celltyper."""

from ._all_cells import AllCellsSplitter
from ._blocks import BlockShuffledLoader, cell_loader
from ._demo import kang_pbmc
from ._planted import PREVIOUS_LAYER, planted_state_changes
from ._pseudo_labels import (
    DATASET_KEY,
    PSEUDO_LABELS_KEY,
    PseudoLabelDataModule,
    check_resolutions,
    kmeans_pseudo_labels,
    n_clusters_for,
)
from ._splitting import (
    CyclingConcatDataLoader,
    LabelledUnlabelledSplitter,
    balanced_resample,
    stratified_split,
)
from ._tokenize import (
    CLS_TOKEN,
    CONTEXT_SEGMENT,
    CURRENT_SEGMENT,
    MASK_TOKEN,
    N_SPECIAL_TOKENS,
    PAD_TOKEN,
    RankTokens,
    join_paired_tokens,
    nonzero_gene_medians,
    paired_rank_value_tokenize,
    rank_value_tokenize,
    sep_token,
    tokenize_matrix,
    tokenize_paired_matrices,
)

__all__ = [
    "CLS_TOKEN",
    "CONTEXT_SEGMENT",
    "CURRENT_SEGMENT",
    "DATASET_KEY",
    "MASK_TOKEN",
    "N_SPECIAL_TOKENS",
    "PAD_TOKEN",
    "PREVIOUS_LAYER",
    "PSEUDO_LABELS_KEY",
    "AllCellsSplitter",
    "BlockShuffledLoader",
    "CyclingConcatDataLoader",
    "LabelledUnlabelledSplitter",
    "PseudoLabelDataModule",
    "RankTokens",
    "balanced_resample",
    "cell_loader",
    "check_resolutions",
    "join_paired_tokens",
    "kang_pbmc",
    "kmeans_pseudo_labels",
    "n_clusters_for",
    "nonzero_gene_medians",
    "paired_rank_value_tokenize",
    "planted_state_changes",
    "rank_value_tokenize",
    "sep_token",
    "stratified_split",
    "tokenize_matrix",
    "tokenize_paired_matrices",
]
