"""SCNYM: semi-supervised cell-type transfer (Kimmel & Kelley, Genome Research 2021)."""

from __future__ import annotations

import copy
import logging
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from mudata import MuData
from scvi.utils import track

from celltyper.data import LabelledUnlabelledSplitter
from celltyper.module import SCNYMModule
from celltyper.train import MixMatchTrainingPlan

from .base import BatchCenteringMixin, CellTyperModel, seeded

logger = logging.getLogger(__name__)

_COMMON = {
    "max_epochs": 100,
    "min_epochs": 20,
    "early_stopping_patience": 20,
    "batch_size": 256,
    "validation_size": 0.1,
    "balance_classes": True,
    "optimizer": "Adadelta",
    "lr": 1.0,
    "weight_decay": 1e-4,
    "sharpen_temperature": 0.5,
    "mixup_alpha": 0.3,
    "augment_drop_rate": 0.1,
    "unsup_max_weight": 1.0,
    "n_epochs_unsup_ramp": 100,
    "adversary_max_weight": 0.1,
    "n_epochs_adversary_ramp": 20,
    "domain_shift_augmentation": 0.0,
}

#: Training configurations of the scNym paper; ``SCNYM.train(config=..., **overrides)``.
SCNYM_CONFIGS: dict[str, dict[str, Any]] = {
    "no_new_identity": {
        **_COMMON,
        "pseudolabel_min_confidence": 0.0,
        "adversary_confident_only": False,
    },
    "new_identity_discovery": {
        **_COMMON,
        "pseudolabel_min_confidence": 0.9,
        "adversary_confident_only": True,
    },
}

_PLAN_KEYS = (
    "optimizer",
    "lr",
    "weight_decay",
    "sharpen_temperature",
    "mixup_alpha",
    "augment_drop_rate",
    "unsup_max_weight",
    "n_epochs_unsup_ramp",
    "adversary_max_weight",
    "n_epochs_adversary_ramp",
    "domain_shift_augmentation",
    "pseudolabel_min_confidence",
    "adversary_confident_only",
)


