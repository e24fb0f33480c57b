"""What every step of the command line shares: its inputs, usage error and progress lines."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the parser and --help must not wait for the data stack
    import anndata
    import pandas as pd

#: The models of celltyper.model, by command-line name, without importing them (and
#: torch): the parser and --help must answer at once. A test keeps this in step.
MODEL_NAMES = ("cellular", "rankformer", "scatlasvae", "scnym", "scpretrain")
#: Column of the training data telling reference from query cells.
ROLE_KEY = "celltyper_role"
#: Column of the training data holding the reference labels, query cells unlabelled.
TRAIN_LABELS_KEY = "celltyper_train_label"
#: Default label column (the demo's and the usual name).
DEFAULT_LABELS_KEY = "cell_type"
#: Batch column of the demo data.
DEMO_BATCH_KEY = "condition"
#: Default output folder.
DEFAULT_OUTPUT = "celltyper_output"
#: Below this share of shared genes (of either side) a warning is printed.
LOW_GENE_OVERLAP = 0.5


class CliError(Exception):
    """A problem with the command-line arguments or input files; exits with code 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program was, so it stops like Ctrl+C (exit code 143)."""


@dataclass
class Inputs:
    """Reference and query data of one ``celltyper annotate`` run.

    Attributes
    ----------
    reference
        Reference cells; ``reference.obs[labels_key]`` holds their cell types.
    query
        Query cells to annotate.
    labels_key
        Label column of the reference.
    batch_key
        Batch column present in both objects, or ``None`` to use the reference/query role
        as the batch (domain) of each cell.
    unlabeled_category
        Label marking unlabelled cells.
    query_labels
        The query's own labels, indexed by its ``obs_names`` and ``NaN`` where unknown,
        used only to score the predictions; ``None`` when the query has no labels.
    description
        Where the data came from, for messages and provenance.
    reference_gene_column, query_gene_column
        ``var`` columns holding the gene names to join and align on, instead of each
        object's ``var_names`` (``--reference-gene-column``, ``--query-gene-column``).
    """

    reference: anndata.AnnData
    query: anndata.AnnData
    labels_key: str
    batch_key: str | None
    unlabeled_category: str = "Unknown"
    query_labels: pd.Series | None = None
    description: str = ""
    reference_gene_column: str | None = None
    query_gene_column: str | None = None

    @property
    def training_batch_key(self) -> str:
        """Batch column of the training data: ``batch_key``, else the role column."""
        return self.batch_key if self.batch_key is not None else ROLE_KEY


def say(stage: str, detail: str) -> None:
    """Print one progress line, the stage name in a fixed-width column.

    Parameters
    ----------
    stage
        Short name of the step (``"Loading"``, ``"Training"``, ...); empty continues the
        previous step.
    detail
        The message.
    """
    print(f"{stage:<11}{detail}", flush=True)


def shape(adata: anndata.AnnData) -> str:
    """``"<cells> cells x <genes> genes"`` for messages."""
    return f"{adata.n_obs:,} cells x {adata.n_vars:,} genes"
