"""Data helpers: splitting for training and the demo datasets bundled with celltyper."""

from ._demo import kang_pbmc
from ._splitting import LabelledUnlabelledSplitter, balanced_resample, stratified_split

__all__ = [
    "LabelledUnlabelledSplitter",
    "balanced_resample",
    "kang_pbmc",
    "stratified_split",
]
