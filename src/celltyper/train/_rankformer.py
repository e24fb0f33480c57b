"""RANKFORMER's training: cell-type cross-entropy and masked-gene prediction."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from torch import Tensor

from celltyper.module import RANKFORMERModule

from ._base import ClassifierTrainingPlan, OptimizerName, merge_minibatches
from ._contrastive import warmup_cosine_factor


class RankformerTrainingPlan(ClassifierTrainingPlan):
    """Cross-entropy on labelled cells plus masked-gene prediction on every cell.

    Each step tokenises the minibatch, masks a random ``mask_prob`` of each cell's gene
    tokens (when ``mlm_weight > 0``), runs the transformer once and adds

    - ``classification_weight`` x cross-entropy of the CLS head on the labelled cells
      (the masking then doubles as an augmentation of the classifier's input), and
    - ``mlm_weight`` x cross-entropy of the identity of the masked genes, on every cell
      (labelled or not: unlabelled query cells teach the encoder their genes' context).

    ``classification_weight=0`` is masked-gene pretraining; its validation loss is then
    the masked-gene loss of the validation cells, else the shared cell-type
    cross-entropy. Every cell passes through the head, so its BatchNorm statistics see
    query cells too. The learning rate warms up linearly over ``warmup_fraction`` of the
    steps and then follows a cosine decay.

    Parameters
    ----------
    module
        A :class:`~celltyper.module.RANKFORMERModule`.
    classification_weight
        Weight of the cell-type cross-entropy.
    mlm_weight
        Weight of the masked-gene loss (0: no masking).
    mask_prob
        Share of gene tokens masked.
    class_weights
        Cross-entropy weight per cell-type code (``None``: all 1).
    label_smoothing
        Label smoothing of the cell-type cross-entropy.
    warmup_fraction
        Share of the optimisation steps spent warming the learning rate up.
    optimizer, lr, weight_decay
        Optimizer settings.
    """

    def __init__(
        self,
        module: RANKFORMERModule,
        *,
        classification_weight: float = 1.0,
        mlm_weight: float = 0.5,
        mask_prob: float = 0.15,
        class_weights: Tensor | None = None,
        label_smoothing: float = 0.0,
        warmup_fraction: float = 0.1,
        optimizer: OptimizerName = "AdamW",
        lr: float = 1e-3,
        weight_decay: float = 0.01,
    ):
        super().__init__(module, optimizer=optimizer, lr=lr, weight_decay=weight_decay)
        if not 0.0 <= mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in [0, 1), got {mask_prob}.")
        if classification_weight <= 0 and mlm_weight <= 0:
            raise ValueError("classification_weight or mlm_weight must be > 0.")
        self.classification_weight = classification_weight
        self.mlm_weight = mlm_weight
        self.mask_prob = mask_prob
        self.class_weights = class_weights
        self.label_smoothing = label_smoothing
        self.warmup_fraction = warmup_fraction

    @property
    def pretraining(self) -> bool:
        """Whether the plan trains the masked-gene objective alone."""
        return self.classification_weight <= 0

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        total = 1
        if self.trainer is not None:
            total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, round(self.warmup_fraction * total)) if self.warmup_fraction > 0 else 0
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine_factor(step, total, warmup)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": schedule, "interval": "step"},
        }

    def _losses(self, batch: dict[str, Tensor], mask: bool) -> dict[str, Tensor]:
        module: RANKFORMERModule = self.module
        labels = batch[REGISTRY_KEYS.LABELS_KEY].view(-1).long()
        labelled = labels < module.n_labels
        tokens = module.tokenize(batch)
        inputs, masked = tokens, torch.zeros_like(tokens.padding_mask)
        if mask and self.mlm_weight > 0 and self.mask_prob > 0:
            inputs, masked = module.mask_tokens(tokens, self.mask_prob)
        hidden = module.encode(inputs)
        mlm, mlm_accuracy = module.masked_gene_loss(hidden, tokens.tokens, masked)
        classification = hidden.sum() * 0.0
        if not self.pretraining:
            logits = module.classifier(hidden[:, 0])
            if labelled.any():
                weights = self.class_weights
                classification = F.cross_entropy(
                    logits[labelled],
                    labels[labelled],
                    weight=None if weights is None else weights.to(logits.device),
                    label_smoothing=self.label_smoothing,
                )
        loss = self.classification_weight * classification + self.mlm_weight * mlm
        return {
            "loss": loss,
            "classification": classification.detach(),
            "mlm": mlm.detach(),
            "mlm_accuracy": mlm_accuracy,
        }

    def training_step(self, batch, batch_idx: int):
        batch = merge_minibatches(batch)
        losses = self._losses(batch, mask=True)
        n = len(batch[REGISTRY_KEYS.X_KEY])
        log = {"on_epoch": True, "on_step": False, "batch_size": n}
        self.log("train_loss", losses["loss"], prog_bar=True, **log)
        self.log("train_classification_loss", losses["classification"], **log)
        self.log("train_masked_gene_loss", losses["mlm"], **log)
        self.log("train_masked_gene_accuracy", losses["mlm_accuracy"], **log)
        return losses["loss"]

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int):
        if not self.pretraining:
            return super().validation_step(batch, batch_idx)
        losses = self._losses(batch, mask=True)
        n = len(batch[REGISTRY_KEYS.X_KEY])
        self.log("validation_loss", losses["mlm"], on_epoch=True, batch_size=n, prog_bar=True)
        self.log("validation_masked_gene_accuracy", losses["mlm_accuracy"], batch_size=n)
        return losses["mlm"]
