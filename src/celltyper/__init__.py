"""celltyper: cell-type annotation and cell representation methods as scvi-tools models."""

import importlib
from importlib.metadata import PackageNotFoundError, version

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

_SUBMODULES = frozenset(__all__) - {"__version__"}


def __getattr__(name: str):
    # Submodules load on first use: `celltyper --help` must not import torch and scvi-tools.
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES)
