"""CELLULAR's training plans: a contrastive encoder, then a classifier head.

The objective lives in :meth:`~celltyper.module.CELLULARModule.loss`; a plan chooses which
parameters train, which terms of that loss it scores, the learning-rate schedule and what
its validation reports.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from scvi import REGISTRY_KEYS
from torch import Tensor

from ._base import CellTyperTrainingPlan, OptimizerName, warmup_cosine_factor


class _CELLULARPlan(CellTyperTrainingPlan):
    """CELLULAR's optimizer defaults, and the loss weights a stage holds fixed.

    ``pinned_loss_kwargs`` are passed to the loss at every step, so a weight given to
    ``train()`` for another stage (``classification_weight`` for the joint stage) never
    switches on a term this stage does not train; they are declared as scheduled loss
    arguments, which users cannot set for this plan.
    """

    pinned_loss_kwargs: ClassVar[dict[str, float]] = {}

    def __init__(
        self,
        module,
        *,
        optimizer: OptimizerName = "Adam",
        lr: float = 1e-3,
        weight_decay: float = 5e-5,
        **loss_kwargs,
    ):
        super().__init__(
            module, optimizer=optimizer, lr=lr, weight_decay=weight_decay, **loss_kwargs
        )

    def scheduled_loss_kwargs(self, batch_idx: int) -> dict[str, float]:
        return dict(self.pinned_loss_kwargs)


class ContrastiveTrainingPlan(_CELLULARPlan):
    """Stage 1 of CELLULAR: train the encoder (and the temperature) contrastively.

    The loss is the contrastive part of :meth:`~celltyper.module.CELLULARModule.loss`
    (its ``classification_weight`` is held at 0, so the classifier does not run), whose
    keywords (``target_weight``, ``batch_weight``, ``centroid_weight``,
    ``batch_temperature``) this plan accepts and passes on. Its weighted terms are logged
    as ``target_loss_train``, ``batch_loss_train``, ``centroid_loss_train``, with the
    temperature (``temperature_train``). The learning rate warms up linearly, then decays
    along a cosine (:func:`warmup_cosine_factor`, stepped each epoch), and the temperature
    parameter is put back into [0.1, 1] after every step. Validation logs the same total
    on the held-out labelled cells as ``validation_loss``.

    Parameters
    ----------
    module
        A :class:`~celltyper.module.CELLULARModule`.
    warmup_epochs
        Epochs of linear learning-rate warm-up before the cosine decay (at most half of
        the run's epochs).
    **kwargs
        ``optimizer``, ``lr``, ``weight_decay`` (CELLULAR: Adam, 1e-3, 5e-5) and the
        keywords of :meth:`~celltyper.module.CELLULARModule.loss`.
    """

    pinned_loss_kwargs: ClassVar[dict[str, float]] = {"classification_weight": 0.0}
    scheduled_loss_arguments = ("classification_weight",)

    def __init__(self, module, *, warmup_epochs: int = 4, **kwargs):
        super().__init__(module, **kwargs)
        self.warmup_epochs = warmup_epochs

    def trainable_parameters(self):
        return [*self.module.encoder.parameters(), self.module.raw_temperature]

    def configure_optimizers(self):
        config = super().configure_optimizers()
        max_epochs = self.trainer.max_epochs if self._trainer is not None else 1
        # A short run must not spend most of its epochs warming up.
        warmup = min(self.warmup_epochs, max_epochs // 2)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            config["optimizer"], lambda e: warmup_cosine_factor(e, max_epochs, warmup)
        )
        return {"optimizer": config["optimizer"], "lr_scheduler": {"scheduler": schedule}}

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # The temperature is used clamped; keeping the parameter in range too means it
        # never sits where the clamp cuts its gradient off.
        self.module.clamp_temperature_()

    def validation_loss_output(self, batch: dict[str, Tensor]):
        labels = batch[REGISTRY_KEYS.LABELS_KEY].view(-1)
        if int((labels < self.module.n_labels).sum()) < 2:
            return None  # nothing to contrast: leave the minibatch out of the mean
        loss_kwargs = {**self.loss_kwargs, **self.scheduled_loss_kwargs(0)}
        _, _, loss_output = self.module(batch, loss_kwargs=loss_kwargs)
        return loss_output


class ClassifierHeadTrainingPlan(_CELLULARPlan):
    """Stage 2 of CELLULAR: train the classifier on the frozen encoder's embedding.

    The loss is the classification part of :meth:`~celltyper.module.CELLULARModule.loss`
    (its ``contrastive_weight`` is held at 0): class-weighted cross-entropy on the
    labelled cells of each minibatch (``classification_loss_train``). Unlabelled cells (a
    query fine-tuned without labels) add no loss but pass through the classifier, so its
    BatchNorm statistics adapt to them. The encoder gets no gradient and runs in eval mode
    (no dropout), giving the same embedding as at prediction time. Validation is the
    unweighted cross-entropy of the held-out labelled cells (``validation_loss``).

    Parameters
    ----------
    module
        A :class:`~celltyper.module.CELLULARModule`.
    optimizer, lr, weight_decay
        Optimizer settings (CELLULAR: Adam, 1e-3, 5e-5).
    **loss_kwargs
        Keywords of :meth:`~celltyper.module.CELLULARModule.loss` (``class_weights``).
    """

    pinned_loss_kwargs: ClassVar[dict[str, float]] = {"contrastive_weight": 0.0}
    scheduled_loss_arguments = ("contrastive_weight",)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.module.encoder.eval()

    def trainable_parameters(self):
        return self.module.classifier.parameters()

    def forward(self, *args, **kwargs):
        # The frozen encoder's embedding needs no graph.
        kwargs.setdefault("inference_kwargs", {"encoder_grad": False})
        return super().forward(*args, **kwargs)


class JointClassifierTrainingPlan(ContrastiveTrainingPlan):
    """Stage 2 of CELLULAR, joint variant: encoder and classifier learn together.

    The loss is the whole of :meth:`~celltyper.module.CELLULARModule.loss`: the stage-1
    contrastive total plus ``classification_weight`` x the class-weighted cross-entropy
    of the classifier on the same embedding (one encoder pass serves both), so the
    embedding keeps its contrastive structure while it is shaped for the classifier. The
    schedule and the temperature clamp are those of :class:`ContrastiveTrainingPlan`.
    Validation is the unweighted cross-entropy (``validation_loss``), as in
    :class:`ClassifierHeadTrainingPlan`, so early stopping and the calibration read the
    same quantity in both variants.

    Parameters
    ----------
    module
        A :class:`~celltyper.module.CELLULARModule`.
    **kwargs
        Those of :class:`ContrastiveTrainingPlan` and of the module's ``loss``
        (``classification_weight``, ``class_weights``, ...).
    """

    pinned_loss_kwargs: ClassVar[dict[str, float]] = {}
    scheduled_loss_arguments = ()

    def trainable_parameters(self):
        return [*super().trainable_parameters(), *self.module.classifier.parameters()]

    def validation_loss_output(self, batch: dict[str, Tensor]):
        # The held-out cross-entropy, as in the frozen variant.
        return self.module.validation_loss(batch)
