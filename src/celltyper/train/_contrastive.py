"""CELLULAR's two training stages: a contrastive encoder, then a classifier head."""

from __future__ import annotations

import math

import torch
from scvi import REGISTRY_KEYS
from torch import Tensor

from celltyper.module import CELLULARModule
from celltyper.nn import (
    batch_mixing_loss,
    centroid_distance_loss,
    labelled_cross_entropy,
    supervised_soft_nn_loss,
)

from ._base import ClassifierTrainingPlan, OptimizerName, merge_minibatches


def warmup_cosine_factor(epoch: int, max_epochs: int, warmup_epochs: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup_epochs``, then a cosine decay.

    The factor is ``(epoch + 1) / warmup_epochs`` during the warm-up and
    ``0.5 (1 + cos(pi t))`` after it, ``t`` running from 0 at the end of the warm-up to 1
    one epoch after the last, so the last epoch still learns.
    """
    if epoch < warmup_epochs:
        return (epoch + 1) / warmup_epochs
    n_decay = max(1, max_epochs - warmup_epochs)
    t = min((epoch - warmup_epochs) / n_decay, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * t))


def _labelled(batch: dict[str, Tensor], n_labels: int) -> tuple[Tensor, Tensor]:
    labels = batch[REGISTRY_KEYS.LABELS_KEY].view(-1).long()
    return labels < n_labels, labels


def _head_loss(
    module: CELLULARModule, batch: dict[str, Tensor], z: Tensor, class_weights: Tensor | None
) -> Tensor:
    """Cross-entropy of the classifier on the embedding ``z`` of the labelled cells of
    ``batch``, weighted per class by ``class_weights`` (unweighted when ``None``)."""
    labelled, labels = _labelled(batch, module.n_labels)
    weights = None if class_weights is None else class_weights.to(z.device)
    return labelled_cross_entropy(module.classifier(z), labels, labelled, weight=weights)


class ContrastiveTrainingPlan(ClassifierTrainingPlan):
    """Stage 1 of CELLULAR: train the encoder (and the temperature) contrastively.

    On the labelled cells of each minibatch the loss is
    ``w_target * L_target + w_batch * L_batch + w_centroid * L_centroid`` (see
    :func:`~celltyper.nn.supervised_soft_nn_loss`, :func:`~celltyper.nn.batch_mixing_loss`
    and :func:`~celltyper.nn.centroid_distance_loss`); without batches the batch term is
    left out and ``L_target`` gets weight 1. Each term is logged (``train_target_loss``,
    ``train_batch_loss``, ``train_centroid_loss``, ``train_loss``), and validation logs
    the same total on held-out labelled cells as ``validation_loss``.

    Parameters
    ----------
    module
        A :class:`~celltyper.module.CELLULARModule`.
    use_batches
        Whether to add the batch-mixing term (needs more than one batch).
    target_weight, batch_weight, centroid_weight
        Weights of the three terms (with batches).
    batch_temperature
        Temperature of the batch-mixing term (fixed).
    warmup_epochs
        Epochs of linear learning-rate warm-up before the cosine decay (at most half of
        the run's epochs).
    optimizer, lr, weight_decay
        Optimizer settings (CELLULAR: Adam, 1e-3, 5e-5).
    """

    def __init__(
        self,
        module: CELLULARModule,
        *,
        use_batches: bool = True,
        target_weight: float = 0.9,
        batch_weight: float = 0.1,
        centroid_weight: float = 1.0,
        batch_temperature: float = 0.5,
        warmup_epochs: int = 4,
        optimizer: OptimizerName = "Adam",
        lr: float = 1e-3,
        weight_decay: float = 5e-5,
    ):
        super().__init__(module, optimizer=optimizer, lr=lr, weight_decay=weight_decay)
        self.use_batches = use_batches
        self.target_weight = target_weight if use_batches else 1.0
        self.batch_weight = batch_weight if use_batches else 0.0
        self.centroid_weight = centroid_weight
        self.batch_temperature = batch_temperature
        self.warmup_epochs = warmup_epochs

    def trainable_parameters(self):
        module: CELLULARModule = self.module
        return [*module.encoder.parameters(), module.raw_temperature]

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        max_epochs = self.trainer.max_epochs if self.trainer is not None else 1
        # A short run must not spend most of its epochs warming up.
        warmup = min(self.warmup_epochs, max_epochs // 2)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda e: warmup_cosine_factor(e, max_epochs, warmup)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule}}

    def contrastive_losses(
        self, batch: dict[str, Tensor], z: Tensor | None = None
    ) -> dict[str, Tensor] | None:
        """The three terms and their weighted total on the labelled cells of ``batch``;
        ``z``, the embedding of every cell of the batch, when the caller has it already."""
        module: CELLULARModule = self.module
        labelled, labels = _labelled(batch, module.n_labels)
        if int(labelled.sum()) < 2:
            return None
        z = (module.embed(batch) if z is None else z)[labelled]
        labels = labels[labelled]
        target = supervised_soft_nn_loss(z, labels, module.temperature)
        centroid = centroid_distance_loss(z, labels, module.pca_centroid_distances)
        mixing = z.sum() * 0.0
        if self.use_batches:
            batches = batch[REGISTRY_KEYS.BATCH_KEY].view(-1).long()[labelled]
            mixing = batch_mixing_loss(z, labels, batches, self.batch_temperature)
        total = (
            self.target_weight * target
            + self.batch_weight * mixing
            + self.centroid_weight * centroid
        )
        return {"loss": total, "target": target, "batch": mixing, "centroid": centroid}

    def training_step(self, batch, batch_idx: int):
        batch = merge_minibatches(batch)
        losses = self.contrastive_losses(batch)
        if losses is None:
            # A minibatch without two labelled cells teaches the encoder nothing.
            return None
        n = len(batch[REGISTRY_KEYS.X_KEY])
        log = {"on_epoch": True, "on_step": False, "batch_size": n}
        self.log("train_loss", losses["loss"], prog_bar=True, **log)
        for term in ("target", "batch", "centroid"):
            self.log(f"train_{term}_loss", losses[term], **log)
        self.log("temperature", self.module.temperature.detach(), **log)
        return losses["loss"]

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # The temperature is used clamped; keeping the parameter in range too means it
        # never sits where the clamp cuts its gradient off.
        self.module.clamp_temperature_()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int):
        losses = self.contrastive_losses(batch)
        if losses is None:
            return None
        n = len(batch[REGISTRY_KEYS.X_KEY])
        self.log("validation_loss", losses["loss"], on_epoch=True, batch_size=n, prog_bar=True)
        self.log("validation_target_loss", losses["target"], on_epoch=True, batch_size=n)
        return losses["loss"]


class ClassifierHeadTrainingPlan(ClassifierTrainingPlan):
    """Stage 2 of CELLULAR: train the classifier on the frozen encoder's embedding.

    The loss is class-weighted cross-entropy on the labelled cells of each minibatch.
    Unlabelled cells (a query fine-tuned without labels) add no loss but pass through the
    classifier, so its BatchNorm statistics adapt to them. The encoder gets no gradient
    and runs in eval mode (no dropout), giving the same embedding as at prediction time.
    Validation is the shared unweighted cross-entropy (``validation_loss``).

    Parameters
    ----------
    module
        A :class:`~celltyper.module.CELLULARModule`.
    class_weights
        Weight per cell-type code (``None``: all 1).
    optimizer, lr, weight_decay
        Optimizer settings.
    """

    def __init__(
        self,
        module: CELLULARModule,
        *,
        class_weights: Tensor | None = None,
        optimizer: OptimizerName = "Adam",
        lr: float = 1e-3,
        weight_decay: float = 5e-5,
    ):
        super().__init__(module, optimizer=optimizer, lr=lr, weight_decay=weight_decay)
        self.class_weights = class_weights

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.module.encoder.eval()

    def trainable_parameters(self):
        return self.module.classifier.parameters()

    def training_step(self, batch, batch_idx: int):
        batch = merge_minibatches(batch)
        module: CELLULARModule = self.module
        with torch.no_grad():
            z = module.embed(batch)
        loss = _head_loss(module, batch, z, self.class_weights)
        n = len(z)
        self.log("train_loss", loss, on_epoch=True, on_step=False, batch_size=n, prog_bar=True)
        self.log("train_classification_loss", loss, on_epoch=True, on_step=False, batch_size=n)
        return loss


class JointClassifierTrainingPlan(ContrastiveTrainingPlan):
    """Stage 2 of CELLULAR, joint variant: encoder and classifier learn together.

    The loss on the labelled cells of each minibatch is the stage-1 contrastive total
    (see :class:`ContrastiveTrainingPlan`) plus ``classification_weight`` x the
    class-weighted cross-entropy of the classifier on the same embedding, so the
    embedding keeps its contrastive structure while it is shaped for the classifier.
    Validation is the unweighted cross-entropy (``validation_loss``), as in
    :class:`ClassifierHeadTrainingPlan`, so early stopping and the calibration read the
    same quantity in both variants.

    Parameters
    ----------
    module
        A :class:`~celltyper.module.CELLULARModule`.
    class_weights
        Weight per cell-type code (``None``: all 1).
    classification_weight
        Weight of the cross-entropy against the contrastive total.
    **kwargs
        Those of :class:`ContrastiveTrainingPlan`.
    """

    def __init__(
        self,
        module: CELLULARModule,
        *,
        class_weights: Tensor | None = None,
        classification_weight: float = 1.0,
        **kwargs,
    ):
        super().__init__(module, **kwargs)
        self.class_weights = class_weights
        self.classification_weight = classification_weight

    def trainable_parameters(self):
        return [*super().trainable_parameters(), *self.module.classifier.parameters()]

    def training_step(self, batch, batch_idx: int):
        batch = merge_minibatches(batch)
        # One forward pass (one dropout mask) serves both losses.
        z = self.module.embed(batch)
        losses = self.contrastive_losses(batch, z)
        classification = _head_loss(self.module, batch, z, self.class_weights)
        contrastive = classification * 0.0 if losses is None else losses["loss"]
        loss = contrastive + self.classification_weight * classification
        n = len(batch[REGISTRY_KEYS.X_KEY])
        log = {"on_epoch": True, "on_step": False, "batch_size": n}
        self.log("train_loss", loss, prog_bar=True, **log)
        self.log("train_contrastive_loss", contrastive, **log)
        self.log("train_classification_loss", classification, **log)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int):
        loss = _head_loss(self.module, batch, self.module.embed(batch), None)
        n = len(batch[REGISTRY_KEYS.X_KEY])
        self.log("validation_loss", loss, on_epoch=True, batch_size=n, prog_bar=True)
        return loss
