"""scPretrain's training: pseudo-label pretraining of the encoder, then fine-tuning."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse
from scvi import REGISTRY_KEYS
from torch import Tensor
from torch.utils.data import DataLoader

from celltyper.module import PseudoLabelHeads, SCPRETRAINModule
from celltyper.nn import labelled_cross_entropy

from ._base import ClassifierTrainingPlan, ModulePlan, OptimizerName, merge_minibatches

DATASET_KEY = "dataset"
PSEUDO_LABELS_KEY = "pseudo_labels"
#: Weight of the validation loss in ``validation_score``: small enough never to reorder
#: two different accuracies of fewer than ~10,000 held-out cells.
SCORE_LOSS_WEIGHT = 1e-4


class _PseudoLabelledRows(torch.utils.data.Dataset):
    """Cells as minibatch dicts: expression row, dataset code and pseudo-labels."""

    def __init__(self, matrix, datasets: np.ndarray, pseudo_labels: np.ndarray):
        self.matrix = sparse.csr_matrix(matrix) if sparse.issparse(matrix) else matrix
        self.datasets = torch.as_tensor(np.asarray(datasets), dtype=torch.long)
        self.pseudo_labels = torch.as_tensor(np.asarray(pseudo_labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.datasets)

    def __getitem__(self, index: int) -> int:
        return index

    def collate(self, indices: list[int]) -> dict[str, Tensor]:
        # One sparse slice per minibatch instead of one per cell.
        order = np.asarray(indices)
        rows = self.matrix[order]
        rows = rows.toarray() if sparse.issparse(rows) else np.asarray(rows)
        return {
            REGISTRY_KEYS.X_KEY: torch.as_tensor(rows, dtype=torch.float32),
            DATASET_KEY: self.datasets[order],
            PSEUDO_LABELS_KEY: self.pseudo_labels[order],
        }


class PseudoLabelDataModule(pl.LightningDataModule):
    """Shuffled minibatches of every cell with its dataset code and pseudo-labels.

    Parameters
    ----------
    matrix
        The registered expression, cells x genes (dense or sparse; rows are densified one
        minibatch at a time).
    datasets
        Dataset code of each cell.
    pseudo_labels
        ``(n_cells, n_resolutions)`` K-means clusters of each cell.
    batch_size
        Minibatch size.
    """

    def __init__(self, matrix, datasets, pseudo_labels, batch_size: int = 256):
        super().__init__()
        self.rows = _PseudoLabelledRows(matrix, datasets, pseudo_labels)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        n = len(self.rows)
        # A trailing minibatch of one cell says little and is dropped.
        drop_last = n > self.batch_size and n % self.batch_size == 1
        return DataLoader(
            self.rows,
            batch_size=self.batch_size,
            shuffle=True,
            collate_fn=self.rows.collate,
            drop_last=drop_last,
        )


class PseudoLabelTrainingPlan(ModulePlan):
    """Pretraining: the encoder and the heads learn every cell's K-means pseudo-labels.

    The loss is, averaged over the cells of a minibatch, the sum of each cell's
    cross-entropies over the heads of its own dataset (one head per resolution); it is
    logged as ``pretrain_loss``, with the heads' accuracy per resolution
    (``pretrain_accuracy_<r>``).

    Parameters
    ----------
    module
        An :class:`~celltyper.module.SCPRETRAINModule` (only its encoder is trained).
    heads
        The :class:`~celltyper.module.PseudoLabelHeads` of the phase.
    optimizer, lr, weight_decay
        Optimizer settings.
    """

    def __init__(
        self,
        module: SCPRETRAINModule,
        heads: PseudoLabelHeads,
        *,
        optimizer: OptimizerName = "Adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ):
        super().__init__(module, optimizer, lr, weight_decay)
        self.heads = heads

    def trainable_parameters(self):
        return [*self.module.encoder.parameters(), *self.heads.parameters()]

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.heads.train()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int):
        module: SCPRETRAINModule = self.module
        z = module.encoder(module.log_expression(batch))
        datasets, targets = batch[DATASET_KEY], batch[PSEUDO_LABELS_KEY]
        loss = self.heads.loss(z, datasets, targets)
        n = len(z)
        log = {"on_epoch": True, "on_step": False, "batch_size": n}
        self.log("pretrain_loss", loss, prog_bar=True, **log)
        for r, accuracy in enumerate(self.heads.accuracy(z.detach(), datasets, targets)):
            self.log(f"pretrain_accuracy_{r}", float(accuracy), **log)
        return loss


class FineTuningTrainingPlan(ClassifierTrainingPlan):
    """Fine-tuning: cross-entropy of the classifier head on labelled cells.

    The encoder is trained along (``freeze_encoder=False``, scPretrain's fine-tuning)
    or kept fixed. Unlabelled cells add ``entropy_weight`` times the mean entropy of
    their predicted distribution (entropy minimisation as in TENT, Wang et al. 2021);
    with the default weight 0 only labelled cells enter the loss. Validation logs
    ``validation_loss``, ``validation_accuracy`` and ``validation_score`` =
    accuracy - 1e-4 x loss: the accuracy, ties broken by the cross-entropy. With few
    held-out cells the accuracy takes few values and stops improving long before the
    network has finished learning; the score keeps counting an epoch as better when it
    matches the best accuracy with a lower loss.

    Parameters
    ----------
    module
        An :class:`~celltyper.module.SCPRETRAINModule`.
    freeze_encoder
        Keep the encoder's weights (no gradient, eval mode).
    entropy_weight
        Weight of the entropy of the predictions on unlabelled cells.
    optimizer, lr, weight_decay
        Optimizer settings.
    """

    def __init__(
        self,
        module: SCPRETRAINModule,
        *,
        freeze_encoder: bool = False,
        entropy_weight: float = 0.0,
        optimizer: OptimizerName = "Adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ):
        super().__init__(module, optimizer=optimizer, lr=lr, weight_decay=weight_decay)
        self.freeze_encoder = freeze_encoder
        self.entropy_weight = entropy_weight

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.freeze_encoder:
            self.module.encoder.eval()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int):
        labels = batch[REGISTRY_KEYS.LABELS_KEY].view(-1).long()
        labelled = labels < self.module.n_labels
        if not labelled.any():
            return None
        logits = self.module.classify(batch)[labelled]
        labels = labels[labelled]
        n = int(labelled.sum())
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        # Epoch values are means weighted by n, so the epoch score is exactly
        # accuracy - weight * loss of the whole validation set.
        score = accuracy - SCORE_LOSS_WEIGHT * loss
        self.log("validation_loss", loss, on_epoch=True, batch_size=n, prog_bar=True)
        self.log("validation_accuracy", accuracy, on_epoch=True, batch_size=n)
        self.log("validation_score", score, on_epoch=True, batch_size=n)
        return loss

    def trainable_parameters(self):
        module: SCPRETRAINModule = self.module
        return module.classifier.parameters() if self.freeze_encoder else module.parameters()

    def training_step(self, batch, batch_idx: int):
        batch = merge_minibatches(batch)
        module: SCPRETRAINModule = self.module
        labels = batch[REGISTRY_KEYS.LABELS_KEY].view(-1).long()
        labelled = labels < module.n_labels
        x_log = module.log_expression(batch)
        if self.freeze_encoder:
            with torch.no_grad():
                z = module.encoder(x_log)
        else:
            z = module.encoder(x_log)
        logits = module.classifier(z)
        supervised = labelled_cross_entropy(logits, labels, labelled)
        entropy = logits.new_zeros(())
        if self.entropy_weight > 0 and (~labelled).any():
            log_p = F.log_softmax(logits[~labelled], dim=1)
            entropy = -(log_p.exp() * log_p).sum(dim=1).mean()
        loss = supervised + self.entropy_weight * entropy
        n = len(z)
        log = {"on_epoch": True, "on_step": False, "batch_size": n}
        self.log("train_loss", loss, prog_bar=True, **log)
        self.log("train_classification_loss", supervised, **log)
        self.log("train_entropy", entropy, **log)
        return loss
