"""Lightning callbacks."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import torch


class RestoreBestWeights(pl.Callback):
    """Keep the module weights of the best validation epoch and restore them at the end.

    Early stopping alone leaves the weights of the last epoch, which by construction are
    ``patience`` epochs past the best one.
    """

    def __init__(self, monitor: str = "validation_loss", mode: str = "min"):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}.")
        self.monitor = monitor
        self.mode = mode
        self.best_score = math.inf if mode == "min" else -math.inf
        self.best_epoch: int | None = None
        self._best_state: dict | None = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        score = float(trainer.callback_metrics[self.monitor])
        better = score < self.best_score if self.mode == "min" else score > self.best_score
        if better:
            self.best_score = score
            self.best_epoch = trainer.current_epoch
            self._best_state = copy.deepcopy(pl_module.module.state_dict())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        if self._best_state is not None:
            pl_module.module.load_state_dict(self._best_state)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception):
        # An interrupted fit (Ctrl+C, SIGTERM) keeps the best weights seen so far.
        self.on_train_end(trainer, pl_module)


class SyncProcesses(pl.Callback):
    """At the end of a fit on several processes, give every process rank 0's state.

    DDP keeps the parameters of the processes equal, but each process updates its own
    BatchNorm statistics and restores its own best weights, and scvi-tools fills the
    training history on rank 0 only. This callback broadcasts rank 0's weights and
    buffers (after :class:`RestoreBestWeights`, which comes before it) and its history,
    so that the steps that follow training (calibration, a next stage) compute the same
    thing on every process. On one process it does nothing.

    Attributes
    ----------
    history
        Rank 0's history after a fit on several processes (``None`` otherwise).
    """

    def __init__(self):
        self.history: dict | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        if trainer.world_size < 2 or not torch.distributed.is_initialized():
            return
        with torch.no_grad():
            for tensor in pl_module.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)
        history = getattr(trainer.logger, "history", None) if trainer.is_global_zero else None
        history = trainer.strategy.broadcast(history if isinstance(history, dict) else None, src=0)
        self.history = None if history is None else dict(history)
