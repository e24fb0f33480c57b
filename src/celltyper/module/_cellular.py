"""CELLULAR's torch module: a contrastive encoder, a classifier head, and their objective."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from scvi import REGISTRY_KEYS
from scvi.module.base import LossOutput, auto_move_data
from torch import Tensor, nn

from celltyper.nn import (
    batch_mixing_loss,
    centroid_distance_loss,
    labelled_cross_entropy,
    supervised_soft_nn_loss,
)

from ._base import LogExpressionClassifier

TEMPERATURE_RANGE = (0.1, 1.0)


def _encoder(n_input: int, n_hidden: Sequence[int], n_latent: int, dropout_rate: float):
    """LayerNorm(G) -> [Linear -> LayerNorm -> ReLU (-> Dropout after the first)] -> Linear."""
    layers: list[nn.Module] = [nn.LayerNorm(n_input)]
    n_in = n_input
    for i, width in enumerate(n_hidden):
        layers += [nn.Linear(n_in, width), nn.LayerNorm(width), nn.ReLU()]
        if i == 0 and dropout_rate > 0:
            layers.append(nn.Dropout(dropout_rate))
        n_in = width
    layers.append(nn.Linear(n_in, n_latent))
    return nn.Sequential(*layers)


def _classifier(n_latent: int, n_hidden: int, n_labels: int, dropout_rate: float):
    """BatchNorm(latent) -> 2 x [Linear -> BatchNorm -> ReLU -> Dropout] -> Linear."""
    layers: list[nn.Module] = [nn.BatchNorm1d(n_latent)]
    n_in = n_latent
    for _ in range(2):
        layers += [
            nn.Linear(n_in, n_hidden),
            nn.BatchNorm1d(n_hidden),
            nn.ReLU(),
            nn.Dropout(dropout_rate),
        ]
        n_in = n_hidden
    layers.append(nn.Linear(n_in, n_labels))
    return nn.Sequential(*layers)


class CELLULARModule(LogExpressionClassifier):
    """Encoder trained contrastively, then a classifier trained on its frozen output.

    :meth:`loss` is CELLULAR's whole objective: the three contrastive terms on the
    embedding of the labelled cells, plus the classifier's class-weighted cross-entropy.
    Its keywords ``contrastive_weight`` and ``classification_weight`` select what a
    training stage optimises (the encoder stage sets the cross-entropy's weight to 0, the
    frozen-head stage the contrastive weight); with the defaults it is the joint objective.

    Parameters
    ----------
    n_input
        Number of genes.
    n_labels
        Number of reference cell types.
    n_latent
        Dimension of the embedding.
    n_hidden
        Widths of the encoder's hidden layers.
    dropout_rate
        Dropout of the encoder (after its first hidden layer) and of the classifier.
    classifier_hidden
        Width of the classifier's two hidden layers.
    normalize_counts
        ``True`` when the registered data are raw counts: each minibatch becomes
        ``log1p(x / total * mean_total)`` here, with ``mean_total`` the buffer set from the
        reference, so queries are normalised exactly like the reference.
    mean_total
        Mean total counts per reference cell.
    temperature
        Initial temperature of the supervised contrastive loss (learnable, used clamped
        to [0.1, 1]).
    """

    def __init__(
        self,
        n_input: int,
        n_labels: int,
        n_latent: int = 100,
        n_hidden: Sequence[int] = (1000, 500),
        dropout_rate: float = 0.2,
        classifier_hidden: int = 512,
        normalize_counts: bool = True,
        mean_total: float = 1e4,
        temperature: float = 0.25,
    ):
        super().__init__(n_input, n_labels, normalize_counts)
        self.n_latent = n_latent
        self.encoder = _encoder(n_input, tuple(n_hidden), n_latent, dropout_rate)
        self.classifier = _classifier(n_latent, classifier_hidden, n_labels, dropout_rate)
        self.raw_temperature = nn.Parameter(torch.tensor(float(temperature)))
        # Buffers travel with the state dict: a saved model or a query model uses them.
        self.register_buffer("mean_total", torch.tensor(float(mean_total)))
        self.register_buffer("pca_centroid_distances", torch.zeros(n_labels, n_labels))

    @property
    def temperature(self) -> Tensor:
        """The contrastive temperature as used: the parameter clamped to [0.1, 1]."""
        return self.raw_temperature.clamp(*TEMPERATURE_RANGE)

    def clamp_temperature_(self) -> None:
        """Put the raw parameter back into [0.1, 1] (after an optimizer step)."""
        with torch.no_grad():
            self.raw_temperature.clamp_(*TEMPERATURE_RANGE)

    def set_pca_centroid_distances(self, distances: Tensor) -> None:
        """Set the target distances between cell types used by the centroid loss."""
        self.pca_centroid_distances.copy_(torch.as_tensor(distances, dtype=torch.float32))

    def target_sum(self) -> float:
        return float(self.mean_total)

    # -- inference on sparse rows ------------------------------------------------------
    def sparse_input_layer(self) -> tuple[nn.Linear, nn.Module] | None:
        if not isinstance(self.encoder[1], nn.Linear):
            return None
        return self.encoder[1], self.encoder[2:]

    def sparse_input_norm(self) -> nn.LayerNorm | None:
        return self.encoder[0]

    # -- BaseModuleClass interface --------------------------------------------------------
    @auto_move_data
    def inference(self, x_log: Tensor, encoder_grad: bool = True) -> dict[str, Tensor]:
        """The embedding ``z``; the classifier runs in :meth:`loss`, only when it is scored.

        ``encoder_grad=False`` embeds without a graph (a stage that keeps the encoder
        frozen needs none).
        """
        with torch.set_grad_enabled(encoder_grad and torch.is_grad_enabled()):
            return {"z": self.encoder(x_log)}

    def loss(
        self,
        tensors: dict[str, Tensor],
        inference_outputs: dict[str, Tensor],
        generative_outputs: dict[str, Tensor],
        contrastive_weight: float = 1.0,
        target_weight: float = 0.9,
        batch_weight: float = 0.1,
        centroid_weight: float = 1.0,
        batch_temperature: float = 0.5,
        classification_weight: float = 1.0,
        class_weights: Tensor | None = None,
        use_batches: bool = True,
    ) -> LossOutput:
        """CELLULAR's objective on a minibatch.

        ``contrastive_weight`` x (``target_weight`` x L_target + ``batch_weight`` x
        L_batch + ``centroid_weight`` x L_centroid) on the embedding of the labelled cells
        (see :func:`~celltyper.nn.supervised_soft_nn_loss`,
        :func:`~celltyper.nn.batch_mixing_loss` and
        :func:`~celltyper.nn.centroid_distance_loss`; 0 with fewer than two labelled
        cells), plus ``classification_weight`` x the cross-entropy of the classifier on
        the labelled cells, on the same embedding. Unlabelled cells add no loss but pass
        through the classifier (its BatchNorm statistics adapt to them). A term whose
        weight is 0 is not computed: the classifier does not run in the encoder stage.

        Parameters
        ----------
        tensors, inference_outputs, generative_outputs
            As in scvi-tools.
        contrastive_weight
            Weight of the contrastive total.
        target_weight, batch_weight, centroid_weight
            Weights of the three contrastive terms. Without batches (``use_batches``
            false) the batch term is left out and L_target gets weight 1.
        batch_temperature
            Temperature of the batch-mixing term (fixed; L_target's is learnt).
        classification_weight
            Weight of the cross-entropy.
        class_weights
            Weight per cell-type code in the cross-entropy (``None``: all 1).
        use_batches
            Whether to add the batch-mixing term (the data have more than one batch).

        Returns
        -------
        ``LossOutput`` whose ``extra_metrics`` hold the weighted terms computed
        (``target_loss``, ``batch_loss``, ``centroid_loss``, ``classification_loss``;
        they add up to the loss) and ``temperature`` with the contrastive terms.
        """
        if not (contrastive_weight or classification_weight):
            raise ValueError("contrastive_weight and classification_weight are both 0.")
        z = inference_outputs["z"]
        labels = tensors[REGISTRY_KEYS.LABELS_KEY].view(-1).long()
        labelled = labels < self.n_labels
        terms: dict[str, Tensor] = {}
        diagnostics: dict[str, Tensor] = {}
        if contrastive_weight:
            if not use_batches:
                target_weight, batch_weight = 1.0, 0.0
            batches = tensors[REGISTRY_KEYS.BATCH_KEY] if use_batches else None
            target, mixing, centroid = self._contrastive_terms(
                z, labels, labelled, batches, batch_temperature
            )
            terms["target_loss"] = contrastive_weight * target_weight * target
            terms["batch_loss"] = contrastive_weight * batch_weight * mixing
            terms["centroid_loss"] = contrastive_weight * centroid_weight * centroid
            diagnostics["temperature"] = self.temperature.detach()
        if classification_weight:
            weight = None if class_weights is None else class_weights.to(z.device)
            logits = self.classifier(z)
            cross_entropy = labelled_cross_entropy(logits, labels, labelled, weight=weight)
            terms["classification_loss"] = classification_weight * cross_entropy
        return LossOutput(
            loss=sum(terms.values()),
            n_obs_minibatch=len(labels),
            extra_metrics={**terms, **diagnostics},
        )

    def _contrastive_terms(
        self,
        z: Tensor,
        labels: Tensor,
        labelled: Tensor,
        batches: Tensor | None,
        batch_temperature: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """L_target, L_batch (0 without ``batches``) and L_centroid on the labelled cells,
        unweighted."""
        zero = z.sum() * 0.0  # attached to the graph, so backward() works on any minibatch
        if int(labelled.sum()) < 2:
            return zero, zero, zero
        z, labels = z[labelled], labels[labelled]
        target = supervised_soft_nn_loss(z, labels, self.temperature)
        centroid = centroid_distance_loss(z, labels, self.pca_centroid_distances)
        mixing = zero
        if batches is not None:
            batches = batches.view(-1).long()[labelled]
            mixing = batch_mixing_loss(z, labels, batches, batch_temperature)
        return target, mixing, centroid

    def query_trainable_parameters(self) -> Iterable[str]:
        # The encoder is the reference's embedding: a query is mapped by a forward pass,
        # and only the head (with its BatchNorm statistics) adapts.
        for name, _ in self.classifier.named_parameters():
            yield f"classifier.{name}"
