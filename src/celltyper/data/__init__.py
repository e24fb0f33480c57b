"""Data helpers: splitting for training and the demo datasets bundled with celltyper."""

from ._demo import kang_pbmc
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
    "MASK_TOKEN",
    "N_SPECIAL_TOKENS",
    "PAD_TOKEN",
    "LabelledUnlabelledSplitter",
    "RankTokens",
    "balanced_resample",
    "kang_pbmc",
    "nonzero_gene_medians",
    "rank_value_tokenize",
    "stratified_split",
    "tokenize_matrix",
]
