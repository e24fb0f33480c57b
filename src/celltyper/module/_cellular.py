"""CELLULAR's torch module: a contrastive encoder and a classifier head on its embedding."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

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
        super().__init__()
        self.n_input = n_input
        self.n_labels = n_labels
        self.n_latent = n_latent
        self.normalize_counts = normalize_counts
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

    def query_trainable_parameters(self) -> Iterable[str]:
        # The encoder is the reference's embedding: a query is mapped by a forward pass,
        # and only the head (with its BatchNorm statistics) adapts.
        for name, _ in self.classifier.named_parameters():
            yield f"classifier.{name}"