class SCNYM(BatchCenteringMixin, CellTyperModel):
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
        augmentations; needs ``batch_key`` with 2 or more batches. A query's new batches
        are centred on their own means in :meth:`load_query_data`. Off by default. It
        also removes differences in cell-type composition between batches: use it when
        the batches hold broadly the same types.
    seed
        Seed of the weight initialisation (and the default seed of :meth:`train`).

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

    configs = SCNYM_CONFIGS

    def __init__(
        self,
        adata: AnnData | MuData,
        n_hidden: int = 256,
        n_layers: int = 2,
        dropout_rate: float = 0.1,
        batch_centering: bool = False,
        seed: int = 0,
    ):
        super().__init__(adata)
        self._init_data_checks()
        if batch_centering:
            self._check_batch_centering()
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
            )
        if batch_centering:
            self._init_batch_centering()
        if self.input_kind_ == "counts":
            logger.info("SCNYM: raw counts detected; the model uses log1p(CPM) of them.")
        domains = "batches" if self._domain_from_batch else "labelled vs unlabelled"
        self._model_summary_string = (
            f"SCNYM with {n_layers} hidden layers of {n_hidden}, {self.n_labels} cell types, "
            f"{n_domains} domains ({domains}), input {self.input_kind_}"
        )
        self.init_params_ = self._get_init_params(locals())

    def train(
        self,
        max_epochs: int | None = None,
        config: Literal["no_new_identity", "new_identity_discovery"] = "no_new_identity",
        *,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        early_stopping: bool = True,
        restore_best_weights: bool = True,
        seed: int | None = None,
        **kwargs,
    ) -> None:
        """Train with MixMatch and the domain adversary.

        Parameters
        ----------
        max_epochs
            Overrides the configuration's ``max_epochs`` (100). An epoch is a pass over the
            larger of the labelled and unlabelled training sets.
        config
            ``"no_new_identity"`` (every unlabelled cell enters MixMatch and the adversary)
            or ``"new_identity_discovery"`` (only unlabelled cells whose pseudo-label
            confidence is >= 0.9 do, so cell types absent from the reference are not pulled
            onto known ones). See :data:`SCNYM_CONFIGS` for the defaults.
        accelerator, devices
            As in scvi-tools.
        early_stopping
            Stop when the loss on held-out labelled cells has not improved for
            ``early_stopping_patience`` epochs (never before ``min_epochs``).
        restore_best_weights
            End with the weights of the best validation epoch.
        seed
            Seed of the split, the minibatches and the augmentations; defaults to the
            model's ``seed``.
        **kwargs
            Overrides of any key of the configuration (e.g. ``lr=0.5``,
            ``adversary_max_weight=0``); other keywords go to the Lightning trainer.
        """
        if config not in self.configs:
            raise ValueError(f"config must be one of {list(self.configs)}, got {config!r}.")
        settings = copy.deepcopy(self.configs[config])
        settings.update({k: kwargs.pop(k) for k in list(kwargs) if k in settings})
        if max_epochs is not None:
            settings["max_epochs"] = max_epochs
        seed = self._resolve_seed(seed)

        splitter = self._make_splitter(
            settings["validation_size"],
            settings["batch_size"],
            seed,
            balance_classes=settings["balance_classes"],
        )
        plan = self._training_plan_cls(
            self.module,
            domain_from_batch=self._domain_from_batch,
            **{k: settings[k] for k in _PLAN_KEYS},
        )
        self._run_training(
            plan,
            splitter,
            settings["max_epochs"],
            accelerator=accelerator,
            devices=devices,
            early_stopping=early_stopping,
            early_stopping_patience=settings["early_stopping_patience"],
            min_epochs=settings["min_epochs"],
            restore_best_weights=restore_best_weights,
            seed=seed,
            **kwargs,
        )

    @torch.no_grad()
    def _background(self, data, indices: np.ndarray, batch_size: int | None) -> torch.Tensor:
        loader = self._make_data_loader(adata=data, indices=indices, batch_size=batch_size)
        return torch.cat([self.module.log_expression(t).cpu() for t in loader])

    def interpret(
        self,
        adata: AnnData | MuData | None = None,
        groupby: str | None = None,
        target: str | None = None,
        source: str = "all",
        cell_type: str | None = None,
        n_samples: int = 100,
        max_cells: int = 500,
        batch_size: int = 256,
        seed: int = 0,
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Expected gradients: which genes drive the classification of a group of cells.

        For each explained cell ``x`` and class ``c``, the attribution of gene ``g`` is
        ``E[(x_g - x'_g) * d f_c(x' + a (x - x')) / d x_g]`` over background cells ``x'``
        and ``a ~ U(0, 1)`` (Erion et al. 2021), in log1p(CPM) space.

        Parameters
        ----------
        adata
            Data holding the cells; ``None`` uses the model's data.
        groupby
            Column of ``obs`` defining the groups.
        target
            Group whose cells are explained.
        source
            Group of the background cells, or ``"all"`` for every cell.
        cell_type
            Class whose output is explained; defaults to ``target`` when it is a reference
            cell type, else to each cell's predicted type.
        n_samples
            Background/interpolation samples per cell.
        max_cells
            At most this many target cells are explained (a seeded random subset).
        batch_size
            Cells per gradient batch.
        seed
            Seed of the sampling.

        Returns
        -------
        ``(ranking, per_cell)``: genes ranked by mean attribution (columns ``gene``,
        ``mean_attribution``, ``mean_abs_attribution``) and the cells x genes attribution
        table.
        """
        self._check_if_trained(warn=True)
        obs = (self.adata if adata is None else adata).obs
        if groupby is None or groupby not in obs.columns:
            raise KeyError(f"groupby={groupby!r} is not a column of adata.obs.")
        groups = obs[groupby].astype(str).to_numpy()
        target_idx = np.flatnonzero(groups == str(target))
        if len(target_idx) == 0:
            raise ValueError(f"No cell has obs[{groupby!r}] == {target!r}.")
        source_idx = (
            np.arange(len(groups)) if source == "all" else np.flatnonzero(groups == str(source))
        )
        if len(source_idx) == 0:
            raise ValueError(f"No cell has obs[{groupby!r}] == {source!r}.")
        rng = np.random.default_rng(seed)
        if len(target_idx) > max_cells:
            target_idx = np.sort(rng.choice(target_idx, max_cells, replace=False))
        if cell_type is None and str(target) in self.cell_types:
            cell_type = str(target)
        if cell_type is not None and cell_type not in self.cell_types:
            raise ValueError(f"cell_type={cell_type!r} is not one of {self.cell_types}.")

        was_training = self.module.training
        self.module.eval()
        try:
            with self._model_data(adata) as data:
                x = self._background(data, target_idx, batch_size)
                background = self._background(data, source_idx, batch_size)
                names = data.obs_names[target_idx]
            attributions = self._expected_gradients(
                x, background, cell_type, n_samples, batch_size, seed
            )
        finally:
            self.module.train(was_training)
        genes = list(self.registration.genes)
        per_cell = pd.DataFrame(attributions, index=names, columns=genes)
        ranking = pd.DataFrame(
            {
                "gene": genes,
                "mean_attribution": attributions.mean(axis=0),
                "mean_abs_attribution": np.abs(attributions).mean(axis=0),
            }
        ).sort_values("mean_attribution", ascending=False, ignore_index=True)
        return ranking, per_cell

    def _expected_gradients(
        self,
        x: torch.Tensor,
        background: torch.Tensor,
        cell_type: str | None,
        n_samples: int,
        batch_size: int,
        seed: int,
    ) -> np.ndarray:
        device = next(self.module.parameters()).device
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            logits = self.module.logits_from_log_expression(x.to(device))
        classes = (
            torch.full((len(x),), self.cell_types.index(cell_type), dtype=torch.long)
            if cell_type is not None
            else logits.argmax(dim=1).cpu()
        )
        result = torch.zeros_like(x)
        cells_per_chunk = max(1, batch_size // max(1, n_samples) or 1)
        with seeded(seed):
            for start in track(
                range(0, len(x), cells_per_chunk), description="Expected gradients"
            ):
                stop = min(start + cells_per_chunk, len(x))
                xs = x[start:stop].repeat_interleave(n_samples, dim=0)
                picks = torch.randint(len(background), (len(xs),), generator=generator)
                refs = background[picks]
                alpha = torch.rand(len(xs), 1, generator=generator)
                points = (refs + alpha * (xs - refs)).to(device).requires_grad_(True)
                out = self.module.logits_from_log_expression(points)
                cls = classes[start:stop].repeat_interleave(n_samples).to(device)
                selected = out.gather(1, cls.view(-1, 1)).sum()
                (grad,) = torch.autograd.grad(selected, points)
                contrib = (xs.to(device) - refs.to(device)) * grad
                result[start:stop] = contrib.view(stop - start, n_samples, -1).mean(1).cpu()
        return result.numpy()


__all__ = ["SCNYM", "SCNYM_CONFIGS"]
