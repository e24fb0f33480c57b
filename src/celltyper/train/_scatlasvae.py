"""scAtlasVAE's training plan: the late window of the cell-type heads."""

from __future__ import annotations

import warnings

from ._base import CellTyperTrainingPlan

#: Fewer head optimisation steps than this in a late window trigger a warning: on Kang's
#: 759-cell reference, 60 steps gave a balanced accuracy of 0.40 and 600 steps 0.72.
MIN_HEAD_STEPS = 500
#: Batch alignment by default. Balanced accuracy, weight 0 -> 10 -> 30 (seed 0, harness
#: recipe): Baron human -> mouse 0.677 / 0.766 / 0.801, mouse -> human 0.655 / - / 0.729,
#: Wang -> Xin 0.681 / - / 0.737, Kang 0.744 / 0.778 / 0.767, CellBench 0.964 / 0.979 /
#: 0.982, whole-object Kang 0.773 / - / 0.776; 100 gave 0.782 on Baron human -> mouse.
DEFAULT_MMD_WEIGHT = 30.0


class SCATLASVAETrainingPlan(CellTyperTrainingPlan):
    """Trains :class:`~celltyper.module.SCATLASVAEModule` on its ELBO, heads and MMD.

    The objective lives in the module's ``loss`` (whose ``mmd_weight`` this plan accepts
    and passes on); the KL warm-up is scvi-tools' (``n_epochs_kl_warmup``,
    ``max_kl_weight``, passed to the loss as ``kl_weight``). What stays here:

    - the window of the cell-type heads: by default they train throughout; with
      ``n_epochs_prediction`` their loss joins for the last epochs of the fit only (as
      published, where 10 epochs left Kang's heads underfit), computed from the
      trainer's ``max_epochs`` when training starts, and logged as
      ``prediction_weight``. With early stopping the last epochs are unknown, so the
      heads train throughout (with a warning); a late window of fewer than
      :data:`MIN_HEAD_STEPS` optimisation steps warns that the heads will underfit;
    - no weight decay on the covariate tables, so rows frozen by query surgery (zero
      gradient) stay exactly unchanged.

    Validation logs ``validation_loss``, the module's loss with the full KL weight and
    the heads (no MMD), scvi-tools' ELBO metrics and the primary head's accuracy.

    Parameters
    ----------
    module
        An :class:`~celltyper.module.SCATLASVAEModule`.
    n_epochs_prediction
        Last epochs whose loss includes the cell-type heads; ``None`` (default) trains the
        heads throughout.
    **kwargs
        Keywords of :class:`~celltyper.train.CellTyperTrainingPlan` (optimizer: Adam, lr
        1e-3, no weight decay), of scvi-tools' ``TrainingPlan`` (``n_epochs_kl_warmup``:
        400, ``max_kl_weight``: 1) and of :meth:`~celltyper.module.SCATLASVAEModule.loss`
        (``mmd_weight``).
    mmd_weight
        Weight of the MMD between each batch's latent cells and the others' (the
        module's ``mmd_key``); 0 turns it off. The default,
        :data:`DEFAULT_MMD_WEIGHT`, was chosen by measurement (see its comment).
    """

    log_elbo = True
    scheduled_loss_arguments = ("prediction_weight",)

    def __init__(
        self,
        module,
        *,
        n_epochs_prediction: int | None = None,
        mmd_weight: float = DEFAULT_MMD_WEIGHT,
        **kwargs,
    ):
        if mmd_weight < 0:
            raise ValueError(f"mmd_weight must be >= 0, got {mmd_weight}.")
        if n_epochs_prediction is not None and n_epochs_prediction < 1:
            raise ValueError(
                f"n_epochs_prediction must be >= 1 or None, got {n_epochs_prediction}."
            )
        super().__init__(module, mmd_weight=mmd_weight, **kwargs)
        self.n_epochs_prediction = n_epochs_prediction
        self.prediction_start_epoch = 0

    def on_train_start(self) -> None:
        """Turn ``n_epochs_prediction`` into the first epoch of the heads' window."""
        super().on_train_start()
        n_epochs = self.n_epochs_prediction
        max_epochs = int(self.trainer.max_epochs)
        if n_epochs is not None and n_epochs < max_epochs:
            if self.trainer.early_stopping_callback is not None:
                warnings.warn(
                    "With early_stopping the last epochs are unknown: the cell-type heads "
                    "train throughout (n_epochs_prediction=None).",
                    UserWarning,
                    stacklevel=2,
                )
                n_epochs = None
        self.prediction_start_epoch = 0 if n_epochs is None else max(0, max_epochs - n_epochs)
        self._warn_short_head_window(max_epochs)
        n_batches = int(self.trainer.num_training_batches)
        if self.n_epochs_kl_warmup and self.n_steps_kl_warmup is None and n_batches > 0:
            # scvi's epoch warm-up raises the KL weight once per epoch; the same ramp by
            # steps rises within each epoch too, as scAtlasVAE's does.
            self.n_steps_kl_warmup = round(self.n_epochs_kl_warmup * n_batches)
            self.n_epochs_kl_warmup = None

    def _warn_short_head_window(self, max_epochs: int) -> None:
        """Warn when a late head window leaves the linear heads too few optimiser steps."""
        heads_learn = any(p.requires_grad for p in self.module.heads.parameters())
        if self.prediction_start_epoch == 0 or not heads_learn:
            return
        epochs = max_epochs - self.prediction_start_epoch
        steps = epochs * int(self.trainer.num_training_batches)
        if steps < MIN_HEAD_STEPS:
            warnings.warn(
                f"The cell-type heads train only during the last {epochs} epochs, {steps} "
                "optimisation steps. Let them train throughout with "
                "train(n_epochs_prediction=None) (command line: --train-option "
                "n_epochs_prediction=None), or give a larger n_epochs_prediction "
                "(--train-option n_epochs_prediction=N).",
                UserWarning,
                stacklevel=2,
            )

    def prediction_weight(self, epoch: int) -> float:
        """1 from the first epoch of the heads' window on, else 0."""
        return 1.0 if epoch >= self.prediction_start_epoch else 0.0

    def scheduled_loss_kwargs(self, batch_idx: int) -> dict[str, float]:
        return {"prediction_weight": self.prediction_weight(self.current_epoch)}

    def configure_optimizers(self):
        config = super().configure_optimizers()
        if self.weight_decay > 0:
            tables = {id(t.weight) for t in self.module.covariate_tables()}
            group = config["optimizer"].param_groups[0]
            kept = [p for p in group["params"] if id(p) in tables]
            group["params"] = [p for p in group["params"] if id(p) not in tables]
            if kept:
                config["optimizer"].add_param_group({"params": kept, "weight_decay": 0.0})
        return config
