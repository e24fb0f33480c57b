"""The ``celltyper`` command line: reference-to-query annotation in one command.

``celltyper annotate`` trains a model transductively on a labelled reference and an
unlabelled query (the query's cells enter training without labels, as scNym is meant to be
used), annotates the query and writes ``annotated.h5ad``, ``predictions.csv`` and
``umap.png``. Without ``--reference``/``--query`` it runs on the bundled Kang et al. PBMC
demo.

The steps are small functions (:func:`load_inputs`, :func:`build_training_data`,
:func:`run_annotation`, :func:`write_outputs`) that can be called on their own.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import anndata
import numpy as np
import pandas as pd

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
    """

    reference: anndata.AnnData
    query: anndata.AnnData
    labels_key: str
    batch_key: str | None
    unlabeled_category: str = "Unknown"
    query_labels: pd.Series | None = None
    description: str = ""

    @property
    def training_batch_key(self) -> str:
        """Batch column of the training data: ``batch_key``, else the role column."""
        return self.batch_key if self.batch_key is not None else ROLE_KEY


# -- small helpers -----------------------------------------------------------------------
def _say(stage: str, detail: str) -> None:
    """Print one progress line."""
    print(f"{stage:<11}{detail}", flush=True)


def _shape(adata: anndata.AnnData) -> str:
    return f"{adata.n_obs:,} cells x {adata.n_vars:,} genes"


def available_models() -> dict[str, type]:
    """Model classes of :mod:`celltyper.model`, by lower-case name."""
    from celltyper import model as models

    classes = (getattr(models, name) for name in models.__all__)
    return {cls.__name__.lower(): cls for cls in classes if isinstance(cls, type)}


def resolve_model(name: str) -> type:
    """The model class called ``name`` (case-insensitive).

    Raises
    ------
    CliError
        If no model of :mod:`celltyper.model` has that name; the message lists them.
    """
    models = available_models()
    cls = models.get(name.lower())
    if cls is None:
        choices = ", ".join(c.__name__.lower() for c in models.values())
        raise CliError(f"unknown model {name!r}; choose one of: {choices}")
    return cls


def _read_h5ad(path: str | Path, what: str) -> anndata.AnnData:
    path = Path(path)
    if not path.is_file():
        raise CliError(f"{what} file {str(path)!r} does not exist")
    try:
        adata = anndata.read_h5ad(path)
    except Exception as err:  # h5py and anndata raise many kinds; all mean "unreadable"
        raise CliError(f"could not read {what} file {str(path)!r} as h5ad: {err}") from err
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise CliError(f"{what} file {str(path)!r} is empty ({_shape(adata)})")
    if not adata.var_names.is_unique:
        n_dup = int(adata.var_names.duplicated().sum())
        _say("Genes", f"{what}: {n_dup} duplicated gene names made unique (var_names_make_unique)")
        adata.var_names_make_unique()
    return adata


def _query_labels(
    query: anndata.AnnData, labels_key: str, unlabeled_category: str
) -> pd.Series | None:
    """The query's labels with unlabelled cells as NaN, or None when it has none."""
    if labels_key not in query.obs.columns:
        return None
    labels = query.obs[labels_key].astype(object)
    labels = labels.where(labels.notna() & (labels.astype(str) != unlabeled_category))
    labels = labels.map(lambda v: v if pd.isna(v) else str(v))
    return labels if labels.notna().any() else None


