"""SCPRETRAIN: multi-task self-supervised pretraining, then fine-tuning (Zhang et al. 2022)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from mudata import MuData
from scvi import REGISTRY_KEYS
from scvi.model._utils import parse_device_args

from celltyper.data import (
    LabelledUnlabelledSplitter,
    PseudoLabelDataModule,
    check_resolutions,
    kmeans_pseudo_labels,
    n_clusters_for,
)
from celltyper.metrics import evaluation_scores
from celltyper.module import PseudoLabelHeads, SCPRETRAINModule
from celltyper.train import FineTuningTrainingPlan, PseudoLabelTrainingPlan

from .base import BatchCenteringMixin, CellTyperModel, TrainingStage, seeded

logger = logging.getLogger(__name__)

#: Cells per cluster of the three K-means resolutions of the paper: K = n/100, n/50, n/200.
DEFAULT_RESOLUTIONS = (100, 50, 200)
#: Name prefix of the pretraining stages (``pretrain_1``, ``pretrain_2``, ...).
_PRETRAIN = "pretrain"
#: Epochs of each pretraining phase: measured best of 5, 10, 20 and 30 on every shared
#: task (longer pretraining fits the K-means of each dataset, which transfer worse).
_PRETRAIN_EPOCHS = 10
#: ``early_stopping_monitor`` -> (logged metric, mode) of the fine-tuning stage.
_MONITORS = {
    "validation_accuracy": ("score_validation", "max"),  # accuracy, ties broken by the loss
    "validation_loss": ("validation_loss", "min"),
}
#: What a fit records on the model; pretraining leaves the fine-tuning's record alone.
_FIT_RECORD = ("history_", "is_trained_", "train_indices", "validation_indices", "test_indices")


class SCPRETRAIN(BatchCenteringMixin, CellTyperModel):
    """scPretrain: an encoder pretrained to predict K-means pseudo-labels, then fine-tuned.

    Pretraining learns a representation from unlabelled cells. Phase 1 clusters each
    dataset (category of ``batch_key``, or the whole data) with K-means at three
    resolutions (``K = n/100, n/50, n/200``, plus 1) on its log1p-normalised expression;
    a shared encoder (``Linear(genes, 200) -> sigmoid``) feeds one linear head per
    (dataset, resolution), and the loss is the sum of each cell's cross-entropies over
    the heads of its own dataset. Phase 2 re-clusters the encoder's output, builds new
    heads and trains again. Fine-tuning then adds a classifier (200 -> 100 -> cell
    types) and trains it, with the encoder or on the frozen encoder, on the labelled
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
    batch_centering
        Centre each cell's log-expression on the mean of its batch (every registered cell
        of the batch, labelled or not) before the encoder, in pretraining, fine-tuning
        and prediction. The K-means of each dataset (batch) is unchanged by it, but the
        shared encoder no longer sees the shift a whole batch shares; ``True`` needs
        ``batch_key`` with 2 or more batches, ``"auto"`` centres when there are. Off by
        default, as in the published method: centring lowered the balanced accuracy of
        Baron human -> mouse from 0.81 to 0.77 and of mouse -> human from 0.86 to 0.67
        (see the docs page for the measurement).
        A query's new batches are centred on their own means in
        :meth:`load_query_data`.
    seed
        Seed of the weight initialisation and the default seed of :meth:`train` and
        :meth:`pretrain` (K-means, heads, minibatches, split).

    Notes
    -----
    :meth:`train` (shared by every model) runs one stage per pretraining phase
    (``pretrain_1``, ``pretrain_2``: 10 epochs each on every cell, minibatches of 256,
    nothing held out), then ``finetune``: up to 200 epochs on the labelled cells,
    minibatches of 64, 10 % of each type held out, early stopping after 20 epochs
    without improvement, the best epoch's weights restored. Its own options:

    - ``pretrain``: ``"auto"`` (default) pretrains first unless the model is pretrained
      or a query model (whose encoder is the reference's), so ``train()`` alone is the
      published method; ``True`` pretrains (again) first; ``False`` fine-tunes the
      encoder as it is (never pretrained: the from-scratch baseline); ``"only"``
      pretrains without fine-tuning (:meth:`pretrain`);
    - ``n_phases`` (2), ``pretrain_epochs`` (of each phase; ``None``: ``max_epochs``,
      else 10), ``pretrain_batch_size`` (256);
    - ``resolutions``: cells per cluster ``r``, ``K = n // r + 1`` clusters for a dataset
      of ``n`` cells (see :func:`~celltyper.data.n_clusters_for`); ``kmeans_max_iter``,
      ``kmeans_tol``, ``kmeans_batch_size`` of :func:`~celltyper.nn.kmeans` (run on the
      training device);
    - ``early_stopping_monitor``: ``"validation_accuracy"`` (as published; equal
      accuracies ordered by the loss: ``score_validation``) or ``"validation_loss"``.

    Hyperparameters, by name or in ``plan_kwargs``: ``lr`` (1e-3), ``weight_decay`` (0)
    and ``optimizer`` (Adam) of every stage; ``freeze_encoder`` of
    :class:`~celltyper.train.FineTuningTrainingPlan` (train only the head);
    ``entropy_weight`` of :meth:`~celltyper.module.SCPRETRAINModule.loss` (0, or 1 for a
    query without labelled cells: entropy minimisation as in TENT). A query model also
    passes its unlabelled cells through the head, so its BatchNorm statistics adapt.

    Pretraining sets ``is_pretrained_``, ``pseudo_labels_`` (phase -> cells x
    resolutions), :attr:`pretrain_heads` and ``pretrain_history_``: ``"loss"`` (curves
    per phase and epoch), ``"kmeans"`` (per clustering: clusters, inertia, iterations,
    seconds), ``"kmeans_seconds"``, ``"train_seconds"``, ``"total_seconds"``.
    ``history`` keeps the fine-tuning's curves.

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
    _data_splitter_cls = LabelledUnlabelledSplitter
    _input_kind = "log1p"
    _requires_labels = True
    _train_defaults = {"batch_size": 64, "validation_size": 0.1, "early_stopping": True}
    _train_options = {
        "pretrain": "auto",
        "n_phases": 2,
        "pretrain_epochs": None,
        "pretrain_batch_size": 256,
        "resolutions": DEFAULT_RESOLUTIONS,
        "kmeans_max_iter": 30,
        "kmeans_tol": 1e-3,
        "kmeans_batch_size": 4096,
        "early_stopping_monitor": "validation_accuracy",
    }

    def __init__(
        self,
        adata: AnnData | MuData,
        n_latent: int = 200,
        n_hidden: Sequence[int] = (),
        classifier_hidden: int = 100,
        batch_centering: bool | Literal["auto"] = False,
        seed: int = 0,
    ):
        super().__init__(adata)
        batch_centering = self._resolved_batch_centering(batch_centering)
        self._init_data_checks(batch_centering)
        with seeded(seed):
            self.module = self._module_cls(
                n_input=self.summary_stats.n_vars,
                n_labels=self.n_labels,
                n_latent=n_latent,
                n_hidden=tuple(n_hidden),
                classifier_hidden=classifier_hidden,
                normalize_counts=self.input_kind_ == "counts",
            )
        if batch_centering:
            self._init_batch_centering()
        self.is_pretrained_ = False
        self.pseudo_labels_: dict[int, np.ndarray] | None = None
        self.pretrain_history_: dict | None = None
        self._pretrain_heads: PseudoLabelHeads | None = None
        self._pretraining: dict | None = None  # the record of a pretraining in progress
        encoder = " -> ".join(str(w) for w in (*tuple(n_hidden), n_latent))
        self._model_summary_string = (
            f"SCPRETRAIN with encoder genes -> {encoder} (sigmoid), classifier "
            f"{n_latent} -> {classifier_hidden} -> {self.n_labels}, input {self.input_kind_}"
        )
        self.init_params_ = self._get_init_params(locals())

    @property
    def pretrain_heads(self) -> PseudoLabelHeads | None:
        """Heads of the last pretraining phase (``None`` before pretraining).

        Not saved with the model: they only serve pretraining.
        """
        return self._pretrain_heads

    def pretrain(
        self, max_epochs: int | None = None, batch_size: int | None = None, **kwargs
    ) -> None:
        """Pretrain the encoder on K-means pseudo-labels of every cell (no label used).

        The pretraining stages of :meth:`train` alone (``train(pretrain="only")``).

        Parameters
        ----------
        max_epochs
            Epochs of each phase (``None``: 10).
        batch_size
            Minibatch size (``None``: 256).
        **kwargs
            Keywords of :meth:`train`: the options ``n_phases``, ``resolutions``,
            ``kmeans_max_iter``, ... (see the class Notes), ``lr``, ``weight_decay``,
            ``seed``, ``accelerator``, ``devices``, ``enable_progress_bar`` (also of the
            K-means), Trainer keywords.
        """
        if batch_size is not None:
            kwargs["pretrain_batch_size"] = batch_size
        self.train(pretrain="only", pretrain_epochs=max_epochs, **kwargs)

    # -- the stages of train() --------------------------------------------------------------
    @classmethod
    def _extra_plan_classes(cls) -> tuple[type, ...]:
        return (PseudoLabelTrainingPlan,)

    @classmethod
    def _computed_plan_arguments(cls) -> set[str]:
        return {"pseudo_label_heads"}

    def _training_stages(self, options: dict[str, Any]) -> list[TrainingStage]:
        mode, monitor = options["pretrain"], options["early_stopping_monitor"]
        if mode not in ("auto", True, False, "only"):
            raise ValueError(f"pretrain must be 'auto', True, False or 'only', got {mode!r}.")
        if monitor not in _MONITORS:
            raise ValueError(
                f"early_stopping_monitor must be one of {list(_MONITORS)}, got {monitor!r}."
            )
        stages = []
        auto = mode == "auto" and not self.is_pretrained_ and not self._is_query_model
        if mode in (True, "only") or auto:
            if auto:
                logger.info(
                    "SCPRETRAIN: the encoder is not pretrained; pretraining first (pass "
                    "pretrain=False to train from scratch)."
                )
            stages += self._pretraining_stages(options)
        if mode != "only":
            metric, direction = _MONITORS[monitor]
            query = self._is_query_model
            stages.append(
                TrainingStage(
                    "finetune",
                    self._training_plan_cls,
                    max_epochs=200,
                    splitter_kwargs={"include_unlabelled": query},
                    monitor=metric,
                    monitor_mode=direction,
                    early_stopping_patience=20,
                )
            )
        return stages

    def _pretraining_stages(self, options: dict[str, Any]) -> list[TrainingStage]:
        n_phases = options["n_phases"]
        if int(n_phases) != n_phases or n_phases < 1:
            raise ValueError(f"n_phases must be a whole number >= 1, got {n_phases!r}.")
        resolutions = check_resolutions(options["resolutions"])
        if any(not p.requires_grad for p in self.module.encoder.parameters()):
            raise ValueError(
                "The encoder of this query model is frozen by load_query_data; pretrain the "
                "reference model, or load the query with unfrozen=True."
            )
        settings = {
            "batch_size": options["pretrain_batch_size"],
            "resolutions": resolutions,
            "kmeans_kwargs": {
                name.removeprefix("kmeans_"): value
                for name, value in options.items()
                if name.startswith("kmeans_")
            },
            "n_phases": int(n_phases),
        }
        return [
            TrainingStage(
                f"{_PRETRAIN}_{phase}",
                PseudoLabelTrainingPlan,
                max_epochs=_PRETRAIN_EPOCHS,
                epochs_option="pretrain_epochs",
                splitter_kwargs={**settings, "phase": phase},
            )
            for phase in range(1, int(n_phases) + 1)
        ]

    def _stage_data(self, stage: TrainingStage, settings: dict[str, Any]):
        """A phase's pseudo-labels (K-means of every dataset and resolution), its heads
        and the data module of every cell; the model's splitter for fine-tuning."""
        if not stage.name.startswith(_PRETRAIN):
            return super()._stage_data(stage, settings)
        phase, seed = settings["phase"], settings["seed"]
        device = settings["device"]
        self.module.to(device)
        matrix = self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        datasets, names = self._datasets()
        if phase == 1:
            # Expression, log-normalised block by block from the registered matrix; each
            # dataset is one batch, so batch centring would not move its K-means.
            features = matrix
            transform = lambda x: self.module.log_expression(  # noqa: E731
                {REGISTRY_KEYS.X_KEY: x}, centre=False
            )
        else:  # the representation the previous phase learnt
            batch = settings["kmeans_kwargs"]["batch_size"]
            features = self._collect(self.adata, None, batch, {"z": self.module.embed})["z"]
            transform = None
        labels, sizes, table = kmeans_pseudo_labels(
            features,
            datasets,
            names,
            settings["resolutions"],
            phase=phase,
            seed=seed,
            transform=transform,
            device=device,
            progress_bar=settings["progress_bar"],
            **settings["kmeans_kwargs"],
        )
        self._pretraining["kmeans"].append(table)
        self._pretraining["labels"][phase] = labels
        with seeded(int(np.random.SeedSequence([seed, phase]).generate_state(1)[0])):
            self._pretrain_heads = PseudoLabelHeads(self.module.n_latent, sizes)
        return PseudoLabelDataModule(
            matrix,
            datasets,
            labels,
            batch_size=settings["batch_size"],
            seed=seed,
            batch_codes=self._batch_codes(),
        )

    def _stage_plan_kwargs(self, stage: TrainingStage, datamodule) -> dict[str, Any]:
        if stage.name.startswith(_PRETRAIN):
            return {"pseudo_label_heads": self._pretrain_heads}
        # A query without labelled cells adapts its head by entropy minimisation (TENT).
        if self._is_query_model and len(datamodule.labelled_train_idx) == 0:
            return {"entropy_weight": 1.0}
        return {}

    def _run_stage(self, stage: TrainingStage, **kwargs) -> None:
        """Run a stage; a pretraining phase uses every cell (no validation, so no early
        stopping nor weight restoring) and leaves the fine-tuning's record as it was."""
        if not stage.name.startswith(_PRETRAIN):
            super()._run_stage(stage, **kwargs)
            return
        kept = {name: getattr(self, name, None) for name in _FIT_RECORD}
        # What the K-means needs: the device, and whether to show its progress.
        device = parse_device_args(kwargs["accelerator"], kwargs["devices"], "torch")[2]
        progress_bar = kwargs["trainer_kwargs"].get("enable_progress_bar", True)
        kwargs["datasplitter_kwargs"] = {
            **kwargs["datasplitter_kwargs"],
            "device": device,
            "progress_bar": progress_bar,
        }
        tic = time.perf_counter()
        if stage.splitter_kwargs["phase"] == 1:
            # Started with the phase's timer, so the total covers every phase's seconds.
            self._pretraining = dict(start=tic, seconds=0.0, loss=[], kmeans=[], labels={})
        super()._run_stage(
            stage, **{**kwargs, "early_stopping": False, "restore_best_weights": False}
        )
        self._record_phase(stage.splitter_kwargs, time.perf_counter() - tic)
        for name, value in kept.items():
            setattr(self, name, value)

    def _record_phase(self, settings: dict[str, Any], seconds: float) -> None:
        """Keep a phase's curves and times; after the last phase, the pretraining's."""
        record, phase = self._pretraining, settings["phase"]
        curves = {
            key: frame.to_numpy(dtype=float).reshape(-1)
            for key, frame in self.history_.items()
            if key == "train_loss" or key.endswith("_train")
        }
        epochs = np.arange(len(curves["train_loss"]))
        record["loss"].append(pd.DataFrame({"phase": phase, "epoch": epochs, **curves}))
        record["seconds"] += seconds
        logger.info(
            "SCPRETRAIN pretraining phase %d: %.1f s (K-means %.1f s), loss %.3f -> %.3f",
            *(phase, seconds, record["kmeans"][-1]["seconds"].sum()),
            *(curves["train_loss"][0], curves["train_loss"][-1]),
        )
        if phase < settings["n_phases"]:
            return
        kmeans = pd.concat(record["kmeans"], ignore_index=True)
        self.pseudo_labels_ = record["labels"]
        self.pretrain_history_ = {
            "loss": pd.concat(record["loss"], ignore_index=True),
            "kmeans": kmeans,
            "kmeans_seconds": float(kmeans["seconds"].sum()),
            "train_seconds": record["seconds"] - float(kmeans["seconds"].sum()),
            "total_seconds": time.perf_counter() - record["start"],
        }
        self.is_pretrained_ = True
        self._pretraining = None

    def _datasets(self) -> tuple[np.ndarray, list[str]]:
        """Dataset (batch) index of each cell, 0..D-1 over the batches present."""
        codes = self._batch_codes()
        present = np.unique(codes)
        names = [str(self.registration.batches[c]) for c in present]
        return np.searchsorted(present, codes), names

    # -- representation and evaluation --------------------------------------------------------
    def get_latent_representation(
        self,
        adata: AnnData | MuData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        gene_column: str | None = None,
    ) -> np.ndarray:
        """The encoder's representation of each cell, ``(n_cells, n_latent)``.

        Available after pretraining alone (the representation scPretrain gives to
        classic classifiers, see :func:`celltyper.tl.classic_classifier`); arguments as
        in :meth:`predict`.
        """
        if not self.is_pretrained_:
            return super().get_latent_representation(adata, indices, batch_size, gene_column)
        with self._model_data(adata, gene_column=gene_column) as data:
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
