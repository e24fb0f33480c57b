"""scNym's torch module: an MLP classifier with a domain adversary."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module.base import LossOutput, auto_move_data
from scvi.nn import FCLayers
from torch import Tensor, nn

from celltyper.nn import CPM_TARGET_SUM, DomainAdversary, log1p_normalize

from ._base import CellTyperModule


class SCNYMModule(CellTyperModule):
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

    # -- input --------------------------------------------------------------------------
    def log_expression(self, tensors: dict[str, Tensor]) -> Tensor:
        """log1p(CPM) of the minibatch, the space scNym's network and augmentations use."""
        x = self.expression(tensors)
        return log1p_normalize(x, CPM_TARGET_SUM) if self.normalize_counts else x

    # -- network pieces -----------------------------------------------------------------
    def embed_log_expression(self, x_log: Tensor) -> Tensor:
        """Embedding (last hidden layer) of log1p(CPM) profiles."""
        return self.encoder(x_log)

    def logits_from_log_expression(self, x_log: Tensor) -> Tensor:
        """Logits of log1p(CPM) profiles; differentiable (used by expected gradients)."""
        return self.classifier(self.encoder(x_log))

    # -- CellTyperModule interface ------------------------------------------------------
    @auto_move_data
    def embed(self, tensors: dict[str, Tensor]) -> Tensor:
        return self.embed_log_expression(self.log_expression(tensors))

    @auto_move_data
    def classify(self, tensors: dict[str, Tensor]) -> Tensor:
        return self.logits_from_log_expression(self.log_expression(tensors))

    def query_trainable_parameters(self) -> Iterable[str]:
        # AdaBN-style adaptation: normalisation layers and the adversary move with the
        # query; the gene-level weights and the classifier keep the reference's knowledge.
        yield from super().query_trainable_parameters()
        for name, _ in self.adversary.named_parameters():
            yield f"adversary.{name}"

    # -- BaseModuleClass interface --------------------------------------------------------
    def _get_inference_input(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"x_log": self.log_expression(tensors)}

    def _get_generative_input(self, tensors, inference_outputs) -> dict:
        return {}

    @auto_move_data
    def inference(self, x_log: Tensor) -> dict[str, Tensor]:
        z = self.embed_log_expression(x_log)
        return {"z": z, "logits": self.classifier(z)}

    def generative(self) -> dict:
        return {}

    def loss(self, tensors, inference_outputs, generative_outputs) -> LossOutput:
        """Cross-entropy on the labelled cells of the minibatch (the validation criterion)."""
        labels = tensors[REGISTRY_KEYS.LABELS_KEY].view(-1).long()
        logits = inference_outputs["logits"]
        labelled = labels < self.n_labels
        if labelled.any():
            ce = F.cross_entropy(logits[labelled], labels[labelled], reduction="none")
            loss = ce.mean()
        else:
            ce = torch.zeros(0, device=logits.device)
            loss = logits.sum() * 0.0
        return LossOutput(loss=loss, n_obs_minibatch=int(labelled.sum()))
