"""Training a model on the joined data and annotating the query: the ``annotate`` command."""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import anndata
import numpy as np
import pandas as pd

from ._common import (
    MODEL_NAMES,
    ROLE_KEY,
    TRAIN_LABELS_KEY,
    CliError,
    Inputs,
    Terminated,
    say,
)
from ._inputs import build_training_data, load_inputs
from ._options import check_model_options, check_train_options
from ._outputs import score_predictions, write_outputs


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


def _setup_error(
    cls: type, err: Exception, inputs: Inputs, model_options: dict[str, object]
) -> CliError:
    """A usage error carrying the model's own message about the training data."""
    # str() of a KeyError is the repr of its message; the message itself reads better.
    message = str(err.args[0]) if err.args else str(err)
    if TRAIN_LABELS_KEY in message:
        message += (
            f" ({TRAIN_LABELS_KEY} holds the reference's --labels-key "
            f"{inputs.labels_key!r} labels; query cells are unlabelled)"
        )
    if model_options:
        return CliError(
            f"{cls.__name__} cannot be built on these data with --model-option values "
            f"{model_options}: {message}"
        )
    return CliError(f"{cls.__name__} cannot train on these data: {message}")


def context_setup(cls: type, context_layer: str | None) -> dict[str, str]:
    """The setup keywords of ``--context-layer`` for ``cls`` (none without the option).

    Raises
    ------
    CliError
        If the model has no paired mode to read a context with.
    """
    if context_layer is None:
        return {}
    if "context_layer" not in inspect.signature(cls.setup_anndata).parameters:
        raise CliError(
            f"--context-layer {context_layer!r}: {cls.__name__} reads no context profile; "
            "the paired mode is rankformer's (--model rankformer)"
        )
    return {"context_layer": context_layer}


