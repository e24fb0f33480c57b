"""scNym's torch module: an MLP classifier with a domain adversary, and its MixMatch loss."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module.base import LossOutput
from scvi.nn import FCLayers
from torch import Tensor, nn

from celltyper.nn import (
    CPM_TARGET_SUM,
    DomainAdversary,
    drop_values_augmentation,
    mixup,
    sample_dominant_mixup_lambda,
    sharpen,
    soft_cross_entropy,
)

from ._base import LogExpressionClassifier, fc_layers_first_linear


def shift_towards_query(x_l: Tensor, x_u: Tensor, probability: float) -> Tensor:
    """Move each labelled profile, with ``probability``, by ``u * (mean(x_u) - mean(x_l))``,
    ``u ~ U(0, 1)``, in log space (never below zero): the classifier learns that the shift
    shared by the query's cells does not change a cell type."""
    shift = (x_u.mean(dim=0) - x_l.mean(dim=0)).detach()
    amount = torch.rand(len(x_l), 1, device=x_l.device)
    chosen = torch.rand(len(x_l), 1, device=x_l.device) < probability
    return (x_l + chosen * amount * shift).clamp_min(0.0)


def label_shift_weights(labels: Tensor, target: Tensor, n_labels: int) -> Tensor:
    """Per-cell weights (mean 1) that give ``labels`` the class proportions ``target``.

    A cell of class ``k`` weighs ``target[k] / share[k]``, with ``share`` the classes'
    shares among ``labels``; the weights are then scaled to a mean of 1.
    """
    share = torch.bincount(labels, minlength=n_labels).to(target.dtype) / len(labels)
    weights = target[labels] / share[labels]
    return weights / weights.mean().clamp_min(1e-12)


