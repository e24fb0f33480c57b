"""RANKFORMER: a transformer cell-type classifier over rank-value encoded genes."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from anndata import AnnData
from mudata import MuData
from scvi import REGISTRY_KEYS

from celltyper.data import (
    LabelledUnlabelledSplitter,
    RankTokens,
    nonzero_gene_medians,
    tokenize_matrix,
)
from celltyper.module import RANKFORMERModule
from celltyper.train import RankformerTrainingPlan

from .base import CellTyperModel, seeded

logger = logging.getLogger(__name__)

#: Transformer sizes of the presets (``RANKFORMER(adata, preset=...)``).
RANKFORMER_PRESETS: dict[str, dict[str, Any]] = {
    "small": {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128, "head_hidden": 64},
    "base": {"d_model": 256, "n_layers": 4, "n_heads": 8, "d_ff": 1024, "head_hidden": 256},
}


class RANKFORMER(CellTyperModel):
    """Transformer classifier over rank-value encoded genes (Geneformer / scGPT style).

    Each cell becomes the list of its ``n_tokens`` most expressed genes after
    ``normalize_total`` and division of every gene by its median non-zero value in the
    reference, so genes rank by how high they are *for them*; a CLS token opens the list,
    cells with fewer expressed genes are padded (the padding is masked out of attention)
    and genes with zero counts never become tokens. Optionally each gene token also gets
    an embedding of its per-cell expression bin (scGPT). A pre-LayerNorm transformer
    without positional encoding reads the tokens, and the CLS output (the latent
    representation) feeds an MLP head. Tokenisation happens inside the module, minibatch
    by minibatch, from raw counts; the per-gene medians are a buffer of the module, saved
    with it and reused for every query.

    Parameters
    ----------
    adata
        AnnData or MuData of raw counts registered with :meth:`setup_anndata` /
        :meth:`setup_mudata`.
    preset
        ``"small"`` (CPU-friendly; d_model 64, 2 layers, 4 heads) or ``"base"`` (d_model
        256, 4 layers, 8 heads); see :data:`RANKFORMER_PRESETS`.
    n_tokens
        Most genes per cell (Geneformer uses 2,048; 128 keeps CPU training affordable and
        covers every expressed gene of most cells on 2,000 highly variable genes).
    n_bins
        Per-cell expression bins of the value embedding; 0 leaves it out.
    d_model, n_layers, n_heads, d_ff, head_hidden
        Override the preset's sizes.
    dropout
        Dropout of the transformer and the head.
    median_cells
        Cells whose non-zero values give each gene's median: ``"labelled"`` (the labelled
        reference cells) or ``"all"`` (every registered cell, the unlabelled ones
        included, as Geneformer computes them over its whole corpus).
    seed
        Seed of the weight initialisation (and the default seed of :meth:`train`).

    Examples
    --------
    >>> import celltyper
    >>> adata = celltyper.datasets.kang_pbmc()
    >>> adata.obs["train_label"] = adata.obs["cell_type"].astype(str)
    >>> adata.obs.loc[adata.obs["split"] == "query", "train_label"] = "Unknown"
    >>> celltyper.model.RANKFORMER.setup_anndata(
    ...     adata, labels_key="train_label", batch_key="condition"
    ... )
    >>> model = celltyper.model.RANKFORMER(adata)
    >>> model.pretrain(max_epochs=5)  # optional: masked-gene pretraining on every cell
    >>> model.train()
    >>> model.annotate()  # obs["rankformer"], ..., obsm["X_rankformer"] (CLS embedding)
    """

    _module_cls = RANKFORMERModule
    _training_plan_cls = RankformerTrainingPlan
    _data_splitter_cls = LabelledUnlabelledSplitter
    _input_kind = "counts"
    _requires_labels = True

    presets = RANKFORMER_PRESETS

    def __init__(
        self,
        adata: AnnData | MuData,
        preset: Literal["small", "base"] = "small",
        n_tokens: int = 128,
        n_bins: int = 10,
        d_model: int | None = None,
        n_layers: int | None = None,
        n_heads: int | None = None,
        d_ff: int | None = None,
        head_hidden: int | None = None,
        dropout: float = 0.1,
        median_cells: Literal["labelled", "all"] = "labelled",
        seed: int = 0,
    ):
        super().__init__(adata)
        self._init_data_checks()
        if median_cells not in ("labelled", "all"):
            raise ValueError(f"median_cells must be 'labelled' or 'all', got {median_cells!r}.")
        if preset not in self.presets:
            raise ValueError(f"preset must be one of {list(self.presets)}, got {preset!r}.")
        overrides = {
            "d_model": d_model,
            "n_layers": n_layers,
            "n_heads": n_heads,
            "d_ff": d_ff,
            "head_hidden": head_hidden,
        }
        sizes = {**self.presets[preset], **{k: v for k, v in overrides.items() if v is not None}}
        with seeded(seed):
            self.module = self._module_cls(
                n_input=self.summary_stats.n_vars,
                n_labels=self.n_labels,
                gene_medians=self._reference_gene_medians(median_cells),
                n_tokens=n_tokens,
                n_bins=n_bins,
                dropout=dropout,
                **sizes,
            )
        n_parameters = sum(p.numel() for p in self.module.parameters())
        self._model_summary_string = (
            f"RANKFORMER ({preset}): {sizes['n_layers']} layers of d_model {sizes['d_model']} "
            f"with {sizes['n_heads']} heads, top {n_tokens} genes per cell, "
            f"{n_bins or 'no'} value bins, {self.n_labels} cell types, "
            f"{n_parameters:,} parameters"
        )
        self.init_params_ = self._get_init_params(locals())

    def _reference_gene_medians(self, median_cells: str) -> np.ndarray:
        """Per-gene median of non-zero normalised counts of the registered cells.

        ``median_cells="labelled"`` uses the labelled reference cells; ``"all"`` every
        registered cell. A model built on data without labelled cells (a query model,
        whose medians are then replaced by the reference's) uses every cell.
        """
        matrix = self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        labelled = np.flatnonzero(self._label_codes() < self.n_labels)
        if median_cells == "all" or len(labelled) == 0:
            return nonzero_gene_medians(matrix)
        return nonzero_gene_medians(matrix[labelled])

    # -- training -------------------------------------------------------------------------
    def _splitter(self, validation_size, batch_size, seed, include_unlabelled, balance_classes):
        return self._make_splitter(
            validation_size,
            batch_size,
            seed,
            balance_classes=balance_classes,
            include_unlabelled=include_unlabelled,
        )

    def train(
        self,
        max_epochs: int = 30,
        *,
        batch_size: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_fraction: float = 0.1,
        mlm_weight: float | None = None,
        mask_prob: float = 0.15,
        balance_classes: bool = True,
        label_smoothing: float = 0.1,
        validation_size: float = 0.1,
        early_stopping: bool = True,
        early_stopping_patience: int = 10,
        min_epochs: int | None = None,
        restore_best_weights: bool = True,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        seed: int | None = None,
        **trainer_kwargs,
    ) -> None:
        """Fine-tune the classifier (and the encoder) on the labelled cells.

        Each step adds ``mlm_weight`` x the masked-gene loss on every cell of the
        minibatch, unlabelled ones included, to the cell-type cross-entropy (see
        :class:`~celltyper.train.RankformerTrainingPlan`). A model from
        :meth:`load_query_data` trains only what its surgery rule leaves trainable
        (LayerNorm and BatchNorm parameters) on the query's cells.

        Parameters
        ----------
        max_epochs
            Epochs; an epoch is a pass over the larger of the (class-balanced) labelled
            and the unlabelled training cells.
        batch_size
            Cells per minibatch of each of the two sets.
        lr, weight_decay
            AdamW settings; the learning rate warms up over ``warmup_fraction`` of the
            steps, then decays along a cosine.
        warmup_fraction
            Share of the steps spent warming up.
        mlm_weight
            Weight of the masked-gene loss; 0 is plain supervised training on the labelled
            cells (unlabelled cells unused). ``None``: 0 for a reference model, 0.5 for a
            query model, whose LayerNorms then adapt to the query's cells without labels.
        mask_prob
            Share of gene tokens masked per cell.
        balance_classes
            Oversample labelled cells so every cell type is as frequent as the largest.
        label_smoothing
            Label smoothing of the cross-entropy.
        validation_size
            Fraction of each labelled cell type held out for early stopping and the novelty
            calibration.
        early_stopping, early_stopping_patience, min_epochs, restore_best_weights
            Stop when the validation cross-entropy has not improved for the patience, and
            end with the best epoch's weights.
        accelerator, devices
            As in scvi-tools (bf16 autocast is used on a GPU).
        seed
            Seed of the split, minibatches and masking; defaults to the model's ``seed``.
        **trainer_kwargs
            Keywords of the Lightning trainer.
        """
        seed = self._resolve_seed(seed)
        if mlm_weight is None:
            mlm_weight = 0.5 if self._is_query_model else 0.0
        include_unlabelled = mlm_weight > 0 or self._is_query_model
        splitter = self._splitter(
            validation_size, batch_size, seed, include_unlabelled, balance_classes
        )
        plan = self._training_plan_cls(
            self.module,
            classification_weight=1.0,
            mlm_weight=mlm_weight,
            mask_prob=mask_prob,
            label_smoothing=label_smoothing,
            warmup_fraction=warmup_fraction,
            lr=lr,
            weight_decay=weight_decay,
        )
        self._start_fresh_history()
        self._run_training(
            plan,
            splitter,
            max_epochs,
            accelerator=accelerator,
            devices=devices,
            early_stopping=early_stopping,
            early_stopping_patience=early_stopping_patience,
            min_epochs=min_epochs,
            restore_best_weights=restore_best_weights,
            seed=seed,
            **trainer_kwargs,
        )

    def pretrain(
        self,
        max_epochs: int = 10,
        *,
        batch_size: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_fraction: float = 0.1,
        mask_prob: float = 0.15,
        validation_size: float = 0.1,
        early_stopping: bool = True,
        early_stopping_patience: int = 5,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        seed: int | None = None,
        **trainer_kwargs,
    ) -> None:
        """Masked-gene pretraining on every training cell, labelled or not.

        A random ``mask_prob`` of each cell's gene tokens is replaced by a mask token and
        the encoder learns to tell which gene was there (Geneformer's objective). The
        held-out labelled cells (the same split as :meth:`train` with the same seed)
        give the validation loss. Call :meth:`train` afterwards to fit the classifier;
        the curves of this stage are kept in ``pretrain_history_``.

        Parameters
        ----------
        max_epochs
            Epochs over the training cells.
        batch_size, lr, weight_decay, warmup_fraction, mask_prob, validation_size
            As in :meth:`train`.
        early_stopping, early_stopping_patience
            Stop when the validation masked-gene loss stops improving.
        accelerator, devices, seed, **trainer_kwargs
            As in :meth:`train`.
        """
        if mask_prob <= 0:
            raise ValueError(f"mask_prob must be > 0 for pretraining, got {mask_prob}.")
        seed = self._resolve_seed(seed)
        splitter = self._splitter(validation_size, batch_size, seed, True, False)
        plan = self._training_plan_cls(
            self.module,
            classification_weight=0.0,
            mlm_weight=1.0,
            mask_prob=mask_prob,
            warmup_fraction=warmup_fraction,
            lr=lr,
            weight_decay=weight_decay,
        )
        self._start_fresh_history()
        self._run_training(
            plan,
            splitter,
            max_epochs,
            accelerator=accelerator,
            devices=devices,
            early_stopping=early_stopping,
            early_stopping_patience=early_stopping_patience,
            seed=seed,
            calibrate=False,
            **trainer_kwargs,
        )
        self.pretrain_history_ = self.history_
        # The encoder moved but the head did not follow: the classifier needs train().
        self.is_trained_ = False

    # -- tokens -----------------------------------------------------------------------------
    def tokenize(
        self,
        adata: AnnData | MuData | None = None,
        indices: Sequence[int] | None = None,
        progress: bool = False,
    ) -> RankTokens:
        """The rank-value tokens the model reads for each cell.

        Parameters
        ----------
        adata
            Data to tokenise (genes aligned to the model's); ``None`` uses the model's data.
        indices
            Positions of the cells; ``None`` tokenises all.
        progress
            Show a progress bar.

        Returns
        -------
        :class:`~celltyper.data.RankTokens`: token ids, padding mask and value bins. A
        gene's id is ``N_SPECIAL_TOKENS + i``, ``i`` its position in
        ``model.registration.genes``.
        """
        module: RANKFORMERModule = self.module
        with self._model_data(adata) as data:
            matrix = self.get_from_registry(data, REGISTRY_KEYS.X_KEY)
            if indices is not None:
                matrix = matrix[np.asarray(indices)]
            return tokenize_matrix(
                matrix,
                module.gene_medians.detach().cpu(),
                module.n_tokens,
                module.n_bins,
                progress=progress,
            )

    @property
    def n_parameters(self) -> int:
        """Number of parameters of the module."""
        return int(sum(p.numel() for p in self.module.parameters()))


__all__ = ["RANKFORMER", "RANKFORMER_PRESETS"]
