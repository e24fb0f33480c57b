"""SCNYM: semi-supervised cell-type transfer (Kimmel & Kelley, Genome Research 2021)."""

from __future__ import annotations

import logging
from typing import Any, Literal

from anndata import AnnData
from mudata import MuData

from celltyper.data import LabelledUnlabelledSplitter
from celltyper.module import SCNYMModule
from celltyper.train import MixMatchTrainingPlan

from .base import (
    BatchCenteringMixin,
    CellTyperModel,
    TrainingStage,
    UnmeasuredGenesMixin,
    seeded,
)

logger = logging.getLogger(__name__)

#: The training configurations of the scNym paper, ``SCNYM.train(config=...)``: settings
#: of :meth:`~celltyper.module.SCNYMModule.loss` (a keyword given to ``train`` wins).
SCNYM_CONFIGS: dict[str, dict[str, Any]] = {
    "no_new_identity": {"pseudolabel_min_confidence": 0.0, "adversary_confident_only": False},
    "new_identity_discovery": {
        "pseudolabel_min_confidence": 0.9,
        "adversary_confident_only": True,
    },
}


class SCNYM(UnmeasuredGenesMixin, BatchCenteringMixin, CellTyperModel):
    """scNym: MixMatch semi-supervised learning with a domain adversary.

    A classifier (genes -> 256 -> 256 -> cell types) trained on labelled reference cells
    and, through MixMatch, on unlabelled target cells (cells whose label is the
    ``unlabeled_category``), while a domain adversary behind gradient reversal makes the
    embedding domain-invariant. Input: log1p(counts per million); raw counts are
    normalised by the module minibatch by minibatch (your data are not copied), and
    log-normalised data are used as they are.

    Parameters
    ----------
    adata
        AnnData or MuData registered with :meth:`setup_anndata` / :meth:`setup_mudata`.
    n_hidden
        Width of the hidden layers.
    n_layers
        Number of hidden layers.
    dropout_rate
        Dropout after each hidden layer.
    batch_centering
        Centre each cell's log-expression on the mean of its batch (every registered cell
        of the batch, labelled or not) before the network sees it, after MixMatch's
        augmentations; ``True`` needs ``batch_key`` with 2 or more batches, ``"auto"``
        centres when there are. A query's new batches are centred on their own means in
        :meth:`load_query_data`. The default, ``"auto"``, centres whenever there are
        batches (measured in the SCNYM page of the docs: with the other defaults it lifts
        the whole Kang object from 0.70 to 0.745 balanced accuracy). It also removes
        differences in cell-type composition between batches; ``False`` turns it off.
    skip_unmeasured_genes
        Whether the encoder leaves out genes that some batch did not measure (zero in all
        its cells where the other batches predict 10 or more counts, as with a smaller
        gene panel filled with zeros; see :attr:`unread_genes`). Their zeros would tell
        the encoder the batch.
    seed
        Seed of the weight initialisation (and the default seed of :meth:`train`).

    Notes
    -----
    :meth:`train` (shared by every model) runs one stage: up to 100 epochs (at least 20,
    early stopping after 20 without improvement of the held-out labelled cells'
    cross-entropy), minibatches of 256 labelled and 256 unlabelled cells, the labelled
    ones oversampled so every type is as frequent as the largest. An epoch is a pass over
    the labelled cells, each step drawing the next unlabelled cells
    (``unlabelled_ratio=1.0``), so it costs the same however many unlabelled cells there
    are; ``unlabelled_ratio=None`` makes it a pass over the larger set. The adversary
    weighs the labelled cells so that their types come in the mix the classifier
    predicts for the unlabelled cells (``adversary_label_shift``). Its own option
    ``config`` is ``"no_new_identity"`` (every unlabelled cell enters MixMatch and the
    adversary) or ``"new_identity_discovery"`` (only unlabelled cells with pseudo-label
    confidence >= 0.9 do, so types absent from the reference are not pulled onto known
    ones); see :data:`SCNYM_CONFIGS`. Hyperparameters, by name or in ``plan_kwargs``: those of
    :class:`~celltyper.train.MixMatchTrainingPlan` (ramps, optimizer: Adadelta, lr 1.0,
    weight decay 1e-4) and of :meth:`~celltyper.module.SCNYMModule.loss`.

    Examples
    --------
    >>> import celltyper
    >>> adata = celltyper.datasets.kang_pbmc()
    >>> # reference: labelled control cells; query: stimulated cells, left unlabelled
    >>> adata.obs["train_label"] = adata.obs["cell_type"].astype(str)
    >>> adata.obs.loc[adata.obs["split"] == "query", "train_label"] = "Unknown"
    >>> celltyper.model.SCNYM.setup_anndata(
    ...     adata, labels_key="train_label", batch_key="condition"
    ... )
    >>> model = celltyper.model.SCNYM(adata)
    >>> model.train()
    >>> model.annotate()  # obs["scnym"], obs["scnym_confidence"], ..., obsm["X_scnym"]
    """

    _module_cls = SCNYMModule
    _training_plan_cls = MixMatchTrainingPlan
    _data_splitter_cls = LabelledUnlabelledSplitter
    _input_kind = "log1p"
    _requires_labels = True
    _train_defaults = {"batch_size": 256, "validation_size": 0.1, "early_stopping": True}
    _train_options = {"config": "no_new_identity"}

    def __init__(
        self,
        adata: AnnData | MuData,
        n_hidden: int = 256,
        n_layers: int = 2,
        dropout_rate: float = 0.1,
        batch_centering: bool | Literal["auto"] = "auto",
        skip_unmeasured_genes: bool = True,
        seed: int = 0,
    ):
        super().__init__(adata)
        batch_centering = self._resolved_batch_centering(batch_centering)
        self._init_data_checks(batch_centering)
        self._domain_from_batch = self.n_batches > 1
        n_domains = self.n_batches if self._domain_from_batch else 2
        with seeded(seed):
            self.module = self._module_cls(
                n_input=self.summary_stats.n_vars,
                n_labels=self.n_labels,
                n_domains=n_domains,
                n_hidden=n_hidden,
                n_layers=n_layers,
                dropout_rate=dropout_rate,
                normalize_counts=self.input_kind_ == "counts",
                domain_from_batch=self._domain_from_batch,
            )
        self._init_encoder_genes(skip_unmeasured_genes)
        if batch_centering:
            self._init_batch_centering()
        if self.input_kind_ == "counts":
            logger.info("SCNYM: raw counts detected; the model uses log1p(CPM) of them.")
        domains = "batches" if self._domain_from_batch else "labelled vs unlabelled"
        self._model_summary_string = (
            f"SCNYM with {n_layers} hidden layers of {n_hidden}, {self.n_labels} cell types, "
            f"{n_domains} domains ({domains}), input {self.input_kind_}"
            + self._unread_genes_summary()
        )
        self.init_params_ = self._get_init_params(locals())

    def _training_stages(self, options: dict[str, Any]) -> list[TrainingStage]:
        config = options["config"]
        if config not in SCNYM_CONFIGS:
            raise ValueError(f"config must be one of {list(SCNYM_CONFIGS)}, got {config!r}.")
        return [
            TrainingStage(
                "train",
                self._training_plan_cls,
                max_epochs=100,
                plan_kwargs=SCNYM_CONFIGS[config],
                splitter_kwargs={"balance_classes": True, "unlabelled_ratio": 1.0},
                min_epochs=20,
                early_stopping_patience=20,
            )
        ]


__all__ = ["SCNYM", "SCNYM_CONFIGS"]
