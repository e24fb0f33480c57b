"""MixMatch with a domain adversary: scNym's semi-supervised training."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from torch import Tensor

from celltyper.module import SCNYMModule
from celltyper.nn import (
    drop_values_augmentation,
    linear_ramp,
    mixup,
    sample_dominant_mixup_lambda,
    sharpen,
    sigmoid_ramp,
    soft_cross_entropy,
)

from ._base import ClassifierTrainingPlan, OptimizerName, merge_minibatches


class MixMatchTrainingPlan(ClassifierTrainingPlan):
    """scNym's training: MixMatch on unlabelled cells and a domain adversary.

    Each step receives minibatches (a list, as from ``LabelledUnlabelledSplitter``, or one
    dict); cells are labelled when their label code is a reference class. Labelled and
    unlabelled profiles are augmented; the teacher (the network itself, without gradient)
    gives sharpened pseudo-labels for the unlabelled cells; both
    sets are mixed with a shuffled union of the two (dominant mixup weights); the loss is
    soft-label cross-entropy on mixed labelled cells + ramped MSE on mixed unlabelled cells
    + ramped adversarial cross-entropy through gradient reversal.

    Parameters
    ----------
    module
        An :class:`~celltyper.module.SCNYMModule`.
    sharpen_temperature
        Temperature of the pseudo-label sharpening.
    mixup_alpha
        Beta(alpha, alpha) parameter of the mixup weights.
    augment_drop_rate
        Fraction of values dropped by the augmentation.
    unsup_max_weight
        Final weight of the unsupervised (MixMatch) loss.
    n_epochs_unsup_ramp
        Epochs of the linear ramp of the unsupervised weight.
    adversary_max_weight
        Final weight of the adversarial loss (0 disables the adversary).
    n_epochs_adversary_ramp
        Epochs of the sigmoid ramp of the adversarial weight.
    pseudolabel_min_confidence
        Unlabelled cells whose teacher confidence is below this are left out of the
        unsupervised loss (and of the adversary if ``adversary_confident_only``).
    adversary_confident_only
        Restrict the adversary's unlabelled cells to confident ones.
    domain_from_batch
        Domains are the registered batches; otherwise labelled (0) vs unlabelled (1).
    domain_shift_augmentation
        Probability that a labelled cell is moved by ``u * (mean(unlabelled) -
        mean(labelled))`` of the minibatch, ``u ~ U(0, 1)``, in log space: the classifier
        learns that the shift shared by the query's cells does not change a cell type.
    optimizer, lr, weight_decay
        Optimizer settings (scNym: Adadelta, 1.0, 1e-4).
    """

    def __init__(
        self,
        module: SCNYMModule,
        *,
        sharpen_temperature: float = 0.5,
        mixup_alpha: float = 0.3,
        augment_drop_rate: float = 0.1,
        unsup_max_weight: float = 1.0,
        n_epochs_unsup_ramp: float = 100,
        adversary_max_weight: float = 0.1,
        n_epochs_adversary_ramp: float = 20,
        pseudolabel_min_confidence: float = 0.0,
        adversary_confident_only: bool = False,
        domain_from_batch: bool = True,
        domain_shift_augmentation: float = 0.0,
        optimizer: OptimizerName = "Adadelta",
        lr: float = 1.0,
        weight_decay: float = 1e-4,
    ):
        super().__init__(module, optimizer=optimizer, lr=lr, weight_decay=weight_decay)
        self.sharpen_temperature = sharpen_temperature
        self.mixup_alpha = mixup_alpha
        self.augment_drop_rate = augment_drop_rate
        self.unsup_max_weight = unsup_max_weight
        self.n_epochs_unsup_ramp = n_epochs_unsup_ramp
        self.adversary_max_weight = adversary_max_weight
        self.n_epochs_adversary_ramp = n_epochs_adversary_ramp
        self.pseudolabel_min_confidence = pseudolabel_min_confidence
        self.adversary_confident_only = adversary_confident_only
        self.domain_from_batch = domain_from_batch
        self.domain_shift_augmentation = domain_shift_augmentation

    def unsup_weight(self, epoch: float) -> float:
        return linear_ramp(epoch, self.n_epochs_unsup_ramp, self.unsup_max_weight)

    def adversary_weight(self, epoch: float) -> float:
        return sigmoid_ramp(epoch, self.n_epochs_adversary_ramp, self.adversary_max_weight)

    def _augment(self, x_log: Tensor) -> Tensor:
        return drop_values_augmentation(x_log, self.augment_drop_rate)

    def _domains(self, batch: dict[str, Tensor], is_labelled: Tensor) -> Tensor:
        if self.domain_from_batch:
            return batch[REGISTRY_KEYS.BATCH_KEY].view(-1).long()
        return (~is_labelled).long()

    def _shift_towards_query(self, x_l: Tensor, x_u: Tensor) -> Tensor:
        shift = (x_u.mean(dim=0) - x_l.mean(dim=0)).detach()
        amount = torch.rand(len(x_l), 1, device=x_l.device)
        chosen = torch.rand(len(x_l), 1, device=x_l.device) < self.domain_shift_augmentation
        # Log-expression cannot go below zero.
        return (x_l + chosen * amount * shift).clamp_min(0.0)

    def training_step(self, batch, batch_idx: int):
        batch = merge_minibatches(batch)
        epoch = self.epoch_progress(batch_idx)
        module: SCNYMModule = self.module

        labels = batch[REGISTRY_KEYS.LABELS_KEY].view(-1).long()
        is_labelled = labels < module.n_labels
        # Augmentations act on log1p values; batch centring (if on) comes after them.
        codes = batch[REGISTRY_KEYS.BATCH_KEY].view(-1).long()
        x_log = self._augment(module.log_expression(batch, centre=False))
        x = module.centre_batches(x_log, codes)
        x_l, x_u = x[is_labelled], x[~is_labelled]
        if self.domain_shift_augmentation > 0 and len(x_l) and len(x_u):
            shifted = self._shift_towards_query(x_log[is_labelled], x_log[~is_labelled])
            x_l = module.centre_batches(shifted, codes[is_labelled])
        y_l = F.one_hot(labels[is_labelled], module.n_labels).float()
        n_l, n_u = x_l.shape[0], x_u.shape[0]

        with torch.no_grad():
            teacher = torch.softmax(module.logits_from_log_expression(x_u), dim=1)
            confident = teacher.max(dim=1).values >= self.pseudolabel_min_confidence
            q_u = sharpen(teacher, self.sharpen_temperature)

        # MixMatch: mix every sample with a random member of the union of both sets.
        x_all, y_all = torch.cat([x_l, x_u]), torch.cat([y_l, q_u])
        partner = torch.randperm(n_l + n_u, device=x_all.device)
        lam = sample_dominant_mixup_lambda(n_l + n_u, self.mixup_alpha, x_all.device)
        x_mix, y_mix = mixup(x_all, y_all, x_all[partner], y_all[partner], lam)

        # One forward pass over both sets keeps BatchNorm statistics from both domains.
        logits_mix = module.logits_from_log_expression(x_mix)
        if n_l:
            sup_loss = soft_cross_entropy(logits_mix[:n_l], y_mix[:n_l])
        else:  # query fine-tuning without labelled cells
            sup_loss = logits_mix.sum() * 0.0

        w_unsup = self.unsup_weight(epoch)
        if n_u > 0 and confident.any():
            probs_u = torch.softmax(logits_mix[n_l:], dim=1)
            mse = ((probs_u - y_mix[n_l:]) ** 2).mean(dim=1)
            unsup_loss = mse[confident].mean()
        else:
            unsup_loss = sup_loss.new_zeros(())

        w_adv = self.adversary_weight(epoch)
        adv_loss = sup_loss.new_zeros(())
        if w_adv > 0 and module.n_domains > 1:
            keep = torch.ones_like(is_labelled)
            if self.adversary_confident_only:
                keep[~is_labelled] = confident
            h = module.embed_log_expression(x[keep])
            adv_logits = module.adversary(h, reversal_weight=1.0)
            adv_loss = F.cross_entropy(adv_logits, self._domains(batch, is_labelled)[keep])

        loss = sup_loss + w_unsup * unsup_loss + w_adv * adv_loss
        n = n_l + n_u
        self.log("train_loss", loss, on_epoch=True, on_step=False, batch_size=n, prog_bar=True)
        self.log("train_supervised_loss", sup_loss, on_epoch=True, on_step=False, batch_size=n)
        self.log("train_unsupervised_loss", unsup_loss, on_epoch=True, on_step=False, batch_size=n)
        self.log("train_adversarial_loss", adv_loss, on_epoch=True, on_step=False, batch_size=n)
        self.log("unsupervised_weight", w_unsup, on_epoch=True, on_step=False, batch_size=n)
        self.log("adversarial_weight", w_adv, on_epoch=True, on_step=False, batch_size=n)
        self.log(
            "confident_fraction",
            confident.float().mean() if n_u else 0.0,
            on_epoch=True,
            on_step=False,
            batch_size=n,
        )
        return loss
