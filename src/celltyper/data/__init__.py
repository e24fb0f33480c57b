"""Data helpers: splitting for training and the demo datasets bundled with celltyper."""

from ._demo import kang_pbmc
from ._splitting import LabelledUnlabelledSplitter, stratified_split

__all__ = ["LabelledUnlabelledSplitter", "kang_pbmc", "stratified_split"]
