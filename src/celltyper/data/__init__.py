"""Data helpers: splitting for training and the demo datasets bundled with celltyper."""

from ._all_cells import AllCellsSplitter
from ._demo import kang_pbmc
from ._pseudo_labels import (
    DATASET_KEY,
    PSEUDO_LABELS_KEY,
    PseudoLabelDataModule,
    check_resolutions,
    kmeans_pseudo_labels,
    n_clusters_for,
)
from ._splitting import LabelledUnlabelledSplitter, balanced_resample, stratified_split
from ._tokenize import (
    CLS_TOKEN,
    MASK_TOKEN,
    N_SPECIAL_TOKENS,
    PAD_TOKEN,
    RankTokens,
    nonzero_gene_medians,
    rank_value_tokenize,
    tokenize_matrix,
)

__all__ = [
    "CLS_TOKEN",
    "DATASET_KEY",
    "MASK_TOKEN",
    "N_SPECIAL_TOKENS",
    "PAD_TOKEN",
    "PSEUDO_LABELS_KEY",
    "AllCellsSplitter",
    "LabelledUnlabelledSplitter",
    "PseudoLabelDataModule",
    "RankTokens",
    "balanced_resample",
    "check_resolutions",
    "kang_pbmc",
    "kmeans_pseudo_labels",
    "n_clusters_for",
    "nonzero_gene_medians",
    "rank_value_tokenize",
    "stratified_split",
    "tokenize_matrix",
]
