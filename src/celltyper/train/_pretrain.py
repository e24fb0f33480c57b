"""scPretrain's plans: pseudo-label pretraining of the encoder, then fine-tuning."""

from __future__ import annotations

from scvi.module.base import LossOutput
from torch import Tensor

from celltyper.module import PseudoLabelHeads, SCPRETRAINModule

from ._base import CellTyperTrainingPlan

#: Weight of the validation loss in ``score_validation``: small enough never to reorder
#: two different accuracies of fewer than ~10,000 held-out cells.
SCORE_LOSS_WEIGHT = 1e-4


class PseudoLabelTrainingPlan(CellTyperTrainingPlan):
    """Pretraining: the encoder and the phase's heads learn every cell's pseudo-labels.

    The objective is :meth:`~celltyper.module.SCPRETRAINModule.loss` given the heads
    (logged as ``train_loss``, ``pseudo_label_loss_train`` and the heads' accuracy per
    resolution, ``pseudo_label_accuracy_<r>_train``). The classifier head is not part of
    this stage: it is neither optimised nor put in training mode, so its BatchNorm
    statistics stay as they are.

    Parameters
    ----------
    module
        An :class:`~celltyper.module.SCPRETRAINModule`.
    pseudo_label_heads
        The :class:`~celltyper.module.PseudoLabelHeads` of the phase (built by the
        model from the phase's clustering), trained along with the encoder.
    **kwargs
        Keywords of :class:`~celltyper.train.CellTyperTrainingPlan` (optimizer, ``lr``,
        ``weight_decay``, ...) and of the module's loss.
    """

    def __init__(
        self, module: SCPRETRAINModule, *, pseudo_label_heads: PseudoLabelHeads, **kwargs
    ):
        super().__init__(module, pseudo_label_heads=pseudo_label_heads, **kwargs)
        # A submodule of the plan, so Lightning moves the heads to the training device.
        self.heads = pseudo_label_heads

    def trainable_parameters(self):
        return [*self.module.encoder.parameters(), *self.heads.parameters()]

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.module.classifier.eval()


class FineTuningTrainingPlan(CellTyperTrainingPlan):
    """Fine-tuning: the module's classification loss, with the encoder or on a frozen one.

    The objective is :meth:`~celltyper.module.SCPRETRAINModule.loss` (cross-entropy on
    labelled cells, plus ``entropy_weight`` times the entropy on unlabelled ones).
    Validation logs, on the held-out labelled cells, ``validation_loss``,
    ``accuracy_validation`` and ``score_validation`` = accuracy - 1e-4 x loss: the
    accuracy, ties broken by the cross-entropy. With few held-out cells the accuracy
    takes few values and stops improving long before the network has finished
    learning; the score keeps counting an epoch as better when it matches the best
    accuracy with a lower loss.

    Parameters
    ----------
    module
        An :class:`~celltyper.module.SCPRETRAINModule`.
    freeze_encoder
        Train only the classifier head: the encoder keeps its weights, runs in eval mode
        and without gradient.
    **kwargs
        Keywords of :class:`~celltyper.train.CellTyperTrainingPlan` (optimizer, ``lr``,
        ``weight_decay``, ...) and of the module's loss (``entropy_weight``).
    """

    def __init__(self, module: SCPRETRAINModule, *, freeze_encoder: bool = False, **kwargs):
        super().__init__(module, **kwargs)
        self.freeze_encoder = freeze_encoder

    def trainable_parameters(self):
        module: SCPRETRAINModule = self.module
        return module.classifier.parameters() if self.freeze_encoder else module.parameters()

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.freeze_encoder:
            self.module.encoder.eval()

    def forward(self, *args, **kwargs):
        if self.freeze_encoder:
            kwargs["inference_kwargs"] = {"frozen_encoder": True}
        return super().forward(*args, **kwargs)

    def validation_loss_output(self, batch: dict[str, Tensor]) -> LossOutput | None:
        output = super().validation_loss_output(batch)
        if output is not None:
            # Epoch values are means weighted by the cells, so the epoch score is exactly
            # accuracy - weight * loss of the whole validation set.
            score = output.extra_metrics["accuracy"] - SCORE_LOSS_WEIGHT * output.loss
            output.extra_metrics["score"] = score
        return output