class SCNYMModule(LogExpressionClassifier):
    """Classifier of Kimmel & Kelley (2021): ``input -> n_hidden x n_layers -> n_labels``.

    Each hidden layer is Linear -> BatchNorm -> ReLU -> Dropout; the output of the last
    hidden layer is the cell embedding. A domain adversary behind a gradient reversal
    reads that embedding during training. :meth:`loss` is scNym's whole objective
    (MixMatch and the adversary).

    Parameters
    ----------
    n_input
        Number of genes.
    n_labels
        Number of reference cell types.
    n_domains
        Number of domains the adversary tells apart.
    n_hidden
        Width of the hidden layers.
    n_layers
        Number of hidden layers.
    dropout_rate
        Dropout after each hidden layer.
    normalize_counts
        ``True`` when the registered data are raw counts: each minibatch is turned into
        log1p(counts per million) here, so the user's data are never copied or modified.
    domain_from_batch
        The adversary's domains are the registered batches; otherwise labelled (0) vs
        unlabelled (1) cells.
    """

    def __init__(
        self,
        n_input: int,
        n_labels: int,
        n_domains: int,
        n_hidden: int = 256,
        n_layers: int = 2,
        dropout_rate: float = 0.1,
        normalize_counts: bool = True,
        domain_from_batch: bool = True,
    ):
        super().__init__(n_input, n_labels, normalize_counts)
        self.n_domains = n_domains
        self.domain_from_batch = domain_from_batch
        self.encoder = FCLayers(
            n_in=n_input,
            n_out=n_hidden,
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
            use_batch_norm=True,
            use_layer_norm=False,
            use_activation=True,
            activation_fn=nn.ReLU,
        )
        self.classifier = nn.Linear(n_hidden, n_labels)
        self.adversary = DomainAdversary(n_hidden, max(n_domains, 1), n_hidden=n_hidden)

    def target_sum(self) -> float:
        return CPM_TARGET_SUM

    def sparse_input_layer(self) -> tuple[nn.Linear, Callable[[Tensor], Tensor]] | None:
        return fc_layers_first_linear(self.encoder)

    def query_trainable_parameters(self) -> Iterable[str]:
        # AdaBN-style adaptation: normalisation layers and the adversary move with the
        # query; the gene-level weights and the classifier keep the reference's knowledge.
        yield from super().query_trainable_parameters()
        for name, _ in self.adversary.named_parameters():
            yield f"adversary.{name}"

    def loss(
        self,
        tensors: dict[str, Tensor],
        inference_outputs: dict[str, Tensor],
        generative_outputs: dict[str, Tensor],
        unsup_weight: float = 1.0,
        adversary_weight: float = 0.1,
        sharpen_temperature: float = 0.5,
        mixup_alpha: float = 0.3,
        augment_drop_rate: float = 0.1,
        pseudolabel_min_confidence: float = 0.0,
        adversary_confident_only: bool = False,
        adversary_label_shift: bool = True,
        domain_shift_augmentation: float = 0.0,
    ) -> LossOutput:
        """scNym's objective on a minibatch of labelled and unlabelled cells.

        Profiles are augmented (values dropped); the network itself, without gradient,
        gives sharpened pseudo-labels for the unlabelled cells; both sets are mixed with
        a shuffled union of the two (dominant mixup weights). The loss is soft-label
        cross-entropy on the mixed labelled cells, plus ``unsup_weight`` x the MSE on the
        mixed unlabelled cells, plus ``adversary_weight`` x the domain cross-entropy
        through gradient reversal.

        Parameters
        ----------
        tensors, inference_outputs, generative_outputs
            As in scvi-tools.
        unsup_weight
            Weight of the unsupervised (MixMatch) term.
        adversary_weight
            Weight of the adversarial term (0 disables the adversary).
        sharpen_temperature
            Temperature of the pseudo-label sharpening.
        mixup_alpha
            Beta(alpha, alpha) parameter of the mixup weights.
        augment_drop_rate
            Fraction of values dropped by the augmentation.
        pseudolabel_min_confidence
            Unlabelled cells whose teacher confidence is below this are left out of the
            unsupervised term (and of the adversary with ``adversary_confident_only``).
        adversary_confident_only
            Restrict the adversary's unlabelled cells to confident ones.
        adversary_label_shift
            Weight the labelled cells in the adversary's loss so that their cell types
            come in the proportions the teacher predicts for the minibatch's unlabelled
            cells (:func:`label_shift_weights`). The labelled cells are drawn class-balanced
            and a query rarely holds the reference's mix of types; unweighted, the
            adversary then pulls query cells of an abundant type onto the rare ones.
        domain_shift_augmentation
            Probability that a labelled cell is moved towards the query's mean (see
            :func:`shift_towards_query`).

        Returns
        -------
        ``LossOutput`` whose ``extra_metrics`` hold the weighted terms
        (``supervised_loss``, ``mixmatch_loss``, ``adversary_loss``, adding up to the
        loss) and ``confident_fraction``.
        """
        labels = tensors[REGISTRY_KEYS.LABELS_KEY].view(-1).long()
        is_labelled = labels < self.n_labels
        codes = tensors[REGISTRY_KEYS.BATCH_KEY].view(-1).long()
        # Augmentations act on log1p values; batch centring (if on) comes after them.
        x_log = drop_values_augmentation(
            self.log_expression(tensors, centre=False), augment_drop_rate
        )
        x = self.centre_batches(x_log, codes)
        x_l, x_u = x[is_labelled], x[~is_labelled]
        if domain_shift_augmentation > 0 and len(x_l) and len(x_u):
            shifted = shift_towards_query(
                x_log[is_labelled], x_log[~is_labelled], domain_shift_augmentation
            )
            x_l = self.centre_batches(shifted, codes[is_labelled])
        y_l = F.one_hot(labels[is_labelled], self.n_labels).float()
        n_l, n_u = len(x_l), len(x_u)

        with torch.no_grad():
            teacher = torch.softmax(self.logits_from_log_expression(x_u), dim=1)
            confident = teacher.max(dim=1).values >= pseudolabel_min_confidence
            q_u = sharpen(teacher, sharpen_temperature)

        # MixMatch: mix every sample with a random member of the union of both sets.
        x_all, y_all = torch.cat([x_l, x_u]), torch.cat([y_l, q_u])
        partner = torch.randperm(n_l + n_u, device=x_all.device)
        lam = sample_dominant_mixup_lambda(n_l + n_u, mixup_alpha, x_all.device)
        x_mix, y_mix = mixup(x_all, y_all, x_all[partner], y_all[partner], lam)

        # One forward pass over both sets keeps BatchNorm statistics from both domains.
        logits_mix = self.logits_from_log_expression(x_mix)
        if n_l:
            supervised = soft_cross_entropy(logits_mix[:n_l], y_mix[:n_l])
        else:  # query fine-tuning without labelled cells
            supervised = logits_mix.sum() * 0.0
        unsupervised = supervised.new_zeros(())
        if n_u and confident.any():
            mse = ((torch.softmax(logits_mix[n_l:], dim=1) - y_mix[n_l:]) ** 2).mean(dim=1)
            unsupervised = mse[confident].mean()
        adversarial = supervised.new_zeros(())
        if adversary_weight > 0 and self.n_domains > 1:
            keep = torch.ones_like(is_labelled)
            if adversary_confident_only:
                keep[~is_labelled] = confident
            domains = codes if self.domain_from_batch else (~is_labelled).long()
            adv_logits = self.adversary(self.embed_log_expression(x[keep]), reversal_weight=1.0)
            weights = torch.ones(len(labels), device=x.device)
            if adversary_label_shift and n_l and confident.any():
                predicted_mix = teacher[confident].mean(dim=0)
                weights[is_labelled] = label_shift_weights(
                    labels[is_labelled], predicted_mix, self.n_labels
                )
            per_cell = F.cross_entropy(adv_logits, domains[keep], reduction="none")
            adversarial = (per_cell * weights[keep]).sum() / weights[keep].sum()

        terms = {
            "supervised_loss": supervised,
            "mixmatch_loss": unsup_weight * unsupervised,
            "adversary_loss": adversary_weight * adversarial,
        }
        return LossOutput(
            loss=sum(terms.values()),
            n_obs_minibatch=len(labels),
            extra_metrics={
                **terms,
                "confident_fraction": confident.float().mean() if n_u else torch.zeros(()),
            },
        )
