"""The argument parser of the ``celltyper`` command and its entry point :func:`main`."""

from __future__ import annotations

import argparse
import ast
import gc
import os
import signal
import sys
import threading

from ._common import (
    DEFAULT_LABELS_KEY,
    DEFAULT_OUTPUT,
    DEMO_BATCH_KEY,
    MODEL_NAMES,
    CliError,
    Terminated,
)


def _annotate(args: argparse.Namespace) -> int:
    # The data and model stack load only once a command runs.
    from ._run import annotate_command

    return annotate_command(args)


def _in_gc_callback(frame) -> bool:
    """Whether ``frame`` runs inside a garbage-collector callback (JAX registers one)."""
    codes = {getattr(callback, "__code__", None) for callback in gc.callbacks}
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


def _raise_when_safe(exception: type[BaseException]):
    """A signal handler that raises ``exception`` where the program is, unless that is a
    garbage-collector callback: Python prints an exception raised there ("Exception
    ignored in ...") and drops it, so the run would go on. The signal is then sent again
    once the callback has had time to return."""

    def handler(signum, frame) -> None:
        if _in_gc_callback(frame):
            timer = threading.Timer(0.05, os.kill, (os.getpid(), signum))
            _RESENDS.append(timer)
            timer.start()
            return
        _cancel_resends()
        raise exception()

    return handler


#: Signals to send again (see :func:`_raise_when_safe`); cancelled once one is raised.
_RESENDS: list[threading.Timer] = []


def _cancel_resends() -> None:
    while _RESENDS:
        _RESENDS.pop().cancel()


def _stop_on_signals() -> dict[int, object] | None:
    """Make SIGTERM and Ctrl+C stop the command where it is; returns the handlers they
    replaced."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_when_safe(Terminated))}
    # Ctrl+C keeps a disposition the caller chose (ignored under nohup, say).
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        handler = _raise_when_safe(KeyboardInterrupt)
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, handler)
    return previous


def _positive_int(value: str) -> int:
    """argparse type of counts: a bad value stops the run before any data is read."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


#: Words a shell user types for Python's True, False and None.
_LITERAL_WORDS = {"true": True, "false": False, "none": None, "null": None}


