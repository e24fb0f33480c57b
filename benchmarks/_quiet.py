"""Quiet, thread-limited benchmark processes."""

from __future__ import annotations

import logging
import warnings

#: Loggers of the training libraries, silenced below ERROR in benchmark runs.
QUIET_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "scvi")


def quiet_run(threads: int | None = None, also: tuple[str, ...] = ()) -> None:
    """Ignore warnings, silence :data:`QUIET_LOGGERS` and ``also`` below ERROR, and set
    torch's intra-op threads when ``threads`` is given."""
    warnings.filterwarnings("ignore")
    for name in (*QUIET_LOGGERS, *also):
        logging.getLogger(name).setLevel(logging.ERROR)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
