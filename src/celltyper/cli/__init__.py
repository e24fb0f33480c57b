"""The ``celltyper`` command line: reference-to-query annotation in one command.

``celltyper annotate`` trains a model transductively on a labelled reference and an
unlabelled query (the query's cells enter training without labels, as scNym is meant to be
used), annotates the query and writes ``annotated.h5ad``, ``predictions.csv`` and
``umap.png``. Without ``--reference``/``--query`` it runs on the bundled Kang et al. PBMC
demo.

The steps are small functions that can be called on their own: :func:`load_inputs` and
:func:`build_training_data` (``_inputs``), :func:`run_annotation` (``_run``),
:func:`score_predictions` and :func:`write_outputs` (``_outputs``); :func:`main` and
:func:`build_parser` (``_parser``) are the command itself.
"""

import importlib

from ._common import (
    DEFAULT_LABELS_KEY,
    DEFAULT_OUTPUT,
    DEMO_BATCH_KEY,
    LOW_GENE_OVERLAP,
    MODEL_NAMES,
    ROLE_KEY,
    TRAIN_LABELS_KEY,
    CliError,
    Inputs,
)
from ._parser import build_parser, main

#: The steps, imported on first use: `celltyper --help` needs none of them.
_LAZY = {
    "build_training_data": "_inputs",
    "load_inputs": "_inputs",
    "shared_genes": "_inputs",
    "score_predictions": "_outputs",
    "write_outputs": "_outputs",
    "annotate_command": "_run",
    "available_models": "_run",
    "resolve_model": "_run",
    "run_annotation": "_run",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_LABELS_KEY",
    "DEFAULT_OUTPUT",
    "DEMO_BATCH_KEY",
    "LOW_GENE_OVERLAP",
    "MODEL_NAMES",
    "ROLE_KEY",
    "TRAIN_LABELS_KEY",
    "CliError",
    "Inputs",
    "annotate_command",
    "available_models",
    "build_parser",
    "build_training_data",
    "load_inputs",
    "main",
    "resolve_model",
    "run_annotation",
    "score_predictions",
    "shared_genes",
    "write_outputs",
]
