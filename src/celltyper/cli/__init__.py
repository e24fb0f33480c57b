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

from ._common import (
    DEFAULT_LABELS_KEY,
    DEFAULT_OUTPUT,
    DEMO_BATCH_KEY,
    LOW_GENE_OVERLAP,
    ROLE_KEY,
    TRAIN_LABELS_KEY,
    CliError,
    Inputs,
)
from ._inputs import build_training_data, load_inputs, shared_genes
from ._outputs import score_predictions, write_outputs
from ._parser import build_parser, main
from ._run import annotate_command, available_models, resolve_model, run_annotation

__all__ = [
    "DEFAULT_LABELS_KEY",
    "DEFAULT_OUTPUT",
    "DEMO_BATCH_KEY",
    "LOW_GENE_OVERLAP",
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