# -- the steps ---------------------------------------------------------------------------
def load_inputs(
    reference: str | Path | None = None,
    query: str | Path | None = None,
    labels_key: str | None = None,
    batch_key: str | None = None,
    unlabeled_category: str = "Unknown",
) -> Inputs:
    """Read the reference and query, or split the bundled demo into the two.

    Parameters
    ----------
    reference, query
        Paths of ``.h5ad`` files; both ``None`` uses :func:`celltyper.datasets.kang_pbmc`
        (reference: ``split == "reference"`` cells, query: ``split == "query"`` cells).
    labels_key
        Label column of the reference; defaults to ``"cell_type"``.
    batch_key
        Batch column, needed in both objects. Defaults to ``"condition"`` for the demo and
        to ``None`` (the reference/query role) for files.
    unlabeled_category
        Label of unlabelled cells.

    Returns
    -------
    The :class:`Inputs`; the query's own labels, if any, are in ``query_labels``.

    Raises
    ------
    CliError
        For a missing or unreadable file, only one of the two paths, or a missing column.
    """
    labels_key = labels_key or DEFAULT_LABELS_KEY
    if (reference is None) != (query is None):
        raise CliError("give both --reference and --query, or neither to run the demo")
    if reference is None:
        from celltyper.datasets import kang_pbmc

        demo = kang_pbmc()
        is_reference = (demo.obs["split"] == "reference").to_numpy()
        ref, qry = demo[is_reference].copy(), demo[~is_reference].copy()
        batch_key = batch_key or DEMO_BATCH_KEY
        description = "Kang et al. (2018) PBMC demo (celltyper.datasets.kang_pbmc)"
        _say("Loading", f"{description}: reference {_shape(ref)}, query {_shape(qry)}")
    else:
        for what, path in (("reference", reference), ("query", query)):
            if not Path(path).is_file():
                raise CliError(f"{what} file {str(path)!r} does not exist")
        ref = _read_h5ad(reference, "reference")
        qry = _read_h5ad(query, "query")
        description = f"reference {reference}, query {query}"
        _say("Loading", f"reference {reference} ({_shape(ref)})")
        _say("", f"query {query} ({_shape(qry)})")

    if labels_key not in ref.obs.columns:
        raise CliError(
            f"--labels-key {labels_key!r} is not a column of the reference's obs; "
            f"available columns: {list(ref.obs.columns)}"
        )
    if batch_key is not None:
        for name, adata in (("reference", ref), ("query", qry)):
            if batch_key not in adata.obs.columns:
                raise CliError(
                    f"--batch-key {batch_key!r} is not a column of the {name}'s obs; "
                    f"available columns: {list(adata.obs.columns)}"
                )
            if adata.obs[batch_key].isna().any():
                raise CliError(f"the {name}'s obs[{batch_key!r}] has missing values")
    truth = _query_labels(qry, labels_key, unlabeled_category)
    if truth is not None:
        _say("", f"query labels in obs[{labels_key!r}] kept aside for scoring only")
    return Inputs(
        reference=ref,
        query=qry,
        labels_key=labels_key,
        batch_key=batch_key,
        unlabeled_category=unlabeled_category,
        query_labels=truth,
        description=description,
    )


def shared_genes(reference: anndata.AnnData, query: anndata.AnnData) -> pd.Index:
    """Genes of both objects, in the reference's order, with a printed overlap report.

    Raises
    ------
    CliError
        If the two share no gene.
    """
    shared = reference.var_names[reference.var_names.isin(query.var_names)]
    n_ref, n_query, n = reference.n_vars, query.n_vars, len(shared)
    _say(
        "Genes",
        f"{n:,} shared: {n / n_ref:.1%} of the reference's {n_ref:,}, "
        f"{n / n_query:.1%} of the query's {n_query:,}",
    )
    if n == 0:
        from celltyper._utils import gene_identifier_type

        kinds = gene_identifier_type(reference.var_names), gene_identifier_type(query.var_names)
        hint = (
            f" (the reference uses {kinds[0]} names, the query {kinds[1]} names)"
            if kinds[0] != kinds[1]
            else ""
        )
        raise CliError(f"the reference and the query have no gene in common{hint}")
    if n < LOW_GENE_OVERLAP * min(n_ref, n_query):
        _say("", f"warning: low gene overlap; only the {n:,} shared genes are used")
    return shared


def _expression_kind(adata: anndata.AnnData, what: str) -> str:
    from celltyper._utils import check_matrix_values

    try:
        return check_matrix_values(adata.X, f"{what}.X")
    except ValueError as err:
        raise CliError(str(err)) from err


