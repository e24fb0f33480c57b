"""Training-plan base shared by celltyper's classifiers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from torch import Tensor

from celltyper.module import CellTyperModule

OptimizerName = Literal["Adam", "AdamW", "Adadelta", "SGD"]


def make_optimizer(
    parameters, name: OptimizerName, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """The optimizer ``name`` over the trainable ``parameters``."""
    optimizers: dict[str, Callable] = {
        "Adam": torch.optim.Adam,
        "AdamW": torch.optim.AdamW,
        "Adadelta": torch.optim.Adadelta,
        "SGD": torch.optim.SGD,
    }
    if name not in optimizers:
        raise ValueError(f"optimizer must be one of {sorted(optimizers)}, got {name!r}.")
    trainable = [p for p in parameters if p.requires_grad]
    if not trainable:
        raise ValueError(
            "No trainable parameter is left (all were frozen, e.g. by load_query_data). "
            "Pass unfrozen=True to load_query_data to fine-tune the whole network."
        )
    return optimizers[name](trainable, lr=lr, weight_decay=weight_decay)


def merge_minibatches(batch: dict[str, Tensor] | list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """One minibatch dict from the list a ``ConcatDataLoader`` yields (or a dict as is)."""
    if isinstance(batch, dict):
        return batch
    if len(batch) == 1:
        return batch[0]
    return {key: torch.cat([part[key] for part in batch]) for key in batch[0]}


class ModulePlan(pl.LightningModule):
    """Optimizer set-up and train mode shared by every celltyper training plan.

    Parameters
    ----------
    module
        A :class:`~celltyper.module.CellTyperModule`.
    optimizer
        Name of the torch optimizer.
    lr
        Learning rate.
    weight_decay
        L2 penalty of the optimizer.
    """

    def __init__(
        self,
        module: CellTyperModule,
        optimizer: OptimizerName = "Adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ):
        super().__init__()
        self.module = module
        self.optimizer_name = optimizer
        self.lr = lr
        self.weight_decay = weight_decay

    def trainable_parameters(self):
        """The parameters the optimizer updates (all of the module's by default)."""
        return self.module.parameters()

    def on_train_epoch_start(self) -> None:
        # scvi's TrainRunner and ArchesMixin leave the module in eval mode after a fit, and
        # Lightning keeps submodule modes: without this a second train() or a query
        # fine-tune would run with BatchNorm statistics and dropout frozen.
        self.module.train()

    def configure_optimizers(self):
        return make_optimizer(
            self.trainable_parameters(), self.optimizer_name, self.lr, self.weight_decay
        )


class ClassifierTrainingPlan(ModulePlan):
    """Labelled-cell validation shared by the classifier plans.

    Validation logs ``validation_loss`` (cross-entropy) and ``validation_accuracy`` on the
    labelled cells of the validation set; early stopping monitors ``validation_loss``.
    Parameters are those of :class:`ModulePlan`.
    """

    def __init__(
        self,
        module: CellTyperModule,
        optimizer: OptimizerName = "Adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ):
        super().__init__(module, optimizer, lr, weight_decay)
        # Set by scvi's TrainRunner; kept so the plan behaves like scvi's own plans.
        self.n_obs_training: int | None = None
        self.n_obs_validation: int | None = None

    def epoch_progress(self, batch_idx: int) -> float:
        """Current epoch as a float, so ramps move smoothly within an epoch."""
        n_batches = self.trainer.num_training_batches if self.trainer is not None else 0
        if not n_batches or n_batches == float("inf"):
            return float(self.current_epoch)
        return self.current_epoch + batch_idx / n_batches

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
        self.log("validation_loss", loss, on_epoch=True, batch_size=n, prog_bar=True)
        self.log("validation_accuracy", accuracy, on_epoch=True, batch_size=n)
        return loss
