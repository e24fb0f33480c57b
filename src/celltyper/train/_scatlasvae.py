"""scAtlasVAE's training: ELBO with KL warm-up, late cell-type heads, optional MMD."""

from __future__ import annotations

import torch.nn.functional as F
from scvi.dataloaders import AnnDataLoader
from torch import Tensor

from celltyper.data import LabelledUnlabelledSplitter
from celltyper.module import SCATLASVAEModule

from ._base import ClassifierTrainingPlan, OptimizerName, merge_minibatches


class AllCellsSplitter(LabelledUnlabelledSplitter):
    """Every training cell once per epoch in one shuffled loader; labelled validation.

    The validation cells are a per-class share of the labelled cells, as in
    :class:`~celltyper.data.LabelledUnlabelledSplitter`, but a VAE's reconstruction must
    see labelled and unlabelled cells equally often, so no set is cycled or oversampled.
    """

    def train_dataloader(self):
        return AnnDataLoader(
            self.adata_manager,
            indices=self.train_idx,
            shuffle=True,
            batch_size=self.batch_size,
            drop_last=self._drop_last(len(self.train_idx)),
            **self.loader_kwargs,
        )


class SCATLASVAETrainingPlan(ClassifierTrainingPlan):
    """Training of :class:`~celltyper.module.SCATLASVAEModule`.

    Loss per step: reconstruction + ``kl_weight`` x KL, where ``kl_weight`` ramps linearly
    from 0 to ``max_kl_weight`` over ``n_epochs_kl_warmup`` epochs; from epoch
    ``prediction_start_epoch`` on, plus the cell-type cross-entropies; plus
    ``mmd_weight`` x MMD between the groups of the module's MMD covariate.

    Validation logs ``validation_loss``: the ELBO with the full KL weight plus the
    cross-entropies on the held-out labelled cells (always included, so that the loss of
    epochs with trained heads is lower), and ``validation_accuracy`` of the primary head.

    Parameters
    ----------
    module
        The module.
    n_epochs_kl_warmup
        Epochs of the KL ramp (0: full weight at once).
    max_kl_weight
        Final KL weight.
    prediction_start_epoch
        First epoch (0-based) whose loss includes the cell-type heads.
    mmd_weight
        Weight of the MMD penalty (0 disables it).
    optimizer, lr, weight_decay
        Optimizer settings. Covariate tables never get weight decay, so rows frozen by
        query surgery (zero gradient) stay exactly unchanged.
    """

    def __init__(
        self,
        module: SCATLASVAEModule,
        *,
        n_epochs_kl_warmup: float = 400,
        max_kl_weight: float = 1.0,
        prediction_start_epoch: int = 0,
        mmd_weight: float = 0.0,
        optimizer: OptimizerName = "Adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ):
        super().__init__(module, optimizer=optimizer, lr=lr, weight_decay=weight_decay)
        self.n_epochs_kl_warmup = n_epochs_kl_warmup
        self.max_kl_weight = max_kl_weight
        self.prediction_start_epoch = prediction_start_epoch
        self.mmd_weight = mmd_weight

    def kl_weight(self, epoch: float) -> float:
        if self.n_epochs_kl_warmup <= 0:
            return self.max_kl_weight
        return self.max_kl_weight * min(1.0, epoch / self.n_epochs_kl_warmup)

    def prediction_weight(self, epoch: int) -> float:
        return 1.0 if epoch >= self.prediction_start_epoch else 0.0

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        if self.weight_decay > 0:
            tables = {id(t.weight) for t in self.module.covariate_tables()}
            group = optimizer.param_groups[0]
            decayed = [p for p in group["params"] if id(p) not in tables]
            kept = [p for p in group["params"] if id(p) in tables]
            group["params"] = decayed
            if kept:
                optimizer.add_param_group({"params": kept, "weight_decay": 0.0})
        return optimizer

    def training_step(self, batch, batch_idx: int):
        batch = merge_minibatches(batch)
        epoch = self.epoch_progress(batch_idx)
        _, _, losses = self.module(
            batch,
            loss_kwargs={
                "kl_weight": self.kl_weight(epoch),
                "prediction_weight": self.prediction_weight(self.current_epoch),
                "mmd_weight": self.mmd_weight,
            },
        )
        n = losses.n_obs_minibatch
        self.log(
            "train_loss", losses.loss, on_epoch=True, on_step=False, batch_size=n, prog_bar=True
        )
        self.log(
            "train_reconstruction_loss",
            losses.reconstruction_loss_sum / n,
            on_epoch=True,
            on_step=False,
            batch_size=n,
        )
        self.log(
            "train_kl_local", losses.kl_local_sum / n, on_epoch=True, on_step=False, batch_size=n
        )
        for name, value in losses.extra_metrics.items():
            self.log(f"train_{name}", value, on_epoch=True, on_step=False, batch_size=n)
        self.log("kl_weight", self.kl_weight(epoch), on_epoch=True, on_step=False, batch_size=n)
        return losses.loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int):
        _, _, losses = self.module(
            batch, loss_kwargs={"kl_weight": 1.0, "prediction_weight": 1.0, "mmd_weight": 0.0}
        )
        n = losses.n_obs_minibatch
        self.log("validation_loss", losses.loss, on_epoch=True, batch_size=n, prog_bar=True)
        module: SCATLASVAEModule = self.module
        if module.n_label_keys:
            labels = module.label_codes(batch, 0)
            labelled = labels < module.n_labels
            if labelled.any():
                logits = module.classify(batch)[labelled]
                accuracy = (logits.argmax(dim=1) == labels[labelled]).float().mean()
                ce = F.cross_entropy(logits, labels[labelled])
                k = int(labelled.sum())
                self.log("validation_accuracy", accuracy, on_epoch=True, batch_size=k)
                self.log("validation_classification_loss", ce, on_epoch=True, batch_size=k)
        return losses.loss
