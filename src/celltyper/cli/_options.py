"""Checking ``--train-option`` and ``--model-option`` against the chosen model.

The names are checked against the model class (its ``train()`` keywords and its
constructor's signature) before any data are joined or any model is built, so that a typo
costs seconds, not a training run.
"""

from __future__ import annotations

import difflib
import inspect

from ._common import CliError

#: train() keywords the command sets from options of their own.
TRAIN_FLAGS = {
    "max_epochs": "--max-epochs",
    "batch_size": "--batch-size",
    "early_stopping": "--early-stopping/--no-early-stopping",
    "seed": "--seed",
    "accelerator": "--accelerator",
}
#: Constructor keywords the command sets itself.
MODEL_FLAGS = {"seed": "--seed"}
#: Trainer keywords named in the error message (Lightning's Trainer has ~50).
_TRAINER_EXAMPLES = ("gradient_clip_val", "precision", "enable_progress_bar")


def _as_dict(pairs: list[tuple[str, object]], flag: str) -> dict[str, object]:
    """``[(key, value), ...]`` as a dict; a key given twice is an error."""
    options: dict[str, object] = {}
    for key, value in pairs:
        if key in options:
            raise CliError(f"{flag} {key} is given twice ({options[key]!r} and {value!r})")
        options[key] = value
    return options


def _refuse_flagged(options: dict[str, object], flags: dict[str, str], flag: str) -> None:
    for key in options:
        if key in flags:
            raise CliError(f"{flag} {key}={options[key]!r}: use {flags[key]} instead")


def check_train_options(cls: type, pairs: list[tuple[str, object]]) -> dict[str, object]:
    """The ``--train-option`` pairs as ``train()`` keywords of ``cls``.

    Parameters
    ----------
    cls
        The model class.
    pairs
        ``(key, value)`` pairs in the order given.

    Returns
    -------
    The keywords, to pass to ``cls.train``.

    Raises
    ------
    CliError
        For a key given twice, a key the command sets through its own option
        (``max_epochs``: ``--max-epochs``, ...) or a key ``train()`` does not accept; the
        message lists the accepted keys.
    """
    options = _as_dict(pairs, "--train-option")
    _refuse_flagged(options, TRAIN_FLAGS, "--train-option")
    keywords = cls.train_keywords()
    accepted = set().union(*keywords.values())
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise CliError(
            f"--train-option {', '.join(unknown)}: not a keyword of {cls.__name__}.train()"
            f"{_did_you_mean(unknown, accepted)}. {_describe_train_keywords(keywords)}"
        )
    return options


def _did_you_mean(unknown: list[str], accepted) -> str:
    """``" (did you mean lr?)"`` for a near miss of an accepted name, else ``""``."""
    guesses = [
        match
        for name in unknown
        for match in difflib.get_close_matches(name, sorted(accepted), n=1, cutoff=0.75)
    ]
    return f" (did you mean {', '.join(guesses)}?)" if guesses else ""


def _describe_train_keywords(keywords: dict[str, list[str]]) -> str:
    own = [k for k in keywords["train"] if k not in TRAIN_FLAGS]
    parts = [
        f"training options: {', '.join(keywords['options']) or 'none'}",
        f"hyperparameters: {', '.join(keywords['hyperparameters'])}",
        f"data splitter: {', '.join(keywords['splitter'])}",
        f"train(): {', '.join(own)}",
        f"or a keyword of Lightning's Trainer (e.g. {', '.join(_TRAINER_EXAMPLES)})",
    ]
    return "Valid keys: " + "; ".join(parts)


def constructor_keywords(cls: type) -> list[str]:
    """Keyword parameters of ``cls``'s constructor, without the data and the seed."""
    parameters = inspect.signature(cls.__init__).parameters.values()
    skipped = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    names = [p.name for p in parameters if p.kind not in skipped]
    return [name for name in names if name not in ("self", "adata", "mdata", *MODEL_FLAGS)]


def check_model_options(cls: type, pairs: list[tuple[str, object]]) -> dict[str, object]:
    """The ``--model-option`` pairs as constructor keywords of ``cls``.

    Raises
    ------
    CliError
        For a key given twice, ``seed`` (``--seed`` sets it) or a key the constructor does
        not take; the message lists the ones it takes.
    """
    options = _as_dict(pairs, "--model-option")
    _refuse_flagged(options, MODEL_FLAGS, "--model-option")
    accepted = constructor_keywords(cls)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise CliError(
            f"--model-option {', '.join(unknown)}: not a parameter of {cls.__name__}()"
            f"{_did_you_mean(unknown, accepted)}. Valid keys: {', '.join(accepted)}"
        )
    return options
