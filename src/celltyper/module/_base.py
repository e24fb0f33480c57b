"""The interface between celltyper's torch modules and the shared model mixins."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from scvi import REGISTRY_KEYS
from scvi.module.base import BaseModuleClass
from torch import Tensor, nn


class CellTyperModule(BaseModuleClass):
    """Base class of every celltyper module.

    The shared mixins (``AnnotationMixin``, ``QueryMixin``) talk to a module only through
    this interface, so a new method plugs in by implementing it:

    - :meth:`embed` -- minibatch dict (as yielded by scvi's ``AnnDataLoader``) -> latent
      representation, ``(n_cells, n_latent)``;
    - :meth:`classify` -- minibatch dict -> logits over the reference cell types,
      ``(n_cells, n_labels)``;
    - :meth:`query_trainable_parameters` -- the names of the parameters that stay trainable
      after scArches-style surgery (the default freezes everything but BatchNorm layers).

    Attributes
    ----------
    n_labels
        Number of reference cell types (the unlabelled category excluded).
    """

    n_labels: int

    def embed(self, tensors: dict[str, Tensor]) -> Tensor:
        """Latent representation of the cells of a minibatch."""
        raise NotImplementedError("Every celltyper module must implement embed().")

    def classify(self, tensors: dict[str, Tensor]) -> Tensor:
        """Cell-type logits of the cells of a minibatch."""
        raise NotImplementedError("Every celltyper module must implement classify().")

    @staticmethod
    def expression(tensors: dict[str, Tensor]) -> Tensor:
        """The expression matrix of a minibatch."""
        return tensors[REGISTRY_KEYS.X_KEY]

    def query_trainable_parameters(self) -> Iterable[str]:
        """Names of parameters fine-tuned on query data after surgery (when not unfrozen)."""
        for module_name, module in self.named_modules():
            if isinstance(module, nn.BatchNorm1d | nn.LayerNorm):
                for param_name, _ in module.named_parameters(recurse=False):
                    yield f"{module_name}.{param_name}" if module_name else param_name

    def freeze_for_query(self, unfrozen: bool = False) -> list[str]:
        """Apply the module's surgery freezing rule; returns the names left trainable."""
        trainable = (
            {name for name, _ in self.named_parameters()}
            if unfrozen
            else set(self.query_trainable_parameters())
        )
        for name, parameter in self.named_parameters():
            parameter.requires_grad = name in trainable
        return sorted(trainable)

    @torch.inference_mode()
    def predict_proba(self, tensors: dict[str, Tensor]) -> Tensor:
        """Softmax of :meth:`classify`."""
        return torch.softmax(self.classify(tensors), dim=-1)
