"""RANKFORMER's training plans: a warm-up + cosine learning rate, and the validation."""

from __future__ import annotations

import torch
from scvi.module.base import LossOutput
from torch import Tensor

from ._base import CellTyperTrainingPlan, OptimizerName, warmup_cosine_factor


class RankformerTrainingPlan(CellTyperTrainingPlan):
    """Trains :class:`~celltyper.module.RANKFORMERModule` on its loss, step by step.

    The objective (cell-type cross-entropy plus ``mlm_weight`` x masked-gene prediction)
    lives in the module's ``loss``, whose keywords (``mask_prob``, ``label_smoothing``,
    ``class_weights``, ...) this plan accepts and passes on. What stays here is the
    learning rate: it warms up linearly over ``warmup_fraction`` of the optimisation
    steps, then follows a cosine decay, updated every step. Validation is the shared one:
    the cell-type cross-entropy of the held-out labelled cells.

    Parameters
    ----------
    module
        A :class:`~celltyper.module.RANKFORMERModule`.
    warmup_fraction
        Share of the optimisation steps spent warming the learning rate up.
    optimizer, lr, weight_decay
        Optimizer settings.
    **loss_kwargs
        Keywords of :meth:`~celltyper.module.RANKFORMERModule.loss`.
    """

    def __init__(
        self,
        module,
        *,
        warmup_fraction: float = 0.1,
        optimizer: OptimizerName = "AdamW",
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        **loss_kwargs,
    ):
        super().__init__(
            module, optimizer=optimizer, lr=lr, weight_decay=weight_decay, **loss_kwargs
        )
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}.")
        self.warmup_fraction = warmup_fraction

    def configure_optimizers(self):
        config = super().configure_optimizers()
        total = 1
        if self._trainer is not None:
            total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, round(self.warmup_fraction * total)) if self.warmup_fraction > 0 else 0
        schedule = torch.optim.lr_scheduler.LambdaLR(
            config["optimizer"], lambda step: warmup_cosine_factor(step, total, warmup)
        )
        return {
            "optimizer": config["optimizer"],
            "lr_scheduler": {"scheduler": schedule, "interval": "step"},
        }


class RankformerPretrainingPlan(RankformerTrainingPlan):
    """Masked-gene pretraining of :class:`~celltyper.module.RANKFORMERModule`.

    The module's loss with the masked-gene term alone (``classification_weight=0``,
    ``mlm_weight=1``, whatever the user gives for the training stage), so the encoder
    learns from every cell and the cell-type head does not move. Validation is the
    masked-gene loss of the held-out cells (masked at random like the training cells).

    Parameters
    ----------
    module
        A :class:`~celltyper.module.RANKFORMERModule`.
    **kwargs
        Keywords of :class:`RankformerTrainingPlan` and of the module's loss.
    """

    def __init__(self, module, **kwargs):
        super().__init__(module, **{**kwargs, "classification_weight": 0.0, "mlm_weight": 1.0})

    def validation_loss_output(self, batch: dict[str, Tensor]) -> LossOutput:
        _, _, loss_output = self.module(batch, loss_kwargs=self.loss_kwargs)
        return loss_output