def build_training_data(inputs: Inputs) -> anndata.AnnData:
    """One AnnData of reference and query cells for transductive training.

    The objects are joined on their shared genes (:func:`anndata.concat`, inner join).
    ``obs`` holds ``celltyper_role`` (``"reference"``/``"query"``), the training labels
    ``celltyper_train_label`` (the reference labels; every query cell, and every reference
    cell without a label, is the unlabelled category) and the batch column
    (:attr:`Inputs.training_batch_key`).

    Raises
    ------
    CliError
        If the objects share no gene, hold different kinds of values (raw counts and
        normalised), or the reference has fewer than two labelled cell types.
    """
    ref, qry = inputs.reference, inputs.query
    kinds = _expression_kind(ref, "reference"), _expression_kind(qry, "query")
    if kinds[0] != kinds[1]:
        raise CliError(
            f"the reference's X holds {kinds[0]} values but the query's {kinds[1]}; give both "
            "as raw counts (or both normalised the same way)"
        )
    genes = shared_genes(ref, qry)

    unlabeled = inputs.unlabeled_category
    labels = ref.obs[inputs.labels_key].astype(object)
    n_missing = int(labels.isna().sum())
    if n_missing:
        _say("", f"{n_missing:,} reference cells without a label are treated as unlabelled")
    labels = labels.where(labels.notna(), unlabeled).astype(str)
    classes = sorted(set(labels) - {unlabeled})
    if len(classes) < 2:
        raise CliError(
            f"the reference's obs[{inputs.labels_key!r}] has {len(classes)} labelled cell "
            f"type(s) {classes}; at least two are needed (cells labelled {unlabeled!r} are "
            "unlabelled)"
        )

    batch_key = inputs.training_batch_key
    parts = []
    for role, adata, train_labels in (
        ("reference", ref, labels.to_numpy()),
        ("query", qry, np.full(qry.n_obs, unlabeled, dtype=object)),
    ):
        obs = pd.DataFrame(
            {ROLE_KEY: role, TRAIN_LABELS_KEY: train_labels}, index=adata.obs_names.copy()
        )
        if inputs.batch_key is not None:
            obs[batch_key] = adata.obs[batch_key].astype(str).to_numpy()
        light = anndata.AnnData(X=adata[:, genes].X, obs=obs, var=pd.DataFrame(index=genes.copy()))
        parts.append(light)
    duplicated = parts[0].obs_names.isin(parts[1].obs_names).any()
    combined = anndata.concat(
        parts,
        join="inner",
        keys=["reference", "query"] if duplicated else None,
        index_unique="-" if duplicated else None,
    )
    for key in dict.fromkeys([ROLE_KEY, TRAIN_LABELS_KEY, batch_key]):
        combined.obs[key] = combined.obs[key].astype("category")
    return combined


def run_annotation(
    inputs: Inputs,
    training: anndata.AnnData,
    model: str = "scnym",
    max_epochs: int | None = None,
    seed: int = 0,
    accelerator: str = "auto",
):
    """Train a model on ``training`` and annotate ``inputs.query`` with it.

    Parameters
    ----------
    inputs
        From :func:`load_inputs`; ``inputs.query`` gains the annotation columns
        (``obs[<model>]``, ``<model>_confidence``, ``<model>_novelty``, ``<model>_novel``
        and ``obsm["X_<model>"]``).
    training
        From :func:`build_training_data`.
    model
        Name of a class of :mod:`celltyper.model`, case-insensitive.
    max_epochs
        Training epochs; ``None`` uses the model's default.
    seed
        Seed of the weights, the data split and the minibatches.
    accelerator
        As in scvi-tools (``"auto"``, ``"cpu"``, ``"gpu"``).

    Returns
    -------
    ``(model, table)``: the trained model and the annotation table of the query (see
    :meth:`~celltyper.model.SCNYM.annotation_table`).
    """
    import scvi

    cls = resolve_model(model)
    batch_key = inputs.training_batch_key
    is_ref = (training.obs[ROLE_KEY] == "reference").to_numpy()
    n_types = training.obs.loc[is_ref, TRAIN_LABELS_KEY].nunique() - int(
        (training.obs.loc[is_ref, TRAIN_LABELS_KEY] == inputs.unlabeled_category).any()
    )
    _say(
        "Training",
        f"{cls.__name__} on {training.n_obs:,} cells ({int(is_ref.sum()):,} reference, "
        f"{n_types} cell types; {int((~is_ref).sum()):,} query, unlabelled); "
        f"batch key {batch_key!r}; seed {seed}",
    )
    start = time.perf_counter()
    scvi.settings.seed = seed
    cls.setup_anndata(
        training,
        labels_key=TRAIN_LABELS_KEY,
        unlabeled_category=inputs.unlabeled_category,
        batch_key=batch_key,
    )
    init_kwargs = {"seed": seed} if "seed" in inspect.signature(cls).parameters else {}
    fitted = cls(training, **init_kwargs)
    train_kwargs = {"max_epochs": max_epochs, "accelerator": accelerator}
    if "seed" in inspect.signature(fitted.train).parameters:
        train_kwargs["seed"] = seed
    fitted.train(**train_kwargs)
    _say("", f"training finished in {time.perf_counter() - start:.1f} s")

    _say("Predicting", f"{inputs.query.n_obs:,} query cells")
    if batch_key == ROLE_KEY:
        # The model's batches are the roles; tell it these cells are the query's.
        inputs.query.obs[ROLE_KEY] = pd.Categorical(
            ["query"] * inputs.query.n_obs, categories=["query", "reference"]
        )
    table = fitted.annotate(inputs.query, overwrite=True)
    counts = table["prediction"].value_counts()
    summary = ", ".join(f"{name} {n:,}" for name, n in counts.items() if n)
    _say("", f"predicted: {summary}; {int(table['novel'].sum()):,} flagged novel")
    return fitted, table


