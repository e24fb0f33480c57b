"""RANKFORMER's torch module: a transformer over rank-value encoded genes."""

from __future__ import annotations

import inspect
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module.base import LossOutput, auto_move_data
from torch import Tensor, nn

from celltyper.data import (
    MASK_TOKEN,
    N_SPECIAL_TOKENS,
    PAD_TOKEN,
    RankTokens,
    paired_rank_value_tokenize,
    rank_value_tokenize,
)
from celltyper.nn import TransformerEncoder

from ._base import ClassifierModule

#: Registry key of the context profiles (previous time point) of a paired model.
CONTEXT_KEY = "context"
#: Key of tokens computed ahead of the module (a whole chunk of cells at inference);
#: :meth:`RANKFORMERModule.tokenize` then uses them instead of tokenising the counts.
TOKENS_KEY = "rank_tokens"


class RANKFORMERModule(ClassifierModule):
    """Gene (+ value) embedding -> pre-LN transformer -> CLS -> MLP head.

    Raw counts come in; each minibatch is tokenised here (rank-value encoding with the
    reference's per-gene medians, stored as the buffer ``gene_medians`` so that saved
    models and query models reuse them). :meth:`loss` is the method's whole objective:
    cell-type cross-entropy and masked-gene prediction, both read from one encoder pass
    over the masked tokens (:meth:`forward` passes the loss's masking to
    :meth:`inference`).

    With ``n_tokens_context > 0`` the module is paired: each minibatch also carries the
    context profile of every cell (``tensors[CONTEXT_KEY]``, e.g. the previous time
    point), tokenised as CLS, the current genes, SEP, the context genes
    (:func:`~celltyper.data.paired_rank_value_tokenize`). A segment embedding is added
    to every position so attention tells "gene X high now" from "gene X high before";
    the SEP token takes the id after the last gene, so gene ids are those of the base
    mode.

    Parameters
    ----------
    n_input
        Number of genes (the vocabulary is these genes plus ``N_SPECIAL_TOKENS``).
    n_labels
        Number of reference cell types.
    gene_medians
        ``(n_input,)`` positive per-gene scale (median of non-zero normalised values in
        the reference); ``None`` starts from ones (a state dict then brings the values).
    n_tokens
        Most genes a cell contributes (top by scaled expression); in the paired mode,
        most genes of the current profile.
    n_tokens_context
        Most genes of the context profile; 0 (the default) is the base mode: no context,
        no SEP token, no segment embedding.
    n_bins
        Value bins of the scGPT-style value embedding; 0 leaves it out.
    d_model, n_layers, n_heads, d_ff
        Transformer sizes.
    dropout
        Dropout of the transformer and the head.
    head_hidden
        Hidden width of the classification head (Linear -> BatchNorm -> GELU -> Linear).
    """

    def __init__(
        self,
        n_input: int,
        n_labels: int,
        gene_medians: np.ndarray | None = None,
        n_tokens: int = 128,
        n_bins: int = 10,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        d_ff: int = 128,
        dropout: float = 0.1,
        head_hidden: int = 128,
        n_tokens_context: int = 0,
    ):
        super().__init__()
        if n_tokens < 1:
            raise ValueError(f"n_tokens must be >= 1, got {n_tokens}.")
        if n_tokens_context < 0:
            raise ValueError(f"n_tokens_context must be >= 0, got {n_tokens_context}.")
        if n_bins < 0:
            raise ValueError(f"n_bins must be >= 0, got {n_bins}.")
        self.n_input = n_input
        self.n_labels = n_labels
        self.n_tokens = n_tokens
        self.n_tokens_context = n_tokens_context
        self.n_bins = n_bins
        self.d_model = d_model
        medians = np.ones(n_input) if gene_medians is None else np.asarray(gene_medians)
        if medians.shape != (n_input,) or not np.all(medians > 0):
            raise ValueError(f"gene_medians must be {n_input} positive values.")
        self.register_buffer("gene_medians", torch.as_tensor(medians, dtype=torch.float32))
        # A paired vocabulary gains SEP after the genes; the base one is left as it was.
        self.gene_embedding = nn.Embedding(
            n_input + N_SPECIAL_TOKENS + int(self.paired), d_model, padding_idx=PAD_TOKEN
        )
        self.segment_embedding = nn.Embedding(2, d_model) if self.paired else None
        self.value_embedding = (
            nn.Embedding(n_bins + 1, d_model, padding_idx=0) if n_bins > 0 else None
        )
        # Small embeddings (BERT's 0.02) start attention near uniform, so the CLS token
        # begins as an average of its cell's genes and the classifier learns from the
        # first steps; unit-variance embeddings left it at chance for many epochs.
        nn.init.normal_(self.gene_embedding.weight, std=0.02)
        self.gene_embedding.weight.data[PAD_TOKEN] = 0.0
        if self.value_embedding is not None:
            nn.init.normal_(self.value_embedding.weight, std=0.02)
            self.value_embedding.weight.data[0] = 0.0
        if self.segment_embedding is not None:
            nn.init.normal_(self.segment_embedding.weight, std=0.02)
        self.encoder = TransformerEncoder(n_layers, d_model, n_heads, d_ff, dropout)
        self.classifier = nn.Sequential(
            nn.Linear(d_model, head_hidden),
            nn.BatchNorm1d(head_hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(head_hidden, n_labels),
        )
        # Masked-gene head (BERT-style transform, output tied to the gene embedding).
        self.mlm_transform = nn.Sequential(
            nn.Linear(d_model, d_model), nn.GELU(), nn.LayerNorm(d_model)
        )
        self.mlm_bias = nn.Parameter(torch.zeros(n_input))

    # -- tokens and encoder -------------------------------------------------------------
    @property
    def paired(self) -> bool:
        """Whether the module reads a context profile beside each cell's own."""
        return self.n_tokens_context > 0

    def tokenize(self, tensors: dict[str, Tensor]) -> RankTokens:
        """Rank-value tokens of the minibatch's counts (paired with the context's), or
        the tokens it carries already under :data:`TOKENS_KEY`."""
        if TOKENS_KEY in tensors:
            return tensors[TOKENS_KEY].to(self.gene_medians.device)
        if not self.paired:
            return rank_value_tokenize(
                self.expression(tensors), self.gene_medians, self.n_tokens, self.n_bins
            )
        if CONTEXT_KEY not in tensors:
            raise KeyError(
                f"A paired RANKFORMER module needs the context profiles in "
                f"tensors[{CONTEXT_KEY!r}]; the minibatch has {sorted(tensors)}."
            )
        return paired_rank_value_tokenize(
            self.expression(tensors),
            tensors[CONTEXT_KEY],
            self.gene_medians,
            self.n_tokens,
            self.n_tokens_context,
            self.n_bins,
        )

    def encode(self, tokens: RankTokens) -> Tensor:
        """Hidden states ``(n_cells, length, d_model)`` of tokenised cells (float32)."""
        x = self._token_embeddings(tokens)
        # bf16 on a GPU (flash / memory-efficient attention); float32 on a CPU.
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if x.is_cuda else nullcontext()
        with autocast:
            hidden = self.encoder(x, tokens.padding_mask)
        return hidden.float()

    def _token_embeddings(self, tokens: RankTokens) -> Tensor:
        """The encoder's input: gene (+ value bin, + segment) embeddings of the tokens."""
        x = self.gene_embedding(tokens.tokens)
        if self.value_embedding is not None and tokens.bins is not None:
            x = x + self.value_embedding(tokens.bins)
        if self.paired != (tokens.segments is not None):
            mode = "paired" if self.paired else "base-mode"
            given = "no segments" if tokens.segments is None else "segments"
            raise ValueError(f"A {mode} module got tokens with {given}.")
        if self.segment_embedding is not None:
            x = x + self.segment_embedding(tokens.segments)
        return x

    def cls_embedding(self, tokens: RankTokens) -> Tensor:
        """The CLS token's final hidden state, the cell's latent representation.

        Out of training, the last layer computes the CLS position only (the others'
        outputs are never read): the same values to rounding, in less time.
        """
        if self.training:
            return self.encode(tokens)[:, 0]
        x = self._token_embeddings(tokens)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if x.is_cuda else nullcontext()
        with autocast:
            hidden = self.encoder.forward_first(x, tokens.padding_mask)
        return hidden.float()

    def _gene_positions(self, tokens: RankTokens) -> Tensor:
        """Positions of gene tokens attention reads (never CLS, SEP or padding)."""
        ids = tokens.tokens
        # SEP, in a paired vocabulary, has the id after the genes.
        genes = (ids >= N_SPECIAL_TOKENS) & (ids < N_SPECIAL_TOKENS + self.n_input)
        return genes & ~tokens.padding_mask

    def drop_tokens(self, tokens: RankTokens, rate: float) -> RankTokens:
        """Hide a random ``rate`` of each cell's gene tokens from attention.

        The dropped genes join the padding: the cell is seen without them, so the
        classifier cannot lean on a few markers that another condition, technology or
        species may not rank as high.
        """
        genes = self._gene_positions(tokens)
        dropped = genes & (torch.rand(genes.shape, device=genes.device) < rate)
        return RankTokens(
            tokens.tokens, tokens.padding_mask | dropped, tokens.bins, tokens.segments
        )

    def mask_tokens(self, tokens: RankTokens, mask_prob: float) -> tuple[RankTokens, Tensor]:
        """Replace a random ``mask_prob`` of each cell's gene tokens by ``MASK_TOKEN``.

        Returns the masked tokens and the boolean positions masked (never CLS or padding).
        The value bins stay, so the task reads "which gene sits at this level here?".
        """
        ids = tokens.tokens
        candidates = self._gene_positions(tokens)
        masked = candidates & (torch.rand(ids.shape, device=candidates.device) < mask_prob)
        masked_ids = torch.where(masked, MASK_TOKEN, ids)
        return RankTokens(masked_ids, tokens.padding_mask, tokens.bins, tokens.segments), masked

    def masked_gene_logits(self, hidden: Tensor) -> Tensor:
        """Logits over genes of hidden states ``(..., d_model) -> (..., n_input)``."""
        genes = self.gene_embedding.weight[N_SPECIAL_TOKENS : N_SPECIAL_TOKENS + self.n_input]
        return self.mlm_transform(hidden) @ genes.T + self.mlm_bias

    def masked_gene_loss(
        self, hidden: Tensor, targets: Tensor, masked: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Cross-entropy and accuracy of the gene identity at the masked positions."""
        if not masked.any():
            zero = hidden.sum() * 0.0
            return zero, zero.detach()
        logits = self.masked_gene_logits(hidden[masked])
        target = targets[masked] - N_SPECIAL_TOKENS
        loss = F.cross_entropy(logits, target)
        accuracy = (logits.argmax(dim=1) == target).float().mean()
        return loss, accuracy.detach()

    # -- CellTyperModule interface ------------------------------------------------------
    #: Attribution needs a gradient with respect to each gene's input value.
    not_interpretable_reason = (
        "RANKFORMER reads the rank order of genes, not their values: gradients with "
        "respect to expression are undefined."
    )

    @auto_move_data
    def embed(self, tensors: dict[str, Tensor]) -> Tensor:
        return self.cls_embedding(self.tokenize(tensors))

    @auto_move_data
    def classify(self, tensors: dict[str, Tensor]) -> Tensor:
        return self.classifier(self.embed(tensors))

    @auto_move_data
    def embed_and_classify(self, tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        z = self.embed(tensors)
        return z, self.classifier(z)

    # -- BaseModuleClass interface --------------------------------------------------------
    def forward(
        self,
        tensors: dict[str, Tensor],
        get_inference_input_kwargs: dict | None = None,
        get_generative_input_kwargs: dict | None = None,
        inference_kwargs: dict | None = None,
        generative_kwargs: dict | None = None,
        loss_kwargs: dict | None = None,
        compute_loss: bool = True,
    ):
        """scvi-tools' forward pass, with the masking of ``loss_kwargs`` done in inference.

        The masked-gene term corrupts the encoder's input, so the share of tokens the
        loss masks (``mask_prob`` when ``mlm_weight > 0``) is passed to :meth:`inference`:
        one encoder pass over the masked tokens serves both terms of the loss.
        """
        inference_kwargs = {**self.loss_corruption(loss_kwargs or {}), **(inference_kwargs or {})}
        return super().forward(
            tensors,
            get_inference_input_kwargs=get_inference_input_kwargs,
            get_generative_input_kwargs=get_generative_input_kwargs,
            inference_kwargs=inference_kwargs,
            generative_kwargs=generative_kwargs,
            loss_kwargs=loss_kwargs,
            compute_loss=compute_loss,
        )

    def loss_corruption(self, loss_kwargs: dict) -> dict[str, float]:
        """How :meth:`loss` with ``loss_kwargs`` (its defaults completing them) corrupts
        the encoder's input: ``mask_prob``, the share of gene tokens masked (``mask_prob``,
        or 0 without the masked-gene term), and ``token_dropout``, the share hidden (0
        out of training)."""
        bound = inspect.signature(self.loss).bind_partial(None, None, None, **loss_kwargs)
        bound.apply_defaults()
        settings = bound.arguments
        return {
            "mask_prob": float(settings["mask_prob"]) if settings["mlm_weight"] > 0 else 0.0,
            "token_dropout": float(settings["token_dropout"]) if self.training else 0.0,
        }

    def _get_inference_input(self, tensors: dict[str, Tensor], **kwargs) -> dict:
        return {"tokens": self.tokenize(tensors)}

    @auto_move_data
    def inference(
        self, tokens: RankTokens, mask_prob: float = 0.0, token_dropout: float = 0.0
    ) -> dict:
        """Encode the cells, a random ``token_dropout`` of their gene tokens hidden and a
        random ``mask_prob`` of the others masked first.

        Returns the hidden states, the CLS embedding ``z``, the unmasked ``tokens``, the
        positions ``masked`` and the ``mask_prob`` and ``token_dropout`` used.
        """
        inputs, masked = tokens, torch.zeros_like(tokens.padding_mask)
        if token_dropout > 0:
            inputs = self.drop_tokens(inputs, token_dropout)
        if mask_prob > 0:
            inputs, masked = self.mask_tokens(inputs, mask_prob)
        hidden = self.encode(inputs)
        return {
            "z": hidden[:, 0],
            "hidden": hidden,
            "tokens": tokens,
            "masked": masked,
            "mask_prob": mask_prob,
            "token_dropout": token_dropout,
        }

    def loss(
        self,
        tensors: dict[str, Tensor],
        inference_outputs: dict,
        generative_outputs: dict,
        classification_weight: float = 1.0,
        mlm_weight: float = 0.0,
        mask_prob: float = 0.15,
        label_smoothing: float = 0.1,
        class_weights: Tensor | None = None,
        token_dropout: float = 0.0,
    ) -> LossOutput:
        """Cell-type cross-entropy on the labelled cells plus masked-gene prediction.

        The loss is ``classification_weight`` x the cross-entropy of the CLS head on the
        labelled cells of the minibatch plus ``mlm_weight`` x the cross-entropy of the
        identity of the masked gene tokens, on every cell (labelled or not: unlabelled
        query cells teach the encoder their genes' context). Both read the same encoder
        pass over the masked tokens, so the masking doubles as an augmentation of the
        classifier's input. Every cell passes through the head (its BatchNorm statistics
        see query cells too), unless ``classification_weight`` is 0 (pretraining).

        Parameters
        ----------
        tensors, inference_outputs, generative_outputs
            As in scvi-tools; ``inference_outputs`` from :meth:`inference` (re-encoded here
            when they were not masked with this ``mask_prob``).
        classification_weight
            Weight of the cell-type cross-entropy; 0 is masked-gene pretraining.
        mlm_weight
            Weight of the masked-gene loss; 0 masks nothing.
        mask_prob
            Share of each cell's gene tokens masked.
        label_smoothing
            Label smoothing of the cell-type cross-entropy.
        class_weights
            Cross-entropy weight per cell-type code (``None``: all 1).
        token_dropout
            Share of each cell's gene tokens hidden from attention in training (an
            augmentation; :meth:`drop_tokens`).

        Returns
        -------
        ``LossOutput`` whose ``extra_metrics`` hold the weighted terms
        (``classification_loss``, ``masked_gene_loss``, adding up to the loss) and
        ``masked_gene_accuracy``.
        """
        for name, value in (("mask_prob", mask_prob), ("token_dropout", token_dropout)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}.")
        if classification_weight <= 0 and (mlm_weight <= 0 or mask_prob <= 0):
            raise ValueError(
                "Nothing to learn: classification_weight, or mlm_weight and mask_prob, must "
                f"be > 0 (got {classification_weight}, {mlm_weight}, {mask_prob})."
            )
        outputs = inference_outputs
        expected = self.loss_corruption(
            {"mlm_weight": mlm_weight, "mask_prob": mask_prob, "token_dropout": token_dropout}
        )
        if any(outputs.get(name) != value for name, value in expected.items()):
            outputs = self.inference(outputs["tokens"], **expected)
        hidden = outputs["hidden"]
        masked_gene, accuracy = self.masked_gene_loss(
            hidden, outputs["tokens"].tokens, outputs["masked"]
        )
        labels = tensors[REGISTRY_KEYS.LABELS_KEY].view(-1).long()
        labelled = labels < self.n_labels
        classification = hidden.sum() * 0.0
        if classification_weight > 0:
            logits = self.classifier(outputs["z"])
            if labelled.any():
                classification = F.cross_entropy(
                    logits[labelled],
                    labels[labelled],
                    weight=None if class_weights is None else class_weights.to(logits.device),
                    label_smoothing=label_smoothing,
                )
        terms = {
            "classification_loss": classification_weight * classification,
            "masked_gene_loss": mlm_weight * masked_gene,
        }
        return LossOutput(
            loss=sum(terms.values()),
            n_obs_minibatch=len(labels),
            extra_metrics={**terms, "masked_gene_accuracy": accuracy},
        )
