"""scNym's torch module: an MLP classifier with a domain adversary."""

from __future__ import annotations

from collections.abc import Iterable

from scvi.nn import FCLayers
from torch import nn

from celltyper.nn import CPM_TARGET_SUM, DomainAdversary

from ._base import LogExpressionClassifier


class SCNYMModule(LogExpressionClassifier):
    """Classifier of Kimmel & Kelley (2021): ``input -> n_hidden x n_layers -> n_labels``.

    Each hidden layer is Linear -> BatchNorm -> ReLU -> Dropout; the output of the last
    hidden layer is the cell embedding. A domain adversary behind a gradient reversal
    reads that embedding during training.

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
    ):
        super().__init__()
        self.n_input = n_input
        self.n_labels = n_labels
        self.n_domains = n_domains
        self.normalize_counts = normalize_counts
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

    def query_trainable_parameters(self) -> Iterable[str]:
        # AdaBN-style adaptation: normalisation layers and the adversary move with the
        # query; the gene-level weights and the classifier keep the reference's knowledge.
        yield from super().query_trainable_parameters()
        for name, _ in self.adversary.named_parameters():
            yield f"adversary.{name}"