def run_annotation(
    inputs: Inputs,
    training: anndata.AnnData,
    model: str = "scnym",
    max_epochs: int | None = None,
    seed: int = 0,
    accelerator: str = "auto",
    *,
    batch_size: int | None = None,
    early_stopping: bool | None = None,
    context_layer: str | None = None,
    train_options: dict[str, object] | None = None,
    model_options: dict[str, object] | None = None,
    stream_to: str | None = None,
) -> tuple[object, pd.DataFrame]:
    """Train a model on ``training`` and annotate ``inputs.query`` with it.

    Parameters
    ----------
    inputs
        From :func:`~celltyper.cli.load_inputs`; ``inputs.query`` gains the annotation
        columns (``obs[<model>]``, ``<model>_confidence``, ``<model>_novelty``,
        ``<model>_novel`` and ``obsm["X_<model>"]``).
    training
        From :func:`~celltyper.cli.build_training_data`.
    model
        Name of a class of :mod:`celltyper.model`, case-insensitive.
    max_epochs
        Training epochs; ``None`` uses the model's default.
    seed
        Seed of the weights, the data split and the minibatches.
    accelerator
        As in scvi-tools (``"auto"``, ``"cpu"``, ``"gpu"``).
    batch_size
        Cells per minibatch; ``None`` uses the model's default.
    early_stopping
        Whether to stop on the held-out cells; ``None`` uses the model's default.
    context_layer
        Layer of ``training`` and ``inputs.query`` with each cell's context profile: the
        model (RANKFORMER) trains in its paired mode.
    stream_to
        Annotate chunk by chunk and write the table and latent to this ``.h5``/``.zarr``
        file as they are computed (``annotation_table(write_to=...)``) instead of into
        ``inputs.query``; the table returned is read back from it.
    train_options
        Further keywords of the model's ``train()`` (``--train-option``), already
        checked by name.
    model_options
        Keywords of the model's constructor (``--model-option``).

    Returns
    -------
    ``(model, table)``: the trained model and the annotation table of the query (see
    :meth:`~celltyper.model.SCNYM.annotation_table`).

    Raises
    ------
    CliError
        When the model rejects the training data in its setup (e.g. fewer than two
        labelled cell types), or rejects a value of ``model_options`` or
        ``train_options``; the message is the model's.
    """
    train_options, model_options = dict(train_options or {}), dict(model_options or {})
    cls = resolve_model(model)
    batch_key = inputs.training_batch_key
    is_ref = (training.obs[ROLE_KEY] == "reference").to_numpy()
    ref_labels = training.obs.loc[is_ref, TRAIN_LABELS_KEY]
    labelled = ref_labels != inputs.unlabeled_category
    n_types = ref_labels[labelled].nunique()
    say(
        "Training",
        f"{cls.__name__} on {training.n_obs:,} cells: {int(is_ref.sum()):,} reference "
        f"({int(labelled.sum()):,} labelled with {n_types} cell types, "
        f"{int((~labelled).sum()):,} unlabelled), {int((~is_ref).sum()):,} query "
        f"(unlabelled); batch key {batch_key!r}; seed {seed}",
    )
    start = time.perf_counter()
    # The models validate their data here and name what is wrong; that is a problem with
    # the user's files, not a crash, so it ends as a usage error with the model's words.
    try:
        cls.setup_anndata(
            training,
            labels_key=TRAIN_LABELS_KEY,
            unlabeled_category=inputs.unlabeled_category,
            batch_key=batch_key,
            **context_setup(cls, context_layer),
        )
        fitted = cls(training, seed=seed, **model_options)
    except (ValueError, KeyError, TypeError) as err:
        raise _setup_error(cls, err, inputs, model_options) from err
    # None reaches train() as None: the model's default, whatever it is.
    with warnings.catch_warnings():
        # The command's own one-line message reports an interruption.
        warnings.filterwarnings("ignore", message="Training interrupted")
        try:
            with _third_party_prints() as printed:
                fitted.train(
                    max_epochs=max_epochs,
                    batch_size=batch_size,
                    early_stopping=early_stopping,
                    accelerator=accelerator,
                    seed=seed,
                    **train_options,
                )
        except (ValueError, TypeError) as err:
            if not train_options:
                raise
            # With options of the user's, a rejected value is most likely one of them.
            raise CliError(
                f"{cls.__name__}.train() rejected the --train-option values {train_options}: {err}"
            ) from err
    if fitted.training_interrupted_:
        # train() keeps a usable model; a command must not report an unfinished run.
        raise Terminated() if "SIGTERM" in fitted._interruption else KeyboardInterrupt()
    stopped = " (early stopping)" if printed.early_stopped else ""
    say("", f"training finished in {time.perf_counter() - start:.1f} s{stopped}")

    say("Predicting", f"{inputs.query.n_obs:,} query cells")
    if batch_key == ROLE_KEY:
        # The model's batches are the roles; tell it these cells are the query's.
        inputs.query.obs[ROLE_KEY] = pd.Categorical(
            ["query"] * inputs.query.n_obs, categories=["query", "reference"]
        )
    if stream_to is None:
        table = fitted.annotate(inputs.query, overwrite=True, gene_column=inputs.query_gene_column)
    else:
        from celltyper.model.base import read_annotation

        fitted.annotation_table(
            inputs.query, gene_column=inputs.query_gene_column, write_to=stream_to
        )
        table, _ = read_annotation(stream_to)
    counts = table["prediction"].value_counts()
    summary = ", ".join(f"{name} {n:,}" for name, n in counts.items() if n)
    say("", f"predicted: {summary}; {int(table['novel'].sum()):,} flagged novel")
    return fitted, table


#: What scvi-tools' early stopping prints when it stops a fit.
_EARLY_STOP = "Signaling Trainer to stop"


