"""SCPRETRAIN: multi-task self-supervised pretraining, then fine-tuning (Zhang et al. 2022)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from mudata import MuData
from scvi import REGISTRY_KEYS
from scvi.model._utils import parse_device_args
from scvi.train import Trainer

from celltyper.data import LabelledUnlabelledSplitter
from celltyper.metrics import evaluation_scores
from celltyper.module import PseudoLabelHeads, SCPRETRAINModule
from celltyper.nn import KMeansResult, kmeans
from celltyper.train import FineTuningTrainingPlan, PseudoLabelDataModule, PseudoLabelTrainingPlan

from .base import CellTyperModel, seeded

logger = logging.getLogger(__name__)

#: Cells per cluster of the three K-means resolutions of the paper: K = n/100, n/50, n/200.
DEFAULT_RESOLUTIONS = (100, 50, 200)


def n_clusters_for(n_cells: int, cells_per_cluster: int) -> int:
    """``n_cells // cells_per_cluster + 1`` clusters, kept within ``[2, n_cells]``.

    The paper's ``K = n / r + 1``; a dataset of fewer than ``r`` cells would otherwise get a
    single cluster (a head with nothing to learn), so ``K`` is at least 2, and never
    more than the number of cells (a one-cell dataset gets one cluster).
    """
    if cells_per_cluster < 1:
        raise ValueError(f"resolutions must be positive cell counts, got {cells_per_cluster}.")
    return int(min(n_cells, max(2, n_cells // cells_per_cluster + 1)))


class SCPRETRAIN(CellTyperModel):
    """scPretrain: an encoder pretrained to predict K-means pseudo-labels, then fine-tuned.

    :meth:`pretrain` learns a representation from unlabelled cells. Phase 1 clusters
    each dataset (category of ``batch_key``, or the whole data) with K-means at three
    resolutions (``K = n/100, n/50, n/200``, plus 1) on its log1p-normalised expression;
    a shared encoder (``Linear(genes, 200) -> sigmoid``) feeds one linear head per
    (dataset, resolution), and the loss is the sum of each cell's cross-entropies over
    the heads of its own dataset. Phase 2 re-clusters the encoder's output, builds new
    heads and trains again. :meth:`train` then adds a classifier (200 -> 100 -> cell
    types) and fine-tunes it, with the encoder or on the frozen encoder, on the labelled
    cells only. Input: ``log1p(x / total * 1e4)``; raw counts are normalised by the
    module minibatch by minibatch, log-normalised data are used as they are.

    Parameters
    ----------
    adata
        AnnData or MuData registered with :meth:`setup_anndata` / :meth:`setup_mudata`.
    n_latent
        Width of the representation (the encoder's sigmoid output).
    n_hidden
        Hidden ReLU layers before the representation; ``()`` (default) is the published
        one-layer encoder, e.g. ``(1000,)`` a deeper one.
    classifier_hidden
        Width of the classifier's hidden layer.
    seed
        Seed of the weight initialisation and the default seed of :meth:`pretrain` and
        :meth:`train` (K-means, heads, minibatches, split).

    Examples
    --------
    >>> import celltyper
    >>> adata = celltyper.datasets.kang_pbmc()
    >>> celltyper.model.SCPRETRAIN.setup_anndata(
    ...     adata, labels_key="cell_type", batch_key="condition"
    ... )
    >>> model = celltyper.model.SCPRETRAIN(adata)
    >>> model.pretrain()  # K-means pseudo-labels of both conditions, 2 phases
    >>> model.pretrain_history_["kmeans"]  # clusters, inertia and seconds per clustering
    >>> model.train()  # fine-tune on the labelled cells
    >>> model.evaluate(adata, labels_key="cell_type")  # accuracy, kappa, AUPRC, AUROC
    >>> clf = celltyper.tl.classic_classifier(model, adata, "cell_type", kind="lr")
    """

    _module_cls = SCPRETRAINModule
    _training_plan_cls = FineTuningTrainingPlan
    _pretrain_plan_cls = PseudoLabelTrainingPlan
    _data_splitter_cls = LabelledUnlabelledSplitter
    _input_kind = "log1p"
    _requires_labels = True

    is_pretrained_: bool = False

    def __init__(
        self,
        adata: AnnData | MuData,
        n_latent: int = 200,
        n_hidden: Sequence[int] = (),
        classifier_hidden: int = 100,
        seed: int = 0,
    ):
        super().__init__(adata)
        self._init_data_checks()
        with seeded(seed):
            self.module = self._module_cls(
                n_input=self.summary_stats.n_vars,
                n_labels=self.n_labels,
                n_latent=n_latent,
                n_hidden=tuple(n_hidden),
                classifier_hidden=classifier_hidden,
                normalize_counts=self.input_kind_ == "counts",
            )
        self.is_pretrained_ = False
        self.pseudo_labels_: dict[int, np.ndarray] | None = None
        self.pretrain_history_: dict | None = None
        self._pretrain_heads: PseudoLabelHeads | None = None
        encoder = " -> ".join(str(w) for w in (*tuple(n_hidden), n_latent))
        self._model_summary_string = (
            f"SCPRETRAIN with encoder genes -> {encoder} (sigmoid), classifier "
            f"{n_latent} -> {classifier_hidden} -> {self.n_labels}, input {self.input_kind_}"
        )
        self.init_params_ = self._get_init_params(locals())

    # -- pretraining ------------------------------------------------------------------------
    @property
    def pretrain_heads(self) -> PseudoLabelHeads | None:
        """Heads of the last pretraining phase (``None`` before :meth:`pretrain`).

        Not saved with the model: they only serve pretraining.
        """
        return self._pretrain_heads

    def _datasets(self) -> tuple[np.ndarray, list[str]]:
        """Dataset (batch) index of each cell, 0..D-1 over the batches present."""
        codes = self._batch_codes()
        present = np.unique(codes)
        names = [str(self.registration.batches[c]) for c in present]
        return np.searchsorted(present, codes), names

    def _log_expression_fn(self):
        module = self.module

        def transform(x: torch.Tensor) -> torch.Tensor:
            return module.log_expression({REGISTRY_KEYS.X_KEY: x})

        return transform

    @torch.no_grad()
    def _encoded(self, matrix, device: torch.device, batch_size: int) -> torch.Tensor:
        """Encoder output of every cell, computed in minibatches from ``matrix``."""
        transform = self._log_expression_fn()
        was_training = self.module.training
        self.module.eval()
        parts = []
        for start in range(0, matrix.shape[0], batch_size):
            rows = matrix[start : start + batch_size]
            rows = rows.toarray() if hasattr(rows, "toarray") else np.asarray(rows)
            x = torch.as_tensor(rows, dtype=torch.float32, device=device)
            parts.append(self.module.encoder(transform(x)))
        self.module.train(was_training)
        return torch.cat(parts)

    def _cluster_phase(
        self,
        phase: int,
        features,
        transform,
        datasets: np.ndarray,
        dataset_names: list[str],
        resolutions: Sequence[int],
        seed: int,
        device: torch.device,
        kmeans_kwargs: dict,
        progress_bar: bool,
    ) -> tuple[np.ndarray, list[list[int]], pd.DataFrame]:
        """K-means pseudo-labels of every (dataset, resolution) of one phase."""
        labels = np.zeros((len(datasets), len(resolutions)), dtype=np.int64)
        sizes: list[list[int]] = []
        records = []
        for d, name in enumerate(dataset_names):
            members = np.flatnonzero(datasets == d)
            rows = features[members]
            sizes.append([])
            for r, per_cluster in enumerate(resolutions):
                k = n_clusters_for(len(members), per_cluster)
                # One independent, reproducible seed per (seed, phase, dataset, resolution).
                k_seed = int(np.random.SeedSequence([seed, phase, d, r]).generate_state(1)[0])
                result: KMeansResult = kmeans(
                    rows,
                    k,
                    transform=transform,
                    seed=k_seed,
                    device=device,
                    progress_bar=progress_bar,
                    description=f"K-means phase {phase}, {name}, K={k}",
                    **kmeans_kwargs,
                )
                labels[members, r] = result.labels
                sizes[-1].append(k)
                records.append(
                    {
                        "phase": phase,
                        "dataset": name,
                        "cells_per_cluster": per_cluster,
                        "n_cells": len(members),
                        "n_clusters": k,
                        "inertia": result.inertia,
                        "n_iter": result.n_iter,
                        "seconds": result.seconds,
                    }
                )
        return labels, sizes, pd.DataFrame.from_records(records)

    def pretrain(
        self,
        max_epochs: int = 30,
        n_phases: int = 2,
        resolutions: Sequence[int] = DEFAULT_RESOLUTIONS,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        kmeans_max_iter: int = 30,
        kmeans_tol: float = 1e-3,
        kmeans_batch_size: int = 4096,
        seed: int | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        enable_progress_bar: bool = True,
        **trainer_kwargs,
    ) -> None:
        """Pretrain the encoder on K-means pseudo-labels of every cell (no labels used).

        Each phase clusters every dataset at every resolution, builds one linear head per
        (dataset, resolution) and trains encoder and heads for ``max_epochs`` epochs with
        the sum of each cell's cross-entropies over its dataset's heads. Phase 1 clusters
        the log1p-normalised expression (computed minibatch by minibatch from the
        registered, possibly sparse, matrix), later phases the encoder's output.

        Parameters
        ----------
        max_epochs
            Epochs of each phase.
        n_phases
            Number of phases (2 as published: expression, then representation).
        resolutions
            Cells per cluster of each resolution: ``K = n // r + 1`` for a dataset of
            ``n`` cells, kept within ``[2, n]`` (see :func:`n_clusters_for`).
        batch_size
            Minibatch size.
        lr, weight_decay
            Adam settings.
        kmeans_max_iter, kmeans_tol, kmeans_batch_size
            Lloyd iterations, stopping fraction of changed labels and rows per block of
            :func:`~celltyper.nn.kmeans`.
        seed
            Seed of the K-means, the heads and the minibatches; defaults to the model's.
        accelerator, devices
            As in scvi-tools; K-means runs on the same device.
        enable_progress_bar
            Progress bars of the K-means iterations and of the epochs.
        **trainer_kwargs
            Keywords of the Lightning trainer.

        Notes
        -----
        Sets ``is_pretrained_``, ``pseudo_labels_`` (phase -> ``(n_cells, n_resolutions)``
        clusters of the cells the model was set up with), :attr:`pretrain_heads` (last
        phase) and ``pretrain_history_``: ``"loss"`` (per phase and epoch),
        ``"kmeans"`` (per clustering: clusters, inertia, iterations, seconds),
        ``"kmeans_seconds"``, ``"train_seconds"`` and ``"total_seconds"``.
        """
        if max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, got {max_epochs}.")
        if n_phases < 1:
            raise ValueError(f"n_phases must be >= 1, got {n_phases}.")
        resolutions = tuple(int(r) for r in resolutions)
        if not resolutions:
            raise ValueError("resolutions must name at least one cells-per-cluster value.")
        for r in resolutions:
            n_clusters_for(1, r)  # validates r
        frozen = [n for n, p in self.module.encoder.named_parameters() if not p.requires_grad]
        if frozen:
            raise ValueError(
                "The encoder of this query model is frozen by load_query_data; pretrain the "
                "reference model, or load the query with unfrozen=True."
            )
        seed = self._resolve_seed(seed)
        _, _, device = parse_device_args(accelerator, devices, return_device="torch")
        self.module.to(device)
        matrix = self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        datasets, dataset_names = self._datasets()
        kmeans_kwargs = {
            "max_iter": kmeans_max_iter,
            "tol": kmeans_tol,
            "batch_size": kmeans_batch_size,
        }
        start_time = time.perf_counter()
        losses, clusterings, pseudo_labels = [], [], {}
        kmeans_seconds = train_seconds = 0.0
        heads = None
        with seeded(seed):
            for phase in range(1, n_phases + 1):
                if phase == 1:
                    features, transform = matrix, self._log_expression_fn()
                else:
                    features, transform = self._encoded(matrix, device, kmeans_batch_size), None
                tic = time.perf_counter()
                labels, sizes, table = self._cluster_phase(
                    phase,
                    features,
                    transform,
                    datasets,
                    dataset_names,
                    resolutions,
                    seed,
                    device,
                    kmeans_kwargs,
                    enable_progress_bar,
                )
                phase_kmeans = time.perf_counter() - tic
                kmeans_seconds += phase_kmeans
                clusterings.append(table)
                pseudo_labels[phase] = labels
                heads = PseudoLabelHeads(self.module.n_latent, sizes).to(device)
                tic = time.perf_counter()
                history = self._fit_phase(
                    heads,
                    PseudoLabelDataModule(matrix, datasets, labels, batch_size=batch_size),
                    max_epochs,
                    lr=lr,
                    weight_decay=weight_decay,
                    accelerator=accelerator,
                    devices=devices,
                    enable_progress_bar=enable_progress_bar,
                    **trainer_kwargs,
                )
                phase_train = time.perf_counter() - tic
                train_seconds += phase_train
                history.insert(0, "phase", phase)
                losses.append(history)
                logger.info(
                    "SCPRETRAIN pretraining phase %d: %d K-means clusterings in %.1f s, "
                    "%d heads trained for %d epochs in %.1f s (loss %.3f -> %.3f).",
                    phase,
                    len(table),
                    phase_kmeans,
                    len(heads),
                    max_epochs,
                    phase_train,
                    history["pretrain_loss"].iloc[0],
                    history["pretrain_loss"].iloc[-1],
                )
        self.module.eval()
        self._pretrain_heads = heads
        self.pseudo_labels_ = pseudo_labels
        self.pretrain_history_ = {
            "loss": pd.concat(losses, ignore_index=True),
            "kmeans": pd.concat(clusterings, ignore_index=True),
            "kmeans_seconds": kmeans_seconds,
            "train_seconds": train_seconds,
            "total_seconds": time.perf_counter() - start_time,
        }
        self.is_pretrained_ = True

    def _fit_phase(
        self,
        heads: PseudoLabelHeads,
        datamodule: PseudoLabelDataModule,
        max_epochs: int,
        *,
        lr: float,
        weight_decay: float,
        accelerator: str,
        devices,
        enable_progress_bar: bool,
        **trainer_kwargs,
    ) -> pd.DataFrame:
        """Train encoder and heads of one phase; returns the per-epoch curves."""
        plan = self._pretrain_plan_cls(self.module, heads, lr=lr, weight_decay=weight_decay)
        accelerator, lightning_devices, _ = parse_device_args(
            accelerator, devices, return_device="torch"
        )
        trainer = Trainer(
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=lightning_devices,
            enable_progress_bar=enable_progress_bar,
            **trainer_kwargs,
        )
        trainer.fit(plan, datamodule=datamodule)
        curves = {
            key: frame.to_numpy().reshape(-1)
            for key, frame in trainer.logger.history.items()
            if key.startswith("pretrain_")
        }
        return pd.DataFrame({"epoch": np.arange(len(curves["pretrain_loss"])), **curves})

    # -- fine-tuning ------------------------------------------------------------------------
    def train(
        self,
        max_epochs: int = 200,
        pretrain: bool | Literal["auto"] = "auto",
        freeze_encoder: bool = False,
        pretrain_kwargs: dict | None = None,
        batch_size: int = 64,
        validation_size: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        entropy_weight: float | None = None,
        early_stopping: bool = True,
        early_stopping_patience: int = 20,
        early_stopping_monitor: Literal[
            "validation_accuracy", "validation_loss"
        ] = "validation_accuracy",
        restore_best_weights: bool = True,
        seed: int | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        **trainer_kwargs,
    ) -> None:
        """Fine-tune the classifier head (and the encoder) on the labelled cells.

        Parameters
        ----------
        max_epochs
            Largest number of fine-tuning epochs (passes over the labelled cells).
        pretrain
            ``"auto"`` (default): run :meth:`pretrain` first when the model has not been
            pretrained (and is not a query model, whose encoder comes from the reference),
            so ``train()`` alone gives the published method. ``True``: pretrain (again)
            first. ``False``: fine-tune the encoder as it is (from its random
            initialisation when never pretrained: the from-scratch baseline).
        freeze_encoder
            Train only the classifier head; the encoder's weights stay as they are.
        pretrain_kwargs
            Keywords of :meth:`pretrain` (e.g. ``{"max_epochs": 10}``), used when
            pretraining runs.
        batch_size
            Minibatch size.
        validation_size
            Fraction of each labelled cell type held out for early stopping and the
            novelty calibration.
        lr, weight_decay
            Adam settings.
        entropy_weight
            Weight of the entropy of the predictions on unlabelled cells. ``None``: 0
            (only labelled cells enter the loss), except for a query model without a
            labelled cell, which adapts its head to the query by entropy minimisation
            (weight 1, as in TENT).
        early_stopping
            Stop when ``early_stopping_monitor`` has not improved for
            ``early_stopping_patience`` epochs; the best epoch's weights are restored.
        early_stopping_patience
            Patience of the early stopping.
        early_stopping_monitor
            ``"validation_accuracy"`` (maximised, as published; equal accuracies are
            ordered by the validation loss, so a small validation set does not stop
            training at the first epoch that reaches its best accuracy) or
            ``"validation_loss"``.
        restore_best_weights
            End with the weights of the best validation epoch.
        seed
            Seed of the split and the minibatches (and of pretraining); defaults to the
            model's ``seed``.
        accelerator, devices
            As in scvi-tools.
        **trainer_kwargs
            Keywords of the Lightning trainer (e.g. ``enable_progress_bar``).

        Notes
        -----
        Only labelled cells are used unless the model comes from
        :meth:`load_query_data`: a query model also passes its unlabelled cells through
        the head, so its BatchNorm statistics adapt to the query.
        """
        if pretrain not in ("auto", True, False):
            raise ValueError(f"pretrain must be 'auto', True or False, got {pretrain!r}.")
        if early_stopping_monitor not in ("validation_accuracy", "validation_loss"):
            raise ValueError(
                "early_stopping_monitor must be 'validation_accuracy' or 'validation_loss', "
                f"got {early_stopping_monitor!r}."
            )
        seed = self._resolve_seed(seed)
        run_pretraining = pretrain is True or (
            pretrain == "auto" and not self.is_pretrained_ and not self._is_query_model
        )
        if run_pretraining:
            if pretrain == "auto":
                logger.info(
                    "SCPRETRAIN: the encoder is not pretrained; running pretrain() first "
                    "(pass pretrain=False to train from scratch)."
                )
            options = {"seed": seed, "accelerator": accelerator, "devices": devices}
            if "enable_progress_bar" in trainer_kwargs:
                options["enable_progress_bar"] = trainer_kwargs["enable_progress_bar"]
            self.pretrain(**{**options, **(pretrain_kwargs or {})})

        query = self._is_query_model
        splitter = self._make_splitter(
            validation_size,
            batch_size,
            seed,
            allow_unlabelled_only=query,
            include_unlabelled=query,
        )
        if entropy_weight is None:
            entropy_weight = 1.0 if query and len(splitter.labelled_train_idx) == 0 else 0.0
        plan = self._training_plan_cls(
            self.module,
            freeze_encoder=freeze_encoder,
            entropy_weight=entropy_weight,
            lr=lr,
            weight_decay=weight_decay,
        )
        # Accuracy, ties broken by the loss (see FineTuningTrainingPlan).
        monitor, mode = (
            ("validation_score", "max")
            if early_stopping_monitor == "validation_accuracy"
            else ("validation_loss", "min")
        )
        self._run_training(
            plan,
            splitter,
            max_epochs,
            accelerator=accelerator,
            devices=devices,
            early_stopping=early_stopping,
            early_stopping_patience=early_stopping_patience,
            restore_best_weights=restore_best_weights,
            seed=seed,
            monitor=monitor,
            monitor_mode=mode,
            **trainer_kwargs,
        )

    # -- representation and evaluation --------------------------------------------------------
    def get_latent_representation(
        self,
        adata: AnnData | MuData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """The encoder's representation of each cell, ``(n_cells, n_latent)``.

        Available after :meth:`pretrain` alone (the representation scPretrain gives to
        classic classifiers, see :func:`celltyper.tl.classic_classifier`).

        Parameters
        ----------
        adata
            Data to embed (genes aligned to the model's); ``None`` uses the model's data.
        indices
            Positions of the cells to embed; ``None`` embeds all.
        batch_size
            Minibatch size; defaults to ``scvi.settings.batch_size``.
        """
        if not self.is_pretrained_:
            return super().get_latent_representation(adata, indices, batch_size)
        with self._model_data(adata) as data:
            return self._collect(data, indices, batch_size, {"z": self.module.embed})["z"]

    def evaluate(
        self,
        adata: AnnData | MuData | None = None,
        labels_key: str | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> dict[str, float]:
        """Accuracy, Cohen's kappa, macro AUPRC and macro AUROC of the predictions.

        Parameters
        ----------
        adata
            Data to score; ``None`` uses the model's data.
        labels_key
            Column of ``obs`` with the true labels; ``None`` uses the registered labels
            (model's data only). Cells with the unlabelled category or no label are left
            out.
        indices
            Positions of the cells to score; ``None`` scores all labelled cells.
        batch_size
            Minibatch size.

        Returns
        -------
        The scores of :func:`celltyper.metrics.evaluation_scores` and ``n_cells``.
        """
        target = self.adata if adata is None else adata
        if labels_key is None:
            if adata is not None:
                raise ValueError("evaluate(adata=...) needs labels_key naming the true labels.")
            truth = self._registered_labels()
        else:
            if labels_key not in target.obs.columns:
                raise KeyError(f"labels_key={labels_key!r} is not a column of adata.obs.")
            truth = target.obs[labels_key].astype(object).to_numpy()
        positions = np.arange(target.n_obs) if indices is None else np.asarray(indices)
        truth = truth[positions]
        unlabeled = self.registration.unlabeled_category
        keep = np.array([t is not None and t == t and t != unlabeled for t in truth])
        if not keep.any():
            raise ValueError("No labelled cell to evaluate.")
        probabilities = self.predict(
            adata, indices=positions[keep], soft=True, batch_size=batch_size
        )
        scores = evaluation_scores(
            truth[keep].astype(str), probabilities.to_numpy(), self.cell_types
        )
        return {**scores, "n_cells": int(keep.sum())}


__all__ = ["DEFAULT_RESOLUTIONS", "SCPRETRAIN", "n_clusters_for"]
