"""celltyper: cell-type annotation and cell representation methods as scvi-tools models."""

from importlib.metadata import PackageNotFoundError, version

from . import data, datasets, metrics, model, module, nn, pl, pp, tl, train

try:
    __version__ = version("celltyper")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = [
    "__version__",
    "data",
    "datasets",
    "metrics",
    "model",
    "module",
    "nn",
    "pl",
    "pp",
    "tl",
    "train",
]