class _StdoutFilter:
    """Standard output that drops scvi-tools' early-stopping message and passes the rest.

    Everything else, the progress bar included (Lightning draws it on stdout), goes
    through at once; the command reports the early stop in its own words.
    """

    def __init__(self, stream):
        self._stream = stream
        self.early_stopped = False
        self._dropped_last = False

    def write(self, text: str) -> int:
        # print() writes the message, then its line end in a second call.
        dropped = _EARLY_STOP in text or (self._dropped_last and text == "\n")
        self.early_stopped = self.early_stopped or _EARLY_STOP in text
        self._dropped_last = dropped
        return len(text) if dropped else self._stream.write(text)

    def __getattr__(self, name: str):
        # flush, isatty, encoding, fileno, ...: the real stream's.
        return getattr(self._stream, name)


@contextmanager
def _third_party_prints() -> Iterator[_StdoutFilter]:
    """Filter what training prints to stdout (see :class:`_StdoutFilter`)."""
    filtered = _StdoutFilter(sys.stdout)
    with redirect_stdout(filtered):
        yield filtered


#: Third-party lines that say nothing to a user of the command: Lightning's device and
#: "Tip" banners, scvi-tools' setup-transfer notice, and deprecation notices of theirs.
_QUIET_LOGGERS = ("lightning.pytorch", "lightning.fabric", "scvi")
_QUIET_WARNINGS = (
    r".*LeafSpec.*",
    r"The number of training batches .* is smaller than the logging interval",
    r"Found \d+ module\(s\) in eval mode",
)


@contextmanager
def quiet_third_party() -> Iterator[None]:
    """Silence other packages' informational output for the duration of a command.

    Enter it once they are imported: Lightning and scvi-tools set their loggers' levels
    when they load.
    """
    levels = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    with warnings.catch_warnings():
        for pattern in _QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


def annotate_command(args: argparse.Namespace) -> int:
    """Run ``celltyper annotate`` with parsed arguments; returns the exit code (0).

    Raises
    ------
    CliError
        For bad inputs, caught by :func:`~celltyper.cli.main` as a usage error.
    """
    from celltyper import __version__

    start = time.perf_counter()
    if args.model.lower() not in MODEL_NAMES:
        resolve_model(args.model)  # the error that lists the models
    # Bad files are reported before the model stack (torch, scvi-tools) loads.
    inputs = load_inputs(
        args.reference,
        args.query,
        args.labels_key,
        args.batch_key,
        args.unlabeled_category,
        reference_gene_column=args.reference_gene_column,
        query_gene_column=args.query_gene_column,
    )
    cls = resolve_model(args.model)
    key = cls.__name__.lower()
    context_setup(cls, args.context_layer)  # before any data are joined
    train_options = check_train_options(cls, args.train_options)
    model_options = check_model_options(cls, args.model_options)
    stream_to = None
    if inputs.query.n_obs > args.stream_above:
        Path(args.output).mkdir(parents=True, exist_ok=True)
        stream_to = str(Path(args.output) / "annotation.h5")
    with quiet_third_party():
        training = build_training_data(inputs, context_layer=args.context_layer)
        fitted, table = run_annotation(
            inputs,
            training,
            model=key,
            max_epochs=args.max_epochs,
            seed=args.seed,
            accelerator=args.accelerator,
            batch_size=args.batch_size,
            early_stopping=args.early_stopping,
            context_layer=args.context_layer,
            train_options=train_options,
            model_options=model_options,
            stream_to=stream_to,
        )
        scores = score_predictions(inputs, table, fitted.cell_types)
        threshold = fitted.novelty_threshold_
        provenance = {
            "version": __version__,
            "model": cls.__name__,
            "data": inputs.description,
            "labels_key": inputs.labels_key,
            "batch_key": inputs.training_batch_key,
            "seed": int(args.seed),
            "n_genes": int(training.n_vars),
            **({"context_layer": args.context_layer} if args.context_layer else {}),
            "novelty_threshold": np.nan if threshold is None else float(threshold),
            **{f"score_{name}": float(value) for name, value in scores.items()},
        }
        write_outputs(
            inputs, table, args.output, key, extra_uns=provenance, annotated=stream_to is None
        )
        say("Done", f"in {time.perf_counter() - start:.1f} s")
    return 0