def score_predictions(inputs: Inputs, table: pd.DataFrame, cell_types: list[str]) -> dict:
    """Scores of the predictions on query cells with a known label (printed).

    Returns
    -------
    ``{}`` when the query has no labels, else accuracy, balanced accuracy, macro F1 and
    Cohen's kappa (:func:`celltyper.metrics.classification_scores`), plus
    ``novelty_auroc`` when the query holds both types of the reference and types it lacks.
    """
    from celltyper.metrics import classification_scores, format_scores, novelty_auroc

    if inputs.query_labels is None:
        return {}
    truth = inputs.query_labels.reindex(table.index)
    known = truth.notna().to_numpy()
    y_true = truth[known].astype(str).to_numpy()
    y_pred = table["prediction"].astype(str).to_numpy()[known]
    scores = classification_scores(y_true, y_pred)
    shown = {k: scores[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")}
    _say("Scores", f"{format_scores(shown)} (on {int(known.sum()):,} labelled query cells)")
    unseen = ~np.isin(y_true, cell_types)
    if unseen.any():
        names = ", ".join(sorted(set(y_true[unseen])))
        _say("", f"{int(unseen.sum()):,} of them are of types the reference lacks ({names})")
        if not unseen.all():
            novelty = table["novelty"].to_numpy()[known]
            scores["novelty_auroc"] = novelty_auroc(novelty, unseen)
            _say("", format_scores({"novelty_auroc": scores["novelty_auroc"]}))
    return scores


def write_outputs(
    inputs: Inputs,
    table: pd.DataFrame,
    output: str | Path,
    key: str,
    extra_uns: dict | None = None,
) -> dict[str, Path]:
    """Write ``predictions.csv``, ``annotated.h5ad`` and ``umap.png`` into ``output``.

    Parameters
    ----------
    inputs
        The inputs, with ``inputs.query`` annotated by :func:`run_annotation`.
    table
        The annotation table of the query.
    output
        Folder to write into (created if needed; existing files are replaced).
    key
        The annotation prefix, the model name in lower case.
    extra_uns
        Stored as ``uns["celltyper"]`` of ``annotated.h5ad`` (strings and numbers only).

    Returns
    -------
    The paths written, by name (``"csv"``, ``"h5ad"``, ``"umap"``); ``"umap"`` is missing
    when the plot could not be drawn (a warning says why).
    """
    from celltyper.pl import latent_umap

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    query = inputs.query
    truth = inputs.query_labels.reindex(table.index) if inputs.query_labels is not None else None

    csv = pd.DataFrame(
        {
            "cell": table.index,
            "prediction": table["prediction"].astype(str).to_numpy(),
            "confidence": table["confidence"].to_numpy(),
            "novelty": table["novelty"].to_numpy(),
            "novel": table["novel"].to_numpy(),
        }
    )
    if truth is not None:
        csv["true_label"] = truth.to_numpy()
    paths = {"csv": out / "predictions.csv", "h5ad": out / "annotated.h5ad"}
    csv.to_csv(paths["csv"], index=False)

    if extra_uns:
        query.uns["celltyper"] = dict(extra_uns)
    query.write_h5ad(paths["h5ad"])

    # Shared categories give a cell type the same colour in the predicted and true panels.
    known_types = list(table["prediction"].cat.categories)
    columns = {
        key: pd.Categorical(table["prediction"].to_numpy(), categories=known_types),
        f"{key}_confidence": table["confidence"].to_numpy(),
    }
    if truth is not None:
        unseen = sorted(set(truth.dropna()) - set(known_types))
        columns[f"{inputs.labels_key} (true)"] = pd.Categorical(
            truth.to_numpy(), categories=known_types + unseen
        )
    plot_data = anndata.AnnData(
        obs=pd.DataFrame(columns, index=table.index),
        obsm={f"X_{key}": np.asarray(query.obsm[f"X_{key}"])},
    )
    try:
        paths["umap"] = latent_umap(plot_data, f"X_{key}", list(columns), out / "umap.png")
    except Exception as err:  # a failed plot must not lose the predictions written above
        print(f"warning: could not draw the UMAP: {err}", file=sys.stderr, flush=True)
    _say("Writing", ", ".join(str(p) for p in paths.values()))
    return paths


# -- command line ------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``celltyper`` command."""
    from celltyper import __version__

    parser = argparse.ArgumentParser(
        prog="celltyper",
        description="Cell-type annotation with scvi-tools models.",
    )
    parser.add_argument("--version", action="version", version=f"celltyper {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    annotate = commands.add_parser(
        "annotate",
        help="transfer cell-type labels from a reference to a query",
        description=(
            "Train a model on a labelled reference and an unlabelled query together "
            "(transductive, as scNym is used), annotate the query and write "
            "annotated.h5ad, predictions.csv and umap.png. Without --reference/--query it "
            "runs on the bundled Kang et al. PBMC demo (control -> stimulated cells)."
        ),
    )
    annotate.add_argument("--reference", metavar="REF.h5ad", help="labelled reference cells")
    annotate.add_argument("--query", metavar="QUERY.h5ad", help="cells to annotate")
    annotate.add_argument(
        "--labels-key",
        metavar="KEY",
        help=f"reference obs column with the cell types (default: {DEFAULT_LABELS_KEY}); "
        "if the query has it too, its values are used only to score the predictions",
    )
    annotate.add_argument(
        "--batch-key",
        metavar="KEY",
        help="obs column with batches, in both files (default: the reference/query role; "
        f"{DEMO_BATCH_KEY!r} for the demo)",
    )
    annotate.add_argument(
        "--unlabeled-category",
        default="Unknown",
        metavar="LABEL",
        help="label of unlabelled cells (default: Unknown)",
    )
    annotate.add_argument(
        "--model",
        default="scnym",
        help="model of celltyper.model, case-insensitive (default: scnym; available: "
        f"{', '.join(available_models())})",
    )
    annotate.add_argument(
        "--output",
        default=DEFAULT_OUTPUT,
        metavar="DIR",
        help=f"output folder (default: {DEFAULT_OUTPUT}/)",
    )
    annotate.add_argument(
        "--max-epochs",
        type=_positive_int,
        metavar="N",
        help="training epochs (default: the model's own, with early stopping)",
    )
    annotate.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    annotate.add_argument(
        "--accelerator",
        default="auto",
        choices=["auto", "cpu", "gpu"],
        help="where to train (default: auto)",
    )
    annotate.set_defaults(handler=_annotate, command_parser=annotate)
    return parser


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _annotate(args: argparse.Namespace) -> int:
    from celltyper import __version__

    start = time.perf_counter()
    cls = resolve_model(args.model)
    key = cls.__name__.lower()
    inputs = load_inputs(
        args.reference, args.query, args.labels_key, args.batch_key, args.unlabeled_category
    )
    training = build_training_data(inputs)
    fitted, table = run_annotation(
        inputs,
        training,
        model=key,
        max_epochs=args.max_epochs,
        seed=args.seed,
        accelerator=args.accelerator,
    )
    scores = score_predictions(inputs, table, fitted.cell_types)
    provenance = {
        "version": __version__,
        "model": cls.__name__,
        "data": inputs.description,
        "labels_key": inputs.labels_key,
        "batch_key": inputs.training_batch_key,
        "seed": int(args.seed),
        "n_genes": int(training.n_vars),
        "novelty_threshold": (
            np.nan if fitted.novelty_threshold_ is None else float(fitted.novelty_threshold_)
        ),
        **{f"score_{name}": float(value) for name, value in scores.items()},
    }
    write_outputs(inputs, table, args.output, key, extra_uns=provenance)
    _say("Done", f"in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``celltyper`` command line.

    Parameters
    ----------
    argv
        Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns
    -------
    The exit code (0 on success). Bad arguments or inputs exit with code 2 through
    :class:`SystemExit`, with a message, as argparse does.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except CliError as err:
        args.command_parser.error(str(err))
    return 2  # not reached: error() exits


if __name__ == "__main__":
    raise SystemExit(main())
