"""Lightning callbacks."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl


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
