"""The interface between celltyper's torch modules and the shared model mixins."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse
from scvi import REGISTRY_KEYS
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import Tensor, nn

from celltyper.nn import labelled_cross_entropy, log1p_normalize


class SparseRows:
    """Rows of a CSR matrix (scipy) handed to a module at inference, sliced by rows.

    A module whose encoder opens with a linear layer multiplies the stored entries only
    (:meth:`LogExpressionClassifier.sparse_input_layer`) instead of a densified matrix:
    a cell expresses a small share of the genes.
    """

    def __init__(self, matrix):
        self.matrix = matrix

    def __len__(self) -> int:
        return self.matrix.shape[0]

    def __getitem__(self, rows) -> SparseRows:
        return SparseRows(self.matrix[rows])

    def tensor(self, device: torch.device) -> Tensor:
        """The rows as a torch sparse CSR tensor (float32) on ``device``."""
        m = self.matrix
        with warnings.catch_warnings():
            # torch's notice that sparse CSR support is "in beta" says nothing to a user.
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support")
            return torch.sparse_csr_tensor(
                torch.from_numpy(m.indptr.astype(np.int64)),
                torch.from_numpy(m.indices.astype(np.int64)),
                torch.from_numpy(np.asarray(m.data, dtype=np.float32)),
                size=m.shape,
                device=device,
                check_invariants=False,  # scipy's CSR is valid; checking costs a pass
            )


def sparse_log_values(rows, target_sum: float | None, normalise: bool = True):
    """CSR ``rows`` with their stored entries as the encoder reads them:
    ``log1p(x / total * target_sum)`` (``log1p(x)`` when ``target_sum`` is ``None``), or
    the values as they are when ``normalise`` is false; zeros stay zeros, so the result
    keeps the rows' sparsity."""
    values = np.asarray(rows.data, dtype=np.float32)
    if normalise and target_sum is None:
        values = np.log1p(values)
    elif normalise:
        totals = np.asarray(rows.sum(axis=1), dtype=np.float32).reshape(-1)
        totals = np.where(totals > 0, totals, np.float32(1.0))
        per_entry = np.repeat(totals, np.diff(rows.indptr))
        values = np.log1p(values / per_entry * np.float32(target_sum))
    return sparse.csr_matrix((values, rows.indices, rows.indptr), shape=rows.shape)


def fc_layers_first_linear(layers) -> tuple[nn.Linear, nn.Module] | None:
    """scvi-tools ``FCLayers`` without covariates split into its opening linear layer and
    the rest (``None`` when covariates enter it or it opens otherwise)."""
    if layers.n_cat_list and any(n > 1 for n in layers.n_cat_list):
        return None
    blocks = [[layer for layer in block if layer is not None] for block in layers.fc_layers]
    if not blocks or not isinstance(blocks[0][0], nn.Linear):
        return None
    rest = nn.Sequential(*blocks[0][1:], *(layer for block in blocks[1:] for layer in block))
    return blocks[0][0], rest


def sparse_product(x, weight: Tensor) -> Tensor:
    """``x @ weight.T`` for CSR rows ``x``, through their stored entries only."""
    return torch.sparse.mm(SparseRows(x).tensor(weight.device), weight.T)


