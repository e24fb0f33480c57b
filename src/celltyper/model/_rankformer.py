"""RANKFORMER: a transformer cell-type classifier over rank-value encoded genes."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from mudata import MuData
from scipy import sparse
from scvi import REGISTRY_KEYS

from celltyper._utils import dense_tensors
from celltyper.data import (
    LabelledUnlabelledSplitter,
    RankTokens,
    nonzero_gene_medians,
    tokenize_matrix,
    tokenize_paired_matrices,
)
from celltyper.module import CONTEXT_KEY, TOKENS_KEY, RANKFORMERModule
from celltyper.train import RankformerPretrainingPlan, RankformerTrainingPlan

from ._context import (
    ContextSetup,
    MissingContext,
    context_field,
    context_profiles,
    report_missing_context,
)
from .base import CellTyperModel, FieldFactory, TrainingStage, seeded

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

    **Paired mode.** Set up with ``context_layer`` or ``context_key``
    (:meth:`setup_anndata`), each cell is read with a context profile, e.g. its lineage
    at the previous time point: CLS, the top ``n_tokens_current`` genes of the cell, a
    SEP token, then the top ``n_tokens_context`` genes of the context, both halves ranked
    with the same reference medians. A segment embedding marks each half, so the CLS
    embedding sees how the cell's state changed, not only where it is.

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
    n_tokens_current, n_tokens_context
        Paired mode only: most genes of the cell's own profile and of its context
        profile; each defaults to half of ``n_tokens`` (the context taking the odd one).
        A model set up without a context rejects them.

    Notes
    -----
    :meth:`train` (shared by every model) runs up to two stages, each with AdamW (lr
    1e-3, weight decay 0.01) whose learning rate warms up over the first 10 % of the
    steps (``warmup_fraction``) and then decays along a cosine, and minibatches of 128
    cells from each of the labelled and (when used) unlabelled sets; 10 % of each
    labelled type is held out.

    - ``"pretrain"`` (only with the option ``pretrain_epochs > 0``, default 0, or through
      :meth:`pretrain`): the masked-gene loss alone on every training cell, labelled or
      not, validated on the masked-gene loss of the held-out cells (patience 5; 10
      epochs in :meth:`pretrain`); its curves are kept in ``pretrain_history_``. The
      model is not trained after it: ``is_trained_`` stays False until the next stage.
    - ``"train"``: up to 60 epochs (early stopping after 10 without improvement of the
      held-out labelled cells' cross-entropy, best weights restored) of the cell-type
      cross-entropy (label smoothing 0.1) on labelled cells oversampled so every type is
      as frequent as the largest, plus ``mlm_weight`` x the masked-gene loss (15 % of
      the gene tokens masked) on every cell of the minibatch. An epoch stops after as
      many cells as there are labelled training cells (a new random part of the
      oversampled set each time), so its cost does not grow with the number of types.
      The option ``mlm_weight`` is ``None`` by default: 0 for a reference model, whose
      epochs then read only the labelled cells, and 0.5 for a query model from
      :meth:`load_query_data`, whose LayerNorms adapt to the query's cells without
      labels; unlabelled cells join the minibatches when it is above 0 or for a query
      model.

    Hyperparameters, by name or in ``plan_kwargs``: those of
    :class:`~celltyper.train.RankformerTrainingPlan` (``warmup_fraction``, optimizer)
    and of :meth:`~celltyper.module.RANKFORMERModule.loss` (``mask_prob``,
    ``label_smoothing``, ``class_weights``, ``token_dropout``); splitter settings
    (``balance_classes``) by name or in ``datasplitter_kwargs``. The stages set the loss
    weights themselves (``classification_weight``, ``mlm_weight``). Gene attribution
    (:meth:`interpret`) is unavailable: the model reads the rank order of genes, not
    their values.

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
    >>> model.train(pretrain_epochs=5)  # optional masked-gene pretraining stage first
    >>> model.annotate()  # obs["rankformer"], ..., obsm["X_rankformer"] (CLS embedding)
    """

    _module_cls = RANKFORMERModule
    _training_plan_cls = RankformerTrainingPlan
    _data_splitter_cls = LabelledUnlabelledSplitter
    _input_kind = "counts"
    _requires_labels = True

    _train_options = {"pretrain_epochs": 0, "mlm_weight": None}
    #: Whether :meth:`train` runs the pretraining stage alone (set by :meth:`pretrain`).
    _pretraining_only = False

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
        n_tokens_current: int | None = None,
        n_tokens_context: int | None = None,
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
        n_current, n_context = self._token_budget(n_tokens, n_tokens_current, n_tokens_context)
        with seeded(seed):
            self.module = self._module_cls(
                n_input=self.summary_stats.n_vars,
                n_labels=self.n_labels,
                gene_medians=self._reference_gene_medians(median_cells),
                n_tokens=n_current,
                n_tokens_context=n_context,
                n_bins=n_bins,
                dropout=dropout,
                **sizes,
            )
        n_parameters = sum(p.numel() for p in self.module.parameters())
        genes = (
            f"top {n_current} genes of the cell + SEP + top {n_context} of its context "
            f"({self.context_setup.source})"
            if n_context
            else f"top {n_tokens} genes per cell"
        )
        self._model_summary_string = (
            f"RANKFORMER ({preset}): {sizes['n_layers']} layers of d_model {sizes['d_model']} "
            f"with {sizes['n_heads']} heads, {genes}, "
            f"{n_bins or 'no'} value bins, {self.n_labels} cell types, "
            f"{n_parameters:,} parameters"
        )
        self.pretrain_history_ = None
        self.init_params_ = self._get_init_params(locals())

    def _token_budget(
        self, n_tokens: int, n_tokens_current: int | None, n_tokens_context: int | None
    ) -> tuple[int, int]:
        """Genes of the cell and of its context per sequence (context 0: base mode)."""
        if not self.is_paired:
            for name, value in (
                ("n_tokens_current", n_tokens_current),
                ("n_tokens_context", n_tokens_context),
            ):
                if value is not None:
                    raise ValueError(
                        f"{name}={value} applies to the paired mode only; set up with "
                        "context_layer or context_key, or pass n_tokens."
                    )
            return n_tokens, 0
        current = n_tokens // 2 if n_tokens_current is None else n_tokens_current
        context = n_tokens - n_tokens // 2 if n_tokens_context is None else n_tokens_context
        for name, value in (("n_tokens_current", current), ("n_tokens_context", context)):
            if value < 1:
                raise ValueError(
                    f"{name} must be >= 1 in the paired mode, got {value} (n_tokens={n_tokens})."
                )
        return current, context

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
        return nonzero_gene_medians(matrix, rows=labelled)

    # -- setup: the paired mode -------------------------------------------------------------
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        labels_key: str | None = None,
        unlabeled_category: str = "Unknown",
        batch_key: str | None = None,
        layer: str | None = None,
        context_layer: str | None = None,
        context_key: str | None = None,
        missing_context: MissingContext = "raise",
        **kwargs,
    ):
        """Register an AnnData of raw counts; with a context, for the paired mode.

        Parameters
        ----------
        adata
            Cells x genes, raw counts in ``X`` or ``layers[layer]``.
        labels_key, unlabeled_category, batch_key, layer
            As in every celltyper model (:meth:`CellTyperModel.setup_anndata`).
        context_layer
            Layer holding each cell's context profile (raw counts, same genes), row by
            row: e.g. a pseudo-bulk of the cell's lineage or donor at the previous time
            point. Selects the paired mode.
        context_key
            obs column naming, for each cell, the ``obs_name`` of its paired cell in the
            same object (e.g. its ancestor at the previous time point). Selects the paired
            mode; registration stores the paired cells' counts in
            ``layers["_scvi_context"]`` (as scvi-tools stores ``obs["_scvi_labels"]``).
        missing_context
            A cell whose context has no counts, or whose paired cell is missing (NaN) or
            not in the object, is an error (``"raise"``, which says how many there are)
            or is read in the base mode: CLS and its own genes (``"none"``, with a
            warning giving their number). New data (queries, ``predict``) follow the same
            rule; with ``"none"`` they may also lack the layer or column altogether.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        setup = {k: v for k, v in locals().items() if k not in ("cls", "adata", "kwargs")}
        setup.pop("setup_method_args")
        cls._register(
            adata, adata, adata.obs, FieldFactory(), setup_method_args, {**setup, **kwargs}
        )

    @classmethod
    def _setup_fields(
        cls,
        make: FieldFactory,
        context_layer: str | None = None,
        context_key: str | None = None,
        missing_context: MissingContext = "raise",
        **setup,
    ) -> list:
        fields = super()._setup_fields(make, **setup)
        context = ContextSetup(setup["layer"], context_layer, context_key, missing_context)
        # A base-mode registry stays exactly as it was before the paired mode existed.
        return [*fields, context_field(make, context)] if context.paired else fields

    @classmethod
    def _check_setup_inputs(
        cls,
        rna,
        obs,
        context_layer: str | None = None,
        context_key: str | None = None,
        missing_context: MissingContext = "raise",
        **setup,
    ) -> None:
        super()._check_setup_inputs(rna, obs, **setup)
        context = ContextSetup(setup["layer"], context_layer, context_key, missing_context)
        context.check_arguments()
        if not context.paired:
            return
        # Checked before anything is registered, so a refused setup leaves adata as it was.
        profiles = context_profiles(rna, obs, context)
        if not setup["transferring"]:
            # Transfers (load, queries) report through the registry field instead.
            report_missing_context(profiles, context, "adata", stacklevel=5)

    @classmethod
    def _extra_obs_columns(
        cls, registry: dict, obs: pd.DataFrame, *, keep_new_batches: bool, what: str
    ) -> dict[str, np.ndarray]:
        context = ContextSetup.from_setup_args(registry["setup_args"])
        if context.context_key is None:
            return {}
        if context.context_key in obs.columns:
            return {context.context_key: obs[context.context_key].astype(object).to_numpy()}
        if context.missing_context == "none":
            return {context.context_key: np.full(len(obs), None, dtype=object)}
        raise KeyError(
            f"context_key={context.context_key!r} is not a column of the {what}'s obs; the "
            "model pairs each cell with the cell that column names (or was set up with "
            "missing_context='none' to read cells without a pair in the base mode)."
        )

    @classmethod
    def _extra_layers(cls, registry: dict, rna: AnnData, *, what: str) -> dict:
        context = ContextSetup.from_setup_args(registry["setup_args"])
        name = context.context_layer
        if name is None:
            return {}
        if name in rna.layers:
            return {name: rna.layers[name]}
        if context.missing_context == "none":
            return {name: sparse.csr_matrix(rna.shape, dtype=np.float32)}
        raise KeyError(
            f"context_layer={name!r} is not in the {what}'s layers (available: "
            f"{list(rna.layers)}); the model reads each cell's context profile there."
        )

    @property
    def context_setup(self) -> ContextSetup:
        """How the model finds each cell's context profile (base mode: none)."""
        return ContextSetup.from_setup_args(self.registry_["setup_args"])

    @property
    def is_paired(self) -> bool:
        """Whether the model reads a context profile beside each cell's own."""
        return self.context_setup.paired

    # -- training -------------------------------------------------------------------------
    def _training_stages(self, options: dict[str, Any]) -> list[TrainingStage]:
        mlm_weight, pretrain_epochs = options["mlm_weight"], options["pretrain_epochs"]
        if mlm_weight is None:
            # A query's LayerNorms adapt to its cells through the masked-gene loss.
            mlm_weight = 0.5 if self._is_query_model else 0.0
        if mlm_weight < 0:
            raise ValueError(f"mlm_weight must be >= 0, got {mlm_weight}.")
        stages = []
        if pretrain_epochs or self._pretraining_only:
            stages.append(
                TrainingStage(
                    "pretrain",
                    RankformerPretrainingPlan,
                    max_epochs=10,
                    epochs_option="pretrain_epochs",
                    splitter_kwargs={"include_unlabelled": True, "balance_classes": False},
                    early_stopping_patience=5,
                    keep_history_as="pretrain_history_",
                )
            )
        if not self._pretraining_only:
            # Unlabelled cells only serve the masked-gene term (and a query's statistics).
            include_unlabelled = mlm_weight > 0 or self._is_query_model
            stages.append(
                TrainingStage(
                    "train",
                    self._training_plan_cls,
                    max_epochs=60,
                    plan_kwargs={"mlm_weight": mlm_weight},
                    splitter_kwargs={
                        "include_unlabelled": include_unlabelled,
                        "balance_classes": True,
                    },
                    early_stopping_patience=10,
                )
            )
        return stages

    @classmethod
    def _extra_plan_classes(cls) -> tuple[type, ...]:
        return (RankformerPretrainingPlan,)

    @classmethod
    def _computed_plan_arguments(cls) -> set[str]:
        # The stages set the loss weights: mlm_weight is the training option of that name.
        return {"classification_weight", "mlm_weight"}

    def _run_stage(self, stage: TrainingStage, **kwargs) -> None:
        super()._run_stage(stage, **kwargs)
        if stage.name == "pretrain":
            # The encoder moved but the head did not follow: the model classifies again
            # only after the train stage (so pretrain() alone does not calibrate).
            self.is_trained_ = False

    def pretrain(self, max_epochs: int = 10, **kwargs) -> None:
        """Masked-gene pretraining alone, on every training cell, labelled or not.

        Runs only the ``"pretrain"`` stage of :meth:`train` (the same as
        ``train(pretrain_epochs=max_epochs)`` without the classifier's stage): a random
        ``mask_prob`` of each cell's gene tokens is replaced by a mask token and the
        encoder learns which gene was there (Geneformer's objective), the held-out
        labelled cells (the split of :meth:`train` with the same seed) giving the
        validation loss. The head does not move, so the model is left untrained
        (``is_trained_`` False, no novelty calibration) until :meth:`train`; the curves
        are kept in ``pretrain_history_``.

        Parameters
        ----------
        max_epochs
            Epochs over the training cells.
        **kwargs
            Keywords of :meth:`train` (``batch_size``, ``lr``, ``mask_prob``,
            ``early_stopping_patience`` -- 5 here --, ``seed``, Trainer keywords, ...).
        """
        self._pretraining_only = True
        try:
            self.train(pretrain_epochs=max_epochs, **kwargs)
        finally:
            self._pretraining_only = False

    # -- inference ------------------------------------------------------------------------
    #: Cells per module call at inference: attention holds cells x heads x length^2.
    _inference_batch_size = 512

    def _chunk_inputs(self, block: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray]:
        """Tokens of a whole chunk, from its sparse rows (sorting each cell's expressed
        genes only), with the cells ordered by their number of tokens so that each
        minibatch is cut to the longest of its own cells."""
        module: RANKFORMERModule = self.module
        counts = {REGISTRY_KEYS.X_KEY, CONTEXT_KEY}
        medians = module.gene_medians.detach().cpu()
        if module.paired:
            tokens = tokenize_paired_matrices(
                block[REGISTRY_KEYS.X_KEY],
                block[CONTEXT_KEY],
                medians,
                module.n_tokens,
                module.n_tokens_context,
                module.n_bins,
            )
        else:
            tokens = tokenize_matrix(
                block[REGISTRY_KEYS.X_KEY], medians, module.n_tokens, module.n_bins
            )
        lengths = (~tokens.padding_mask).sum(dim=1).numpy()
        order = np.argsort(lengths, kind="stable")
        rows = torch.from_numpy(order)
        inputs = {
            key: value[rows]
            for key, value in dense_tensors(
                {k: v for k, v in block.items() if k not in counts}
            ).items()
        }
        inputs[TOKENS_KEY] = tokens[rows]
        return inputs, order

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
        ``model.registration.genes``. A paired model's tokens are CLS, the cell's genes,
        SEP (id :func:`~celltyper.data.sep_token`), its context's genes, with
        ``segments`` telling the halves apart.
        """
        module: RANKFORMERModule = self.module
        with self._model_data(adata, chunked=False) as data:
            matrix = self.get_from_registry(data, REGISTRY_KEYS.X_KEY)
            context = self.get_from_registry(data, CONTEXT_KEY) if module.paired else None
            if indices is not None:
                matrix = matrix[np.asarray(indices)]
                context = None if context is None else context[np.asarray(indices)]
            medians = module.gene_medians.detach().cpu()
            if context is None:
                return tokenize_matrix(
                    matrix, medians, module.n_tokens, module.n_bins, progress=progress
                )
            return tokenize_paired_matrices(
                matrix,
                context,
                medians,
                module.n_tokens,
                module.n_tokens_context,
                module.n_bins,
                progress=progress,
            )

    @property
    def n_parameters(self) -> int:
        """Number of parameters of the module."""
        return int(sum(p.numel() for p in self.module.parameters()))


__all__ = ["RANKFORMER", "RANKFORMER_PRESETS"]