def option_value(text: str) -> object:
    """A ``--train-option``/``--model-option`` value: a Python literal, else the text.

    ``3`` is an int, ``1e-3`` a float, ``True``/``true`` a bool, ``None``/``none`` None,
    ``[1, 2]`` a list; anything that is no literal (``no_new_identity``) stays a string.
    """
    word = text.strip()
    if word.lower() in _LITERAL_WORDS:
        return _LITERAL_WORDS[word.lower()]
    try:
        return ast.literal_eval(word)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _key_value(text: str) -> tuple[str, object]:
    """argparse type of ``KEY=VALUE``: a malformed pair stops the run before data is read."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE with KEY a keyword name (e.g. lr=1e-3), got {text!r}"
        )
    return key, option_value(value)


def _add_data_options(annotate: argparse.ArgumentParser) -> None:
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
        "--context-layer",
        metavar="LAYER",
        help="layer of both files holding each cell's context profile, raw counts row by "
        "row (e.g. its lineage at the previous time point): trains rankformer in its "
        "paired mode (CLS + the cell's genes + SEP + the context's genes)",
    )
    annotate.add_argument(
        "--reference-gene-column",
        metavar="COLUMN",
        help="reference var column with the gene names to match on (e.g. gene_ids), "
        "instead of its var_names",
    )
    annotate.add_argument(
        "--query-gene-column",
        metavar="COLUMN",
        help="query var column with the gene names to match on (e.g. gene_ids when the "
        "reference has Ensembl IDs and the query symbols), instead of its var_names",
    )
    annotate.add_argument(
        "--output",
        default=DEFAULT_OUTPUT,
        metavar="DIR",
        help=f"output folder (default: {DEFAULT_OUTPUT}/)",
    )


def _add_training_options(annotate: argparse.ArgumentParser) -> None:
    # Training options default to None, which the model's train() reads as its own default.
    annotate.add_argument(
        "--model",
        default="scnym",
        help="model of celltyper.model, case-insensitive (default: scnym; available: "
        f"{', '.join(MODEL_NAMES)})",
    )
    annotate.add_argument(
        "--max-epochs",
        type=_positive_int,
        metavar="N",
        help="training epochs (default: the model's own)",
    )
    annotate.add_argument(
        "--batch-size",
        type=_positive_int,
        metavar="N",
        help="cells per minibatch (default: the model's own)",
    )
    annotate.add_argument(
        "--early-stopping",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="stop training once the held-out reference cells stop improving "
        "(default: the model's own choice)",
    )
    annotate.add_argument(
        "--train-option",
        action="append",
        type=_key_value,
        default=[],
        metavar="KEY=VALUE",
        dest="train_options",
        help="a keyword of the model's train(): its training options, hyperparameters "
        "(lr=1e-3), data-splitter settings or Lightning Trainer keywords "
        "(gradient_clip_val=1.0); repeatable. VALUE is read as a Python literal (3, 0.5, "
        "True, None, [1, 2]; true/false/none too), anything else as text. An unknown KEY "
        "is an error that lists the model's keywords",
    )
    annotate.add_argument(
        "--model-option",
        action="append",
        type=_key_value,
        default=[],
        metavar="KEY=VALUE",
        dest="model_options",
        help="a keyword of the model's constructor (n_latent=16, dropout_rate=0.2); "
        "repeatable, VALUE read as for --train-option",
    )
    annotate.add_argument(
        "--stream-above",
        type=_cell_count,
        default=STREAM_ABOVE,
        metavar="N",
        help="annotate a query of more than N cells chunk by chunk, writing its table and "
        "latent to annotation.h5 as they are computed (predictions.csv follows; "
        "annotated.h5ad and umap.png are left out); 0 always streams (default: "
        f"{STREAM_ABOVE:,})",
    )
    annotate.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    annotate.add_argument(
        "--accelerator",
        default="auto",
        choices=["auto", "cpu", "gpu"],
        help="where to train (default: auto)",
    )


#: Query cells above which ``annotate`` streams the annotation to disk (``--stream-above``).
STREAM_ABOVE = 500_000


def _cell_count(text: str) -> int:
    """A whole number of cells >= 0 (``--stream-above``)."""
    try:
        value = int(text.replace("_", "").replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of cells, got {text!r}"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of cells >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``celltyper`` command.

    Returns
    -------
    The parser; each sub-command sets ``handler`` (the function that runs it) and
    ``command_parser`` (its own parser, for usage errors) in the parsed namespace.
    """
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
    _add_data_options(annotate)
    _add_training_options(annotate)
    annotate.set_defaults(handler=_annotate, command_parser=annotate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``celltyper`` command line.

    Parameters
    ----------
    argv
        Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns
    -------
    The exit code (0 on success). Bad arguments or inputs exit with code 2 through
    :class:`SystemExit`, with a message, as argparse does; a diverged training returns 1
    with the model's advice; Ctrl+C returns 130 and SIGTERM 143, each with one line.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = args.command_parser.prog
    previous = _stop_on_signals()
    try:
        return args.handler(args)
    except CliError as err:
        args.command_parser.error(str(err))
    except FloatingPointError as err:
        print(f"{prog}: training failed: {err}", file=sys.stderr)
        print(
            f"{prog}: on the command line: --max-epochs N, --train-option lr=VALUE",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt as err:
        name, code = ("SIGTERM", 143) if isinstance(err, Terminated) else ("Ctrl+C", 130)
        print(f"{prog}: stopped by {name}; the run did not finish.", file=sys.stderr)
        return code
    finally:
        # The run has stopped (Lightning may have stopped it on the first signal).
        _cancel_resends()
        for signum, handler in (previous or {}).items():
            signal.signal(signum, handler)
    return 2  # not reached: error() exits