class EncoderGeneMask(nn.Module):
    """A per-gene 0/1 buffer ``encoder_genes`` saying which genes the encoder reads.

    Genes some batch did not measure (a smaller panel filled with zeros) would tell a
    batch-invariant encoder the batch; the model sets them to 0 with
    :meth:`set_encoder_genes`. Files saved before the buffer existed read every gene.
    """

    n_input: int

    def register_encoder_genes(self, n_input: int) -> None:
        """Register ``encoder_genes``, every gene read."""
        self.register_buffer("encoder_genes", torch.ones(n_input))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(f"{prefix}encoder_genes", torch.ones(self.n_input))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_encoder_genes(self, read: Tensor) -> None:
        """Let the encoder read only the genes where ``read`` (one boolean per gene) is
        true; the others enter it as zeros."""
        read = torch.as_tensor(read).reshape(-1)
        if read.numel() != self.n_input:
            raise ValueError(
                f"read needs one entry per gene ({self.n_input}), got {read.numel()}."
            )
        self.encoder_genes.copy_(read.to(self.encoder_genes))

    def reads_every_gene(self) -> bool:
        """Whether no gene is masked out of the encoder."""
        return bool(self.encoder_genes.all())


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

    def embed_and_classify(self, tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """:meth:`embed` and :meth:`classify` of a minibatch; a module whose logits are
        computed from its latent overrides it to run the encoder once."""
        return self.embed(tensors), self.classify(tensors)

    @staticmethod
    def expression(tensors: dict[str, Tensor]) -> Tensor:
        """The expression matrix of a minibatch."""
        return tensors[REGISTRY_KEYS.X_KEY]

    #: Why :meth:`interpretation_input` is not available (a module that implements it
    #: sets this to ``None``).
    not_interpretable_reason: str | None = "its module has no differentiable gene input."

    @property
    def interpretable(self) -> bool:
        """Whether :meth:`interpretation_input` and its logits are implemented."""
        return self.not_interpretable_reason is None

    def interpretation_input(self, tensors: dict[str, Tensor]) -> Tensor:
        """The classifier's input, one value per gene, in which genes are attributed."""
        raise ValueError(f"Gene attribution is unavailable: {self.not_interpretable_reason}")

    def logits_from_interpretation_input(self, x: Tensor) -> Tensor:
        """Logits of :meth:`interpretation_input` values; differentiable in ``x``."""
        raise ValueError(f"Gene attribution is unavailable: {self.not_interpretable_reason}")

    def validation_loss(self, tensors: dict[str, Tensor]) -> LossOutput | None:
        """The criterion early stopping follows on a validation minibatch.

        The module's loss with its default keywords; ``None`` when the minibatch has
        nothing to score.
        """
        _, _, loss_output = self.forward(tensors)
        return loss_output

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


class ClassifierModule(CellTyperModule):
    """A module whose scvi-tools forward pass is encoder -> embedding -> classifier.

    Subclasses implement ``_get_inference_input`` and ``inference`` (returning ``z`` and
    ``logits``); the generative step is empty and the loss is the cross-entropy on the
    labelled cells of the minibatch, which is also the validation criterion.
    """

    def _get_generative_input(self, tensors, inference_outputs) -> dict:
        return {}

    def generative(self) -> dict:
        return {}

    def loss(self, tensors, inference_outputs, generative_outputs) -> LossOutput:
        """Cross-entropy on the labelled cells of the minibatch."""
        labels = tensors[REGISTRY_KEYS.LABELS_KEY].view(-1).long()
        labelled = labels < self.n_labels
        loss = labelled_cross_entropy(inference_outputs["logits"], labels, labelled)
        return LossOutput(
            loss=loss, n_obs_minibatch=len(labels), extra_metrics={"classification_loss": loss}
        )

    def validation_loss(self, tensors: dict[str, Tensor]) -> LossOutput | None:
        """Cross-entropy and accuracy of the held-out labelled cells (``None`` if none)."""
        labels = tensors[REGISTRY_KEYS.LABELS_KEY].view(-1).long()
        labelled = labels < self.n_labels
        if not labelled.any():
            return None
        logits = self.classify(tensors)[labelled]
        labels = labels[labelled]
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return LossOutput(
            loss=loss,
            n_obs_minibatch=len(labels),
            extra_metrics={"classification_loss": loss, "accuracy": accuracy},
        )


class LogExpressionClassifier(EncoderGeneMask, ClassifierModule):
    """A classifier on log-normalised expression: ``encoder`` -> embedding -> ``classifier``.

    Subclasses build ``self.encoder`` and ``self.classifier`` (torch modules), set
    ``self.normalize_counts`` and implement :meth:`target_sum`. Raw counts are normalised
    here, minibatch by minibatch, to ``log1p(x / total * target_sum)``. Genes outside
    ``encoder_genes`` (:class:`EncoderGeneMask`) enter the encoder as 0.
    """

    normalize_counts: bool
    encoder: nn.Module
    classifier: nn.Module
    #: Whether :meth:`log_expression` subtracts each cell's batch mean (see
    #: :meth:`init_batch_centering`).
    batch_centering: bool = False

    def __init__(self, n_input: int, n_labels: int, normalize_counts: bool = True):
        super().__init__()
        self.n_input = n_input
        self.n_labels = n_labels
        self.normalize_counts = normalize_counts
        self.register_encoder_genes(n_input)

    def target_sum(self) -> float:
        """Total each cell is scaled to before ``log1p``."""
        raise NotImplementedError("A LogExpressionClassifier must define target_sum().")

    def init_batch_centering(self, n_batch: int, n_input: int) -> None:
        """Centre every input on the mean log-expression of its batch.

        Registers the buffer ``batch_means`` (``n_batch`` x ``n_input``), filled by the
        model with :meth:`set_batch_means`. Centring each batch on its own mean removes a
        shift that a whole batch shares (a stimulation, a protocol) before the encoder
        sees the cell, while the encoder itself keeps no batch input. One row per batch
        category, so scvi-tools' surgery appends the rows of a query's new batches.
        """
        self.batch_centering = True
        self.register_buffer("batch_means", torch.zeros(n_batch, n_input))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A file saved before its model could centre batches holds no means: it never
        # centred, and keeps predicting as it did.
        if self.batch_centering and f"{prefix}batch_means" not in state_dict:
            del self.batch_means
            self.batch_centering = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_batch_means(self, means: Tensor) -> None:
        """Set the per-batch mean log-expression (``n_batch`` x ``n_input``)."""
        self.batch_means.copy_(torch.as_tensor(means, dtype=torch.float32))

    def log_expression(self, tensors: dict[str, Tensor], centre: bool = True) -> Tensor:
        """The model's input: log-normalised counts, or the registered values as they are,
        centred on their batch's mean when batch centring is on (and ``centre``); genes
        outside ``encoder_genes`` are 0.

        ``centre=False`` gives the log-expression before centring, for augmentations that
        need non-negative log1p values; :meth:`centre_batches` then finishes the input.
        """
        x = self.expression(tensors)
        x = log1p_normalize(x, self.target_sum()) if self.normalize_counts else x
        x = x * self.encoder_genes
        if centre and self.batch_centering:
            x = self.centre_batches(x, tensors[REGISTRY_KEYS.BATCH_KEY].long().view(-1))
        return x

    def centre_batches(self, x_log: Tensor, batch_codes: Tensor) -> Tensor:
        """``x_log`` minus the mean of each cell's batch (unchanged without centring);
        genes outside ``encoder_genes`` stay 0."""
        if not self.batch_centering:
            return x_log
        return x_log - self.read_batch_means()[batch_codes]

    def read_batch_means(self) -> Tensor:
        """``batch_means`` with the genes outside ``encoder_genes`` at 0."""
        return self.batch_means * self.encoder_genes

    def embed_log_expression(self, x_log: Tensor) -> Tensor:
        """Embedding of log-normalised profiles."""
        return self.encoder(x_log)

    def logits_from_log_expression(self, x_log: Tensor) -> Tensor:
        """Logits of log-normalised profiles; differentiable (used by interpretation)."""
        return self.classifier(self.encoder(x_log))

    not_interpretable_reason = None

    def interpretation_input(self, tensors: dict[str, Tensor]) -> Tensor:
        return self.log_expression(tensors)

    def logits_from_interpretation_input(self, x: Tensor) -> Tensor:
        return self.logits_from_log_expression(x)

    # -- inference on sparse rows ------------------------------------------------------
    def sparse_input_layer(self) -> tuple[nn.Linear, Callable[[Tensor], Tensor]] | None:
        """The encoder's opening linear layer and the rest of the encoder, when the
        encoder opens with one (``None`` otherwise): at inference, the layer is then
        applied to the stored entries of sparse rows only (:class:`SparseRows`)."""
        return None

    def sparse_input_norm(self) -> nn.LayerNorm | None:
        """A LayerNorm over the genes that the encoder applies before its opening linear
        layer (``None``: none). Sparse inference folds it into that layer: per cell, the
        mean and variance over all genes come from the stored entries alone."""
        return None

    def reads_sparse_rows(self) -> bool:
        """Whether inference may hand this module :class:`SparseRows` expression."""
        return self.sparse_input_layer() is not None

    def _sparse_encode(self, tensors: dict[str, Tensor]) -> Tensor:
        """The encoder's output for :class:`SparseRows` expression: the log-normalised
        stored entries times the opening layer's weights (batch centring subtracts each
        batch mean's product; an opening LayerNorm over genes scales and shifts the
        product per cell), then the rest of the encoder; the dense result to rounding."""
        first, rest = self.sparse_input_layer()
        norm = self.sparse_input_norm()
        weight = first.weight
        if norm is not None and norm.weight is not None:
            weight = weight * norm.weight
        rows = tensors[REGISTRY_KEYS.X_KEY].matrix
        x = sparse_log_values(rows, self.target_sum(), self.normalize_counts)
        if not self.reads_every_gene():
            read = self.encoder_genes.detach().cpu().numpy().astype(np.float32)
            x = sparse.csr_matrix(x.multiply(read[None, :]))
        hidden = sparse_product(x, weight)
        codes = None
        if self.batch_centering:
            codes = tensors[REGISTRY_KEYS.BATCH_KEY].long().view(-1).to(weight.device)
            hidden = hidden - (self.read_batch_means() @ weight.T)[codes]
        if norm is not None:
            mean, scale = self._gene_moments(x, codes, norm.eps, hidden.device)
            hidden = (hidden - mean.unsqueeze(1) * weight.sum(dim=1)) * scale.unsqueeze(1)
            if norm.bias is not None:
                hidden = hidden + norm.bias @ first.weight.T
        if first.bias is not None:
            hidden = hidden + first.bias
        return rest(hidden)

    def _gene_moments(
        self, x: sparse.csr_matrix, codes: Tensor | None, eps: float, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """Each cell's mean over all genes (zeros included) and 1 / sqrt(variance + eps),
        after batch centring when ``codes`` are given, from the stored entries alone."""
        n_genes = x.shape[1]
        x = x.astype(np.float64)
        total = torch.from_numpy(np.asarray(x.sum(axis=1)).reshape(-1))
        squares = torch.from_numpy(np.asarray(x.multiply(x).sum(axis=1)).reshape(-1))
        if codes is not None:
            means = self.read_batch_means().detach().double().cpu()
            cross = torch.from_numpy(np.asarray(x @ means.numpy().T))
            rows = torch.arange(len(cross))
            codes = codes.cpu()
            total = total - means.sum(dim=1)[codes]
            squares = squares - 2 * cross[rows, codes] + (means * means).sum(dim=1)[codes]
        mean = total / n_genes
        variance = (squares / n_genes - mean * mean).clamp_min(0.0)
        scale = torch.rsqrt(variance + eps)
        return mean.float().to(device), scale.float().to(device)

    def _encode(self, tensors: dict[str, Tensor]) -> Tensor:
        if isinstance(tensors.get(REGISTRY_KEYS.X_KEY), SparseRows):
            return self._sparse_encode(tensors)
        return self.encoder(self.log_expression(tensors))

    @auto_move_data
    def embed(self, tensors: dict[str, Tensor]) -> Tensor:
        return self._encode(tensors)

    @auto_move_data
    def classify(self, tensors: dict[str, Tensor]) -> Tensor:
        return self.classifier(self._encode(tensors))

    @auto_move_data
    def embed_and_classify(self, tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        z = self._encode(tensors)
        return z, self.classifier(z)

    # -- BaseModuleClass interface --------------------------------------------------------
    def _get_inference_input(self, tensors: dict[str, Tensor], **kwargs) -> dict[str, Tensor]:
        return {"x_log": self.log_expression(tensors)}

    @auto_move_data
    def inference(self, x_log: Tensor) -> dict[str, Tensor]:
        z = self.encoder(x_log)
        return {"z": z, "logits": self.classifier(z)}
