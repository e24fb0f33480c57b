"""scPretrain's torch modules: a sigmoid encoder, pseudo-label heads and a classifier."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module.base import LossOutput, auto_move_data
from torch import Tensor, nn

from celltyper.data import DATASET_KEY, PSEUDO_LABELS_KEY
from celltyper.nn import labelled_cross_entropy

from ._base import LogExpressionClassifier

#: Total each cell is scaled to before ``log1p`` (scanpy's ``normalize_total`` default).
SCPRETRAIN_TARGET_SUM = 1e4


def _encoder(n_input: int, n_hidden: Sequence[int], n_latent: int) -> nn.Sequential:
    """``[Linear -> ReLU] x len(n_hidden) -> Linear(n_latent) -> Sigmoid``."""
    layers: list[nn.Module] = []
    n_in = n_input
    for width in n_hidden:
        layers += [nn.Linear(n_in, width), nn.ReLU()]
        n_in = width
    layers += [nn.Linear(n_in, n_latent), nn.Sigmoid()]
    return nn.Sequential(*layers)


def _classifier(n_latent: int, n_hidden: int, n_labels: int) -> nn.Sequential:
    """``Linear(n_latent, n_hidden) -> BatchNorm -> ReLU -> Linear(n_labels)``."""
    return nn.Sequential(
        nn.Linear(n_latent, n_hidden),
        nn.BatchNorm1d(n_hidden),
        nn.ReLU(),
        nn.Linear(n_hidden, n_labels),
    )


class SCPRETRAINModule(LogExpressionClassifier):
    """Encoder pretrained on pseudo-labels, then a classifier head fine-tuned on labels.

    :meth:`loss` is either objective of scPretrain: the pseudo-label cross-entropies of
    pretraining (given the phase's heads), or the fine-tuning cross-entropy on labelled
    cells (plus an optional entropy term on unlabelled cells).

    Parameters
    ----------
    n_input
        Number of genes.
    n_labels
        Number of reference cell types.
    n_latent
        Width of the representation (the encoder's sigmoid output).
    n_hidden
        Widths of optional hidden ReLU layers before the representation; ``()`` gives
        the published one-layer encoder ``Linear(genes, 200) -> sigmoid``.
    classifier_hidden
        Width of the classifier's hidden layer (``n_latent -> classifier_hidden -> C``).
    normalize_counts
        ``True`` when the registered data are raw counts: each minibatch becomes
        ``log1p(x / total * target_sum)`` here, so the user's data are never copied.
    target_sum
        Total each cell is scaled to before ``log1p``.
    """

    def __init__(
        self,
        n_input: int,
        n_labels: int,
        n_latent: int = 200,
        n_hidden: Sequence[int] = (),
        classifier_hidden: int = 100,
        normalize_counts: bool = True,
        target_sum: float = SCPRETRAIN_TARGET_SUM,
    ):
        super().__init__(n_input, n_labels, normalize_counts)
        self.n_latent = n_latent
        self._target_sum = float(target_sum)
        self.encoder = _encoder(n_input, tuple(n_hidden), n_latent)
        self.classifier = _classifier(n_latent, classifier_hidden, n_labels)

    def sparse_input_layer(self) -> tuple[nn.Linear, Callable[[Tensor], Tensor]] | None:
        return self.encoder[0], self.encoder[1:]

    def target_sum(self) -> float:
        return self._target_sum

    def query_trainable_parameters(self) -> Iterable[str]:
        # The pretrained encoder is the reference's representation; a query adapts the
        # classifier head (with its BatchNorm) to its own cells.
        for name, _ in self.classifier.named_parameters():
            yield f"classifier.{name}"

    @auto_move_data
    def inference(self, x_log: Tensor, frozen_encoder: bool = False) -> dict[str, Tensor]:
        """Representation ``z`` and cell-type logits; ``frozen_encoder`` computes ``z``
        without gradient (the encoder as a fixed feature extractor)."""
        with torch.no_grad() if frozen_encoder else nullcontext():
            z = self.encoder(x_log)
        return {"z": z, "logits": self.classifier(z)}

    def loss(
        self,
        tensors: dict[str, Tensor],
        inference_outputs: dict[str, Tensor],
        generative_outputs: dict[str, Tensor],
        pseudo_label_heads: PseudoLabelHeads | None = None,
        entropy_weight: float = 0.0,
    ) -> LossOutput:
        """Pretraining or fine-tuning objective on a minibatch.

        Parameters
        ----------
        tensors, inference_outputs, generative_outputs
            As in scvi-tools; pretraining minibatches also hold each cell's dataset code
            and pseudo-labels (see :class:`~celltyper.data.PseudoLabelDataModule`).
        pseudo_label_heads
            The heads of a pretraining phase: the loss is then, averaged over cells, the
            sum of each cell's cross-entropies over its dataset's heads
            (``pseudo_label_loss``; ``pseudo_label_accuracy_<r>`` per resolution).
            ``None``: the fine-tuning loss.
        entropy_weight
            Fine-tuning: weight of the mean entropy of the predictions on unlabelled
            cells (entropy minimisation as in TENT, Wang et al. 2021) added to the
            cross-entropy on labelled cells (``classification_loss``, ``entropy_loss``).

        Returns
        -------
        ``LossOutput`` whose ``extra_metrics`` hold the weighted terms (names ending in
        ``_loss``, adding up to the loss) and diagnostics.
        """
        z = inference_outputs["z"]
        if pseudo_label_heads is not None:
            datasets, targets = tensors[DATASET_KEY], tensors[PSEUDO_LABELS_KEY]
            loss = pseudo_label_heads.loss(z, datasets, targets)
            accuracy = pseudo_label_heads.accuracy(z.detach(), datasets, targets)
            return LossOutput(
                loss=loss,
                n_obs_minibatch=len(z),
                extra_metrics={
                    "pseudo_label_loss": loss,
                    **{
                        f"pseudo_label_accuracy_{r}": torch.tensor(a)
                        for r, a in enumerate(accuracy)
                    },
                },
            )
        logits = inference_outputs["logits"]
        labels = tensors[REGISTRY_KEYS.LABELS_KEY].view(-1).long()
        labelled = labels < self.n_labels
        entropy = logits.new_zeros(())
        if entropy_weight > 0 and (~labelled).any():
            log_p = F.log_softmax(logits[~labelled], dim=1)
            entropy = -(log_p.exp() * log_p).sum(dim=1).mean()
        terms = {
            "classification_loss": labelled_cross_entropy(logits, labels, labelled),
            "entropy_loss": entropy_weight * entropy,
        }
        return LossOutput(
            loss=sum(terms.values()), n_obs_minibatch=len(labels), extra_metrics=terms
        )


class PseudoLabelHeads(nn.Module):
    """One linear head per (dataset, resolution) on the shared representation.

    Head ``d * n_resolutions + r`` predicts the K-means cluster of resolution ``r`` of
    the cells of dataset ``d``; a cell only enters the heads of its own dataset.

    Parameters
    ----------
    n_latent
        Width of the representation the heads read.
    n_clusters
        ``n_clusters[d][r]``: number of clusters of dataset ``d`` at resolution ``r``
        (every dataset has the same number of resolutions).
    """

    def __init__(self, n_latent: int, n_clusters: Sequence[Sequence[int]]):
        super().__init__()
        self.n_clusters = [[int(k) for k in row] for row in n_clusters]
        if not self.n_clusters or not self.n_clusters[0]:
            raise ValueError("n_clusters needs at least one dataset and one resolution.")
        self.n_resolutions = len(self.n_clusters[0])
        if any(len(row) != self.n_resolutions for row in self.n_clusters):
            raise ValueError("Every dataset needs the same number of resolutions.")
        self.heads = nn.ModuleList(nn.Linear(n_latent, k) for row in self.n_clusters for k in row)

    @property
    def n_datasets(self) -> int:
        return len(self.n_clusters)

    def __len__(self) -> int:
        return len(self.heads)

    def head(self, dataset: int, resolution: int) -> nn.Linear:
        """The head of ``dataset`` at ``resolution``."""
        return self.heads[dataset * self.n_resolutions + resolution]

    def loss(self, z: Tensor, datasets: Tensor, pseudo_labels: Tensor) -> Tensor:
        """Mean over cells of the sum of each cell's cross-entropies over its heads.

        Parameters
        ----------
        z
            Representation, ``(n, n_latent)``.
        datasets
            Dataset code of each cell, ``(n,)``.
        pseudo_labels
            Cluster of each cell at each resolution, ``(n, n_resolutions)``.
        """
        datasets = datasets.view(-1).long()
        total = z.new_zeros(())
        for dataset in torch.unique(datasets).tolist():
            members = datasets == dataset
            for resolution in range(self.n_resolutions):
                logits = self.head(int(dataset), resolution)(z[members])
                target = pseudo_labels[members, resolution].long()
                total = total + F.cross_entropy(logits, target, reduction="sum")
        return total / max(len(z), 1)

    @torch.no_grad()
    def accuracy(self, z: Tensor, datasets: Tensor, pseudo_labels: Tensor) -> np.ndarray:
        """Per-resolution accuracy of the heads' argmax on the given cells."""
        datasets = datasets.view(-1).long()
        correct = np.zeros(self.n_resolutions)
        for dataset in torch.unique(datasets).tolist():
            members = datasets == dataset
            for resolution in range(self.n_resolutions):
                predicted = self.head(int(dataset), resolution)(z[members]).argmax(dim=1)
                target = pseudo_labels[members, resolution].long()
                correct[resolution] += float((predicted == target).sum())
        return correct / max(len(z), 1)
