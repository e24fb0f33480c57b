"""Calibrated confidence and novelty flags, shared by every celltyper model."""

from __future__ import annotations

import warnings
from typing import Any, Literal

import numpy as np
import torch
from scipy.special import softmax
from scvi import REGISTRY_KEYS

from celltyper._utils._confidence import (
    class_gaussians,
    energy_score,
    fit_temperature,
    knn_distance_score,
    knn_index,
    mahalanobis_score,
    max_probability_score,
    precision_factor,
    shift_adapted_thresholds,
)

NoveltyMethod = Literal["max_probability", "energy", "knn_distance", "mahalanobis"]
NOVELTY_METHODS: tuple[str, ...] = ("max_probability", "energy", "knn_distance", "mahalanobis")
DEFAULT_NOVELTY_METHOD: NoveltyMethod = "mahalanobis"
DEFAULT_NOVELTY_QUANTILE = 0.95
#: What calibration stores on the model; a query model starts from its reference's.
CALIBRATION_ATTRIBUTES = (
    "temperature_",
    "novelty_method_",
    "novelty_threshold_",
    "novelty_reference_",
)
#: Labelled reference cells kept (at random) for the latent novelty scores.
MAX_REFERENCE_CELLS = 10_000
#: Held-out labelled cells below which the temperature is not fitted.
MIN_CALIBRATION_CELLS = 20


class ConfidenceMixin:
    """Temperature-scaled probabilities and novelty scores with a shift-aware threshold.

    After training, :meth:`calibrate_confidence` fits a temperature on held-out labelled
    reference cells and :meth:`calibrate_novelty` sets the novelty threshold on them;
    both are stored with the model.
    """

    #: Divides the logits before the softmax (1: uncalibrated, as models saved before).
    temperature_: float = 1.0
    novelty_method_: str = DEFAULT_NOVELTY_METHOD
    novelty_threshold_: float | None = None
    #: Arrays the latent scores and the threshold adaptation need (see calibrate_novelty).
    novelty_reference_: dict[str, Any] | None = None

    # -- per-minibatch outputs ----------------------------------------------------------
    def _logits(self, tensors) -> torch.Tensor:
        return self.module.classify(tensors)

    def _probabilities(self, tensors) -> torch.Tensor:
        return torch.softmax(self._logits(tensors) / self.temperature_, dim=-1)

    @staticmethod
    def _minibatch_batch_codes(tensors) -> torch.Tensor:
        batch = tensors.get(REGISTRY_KEYS.BATCH_KEY)
        n = len(next(iter(tensors.values())))
        return torch.zeros(n) if batch is None else batch.reshape(n, -1)[:, 0]

    def _scores(self, tensors) -> dict[str, torch.Tensor]:
        """Logits, latent and batch code of a minibatch, the encoder run once."""
        self._logits_available()
        z, logits = self.module.embed_and_classify(tensors)
        return {"logits": logits, "z": z, "batch": self._minibatch_batch_codes(tensors)}

    def _logits_available(self) -> None:
        """Raise when the model has no classifier to score with (none by default)."""
        return None

    def _scoring_outputs(self, data, indices, batch_size) -> dict[str, np.ndarray]:
        """Logits, latent and batch code of the cells, in one pass."""
        return self._collect(data, indices, batch_size, {"scores": self._scores})

    # -- held-out cells -----------------------------------------------------------------
    def _validation_labelled(self) -> np.ndarray:
        """Labelled validation cells of the last ``train()`` (possibly none)."""
        labelled = self._label_codes() < len(self.cell_types)
        held_out = getattr(self, "validation_indices", None)
        held_out = np.asarray([] if held_out is None else held_out, dtype=int)
        return held_out[labelled[held_out]]

    def _held_out_labelled(self) -> tuple[np.ndarray, np.ndarray]:
        """Labelled validation cells and labelled training cells (both the training
        cells, with a warning, when fewer than 10 are held out)."""
        labelled = np.flatnonzero(self._label_codes() < len(self.cell_types))
        held_out = self._validation_labelled()
        training = np.setdiff1d(labelled, held_out)
        if len(held_out) < 10:
            warnings.warn(
                "Fewer than 10 held-out labelled reference cells; calibrating the novelty "
                "threshold on labelled training cells, which makes it optimistic.",
                UserWarning,
                stacklevel=3,
            )
            held_out = training = labelled
        if len(held_out) == 0:
            raise ValueError("No labelled reference cell to calibrate the novelty threshold.")
        return held_out, training

    # -- calibration --------------------------------------------------------------------
    def calibrate_confidence(self, batch_size: int | None = None) -> float:
        """Fit the softmax temperature on held-out labelled reference cells.

        Temperature scaling leaves every prediction unchanged and makes the confidence
        (the highest probability) match the accuracy on cells like the reference's.
        ``train()`` calls it; fewer than :data:`MIN_CALIBRATION_CELLS` held-out cells
        keep the temperature at 1 (the training cells would make it overconfident).

        Returns
        -------
        The temperature, also stored as ``temperature_``.
        """
        held_out = self._validation_labelled()
        if len(held_out) < MIN_CALIBRATION_CELLS:
            self.temperature_ = 1.0
            return self.temperature_
        logits = self._collect(self.adata, held_out, batch_size, {"l": self._logits})["l"]
        self.temperature_ = fit_temperature(logits, self._label_codes()[held_out])
        return self.temperature_

    def calibrate_novelty(
        self,
        quantile: float = DEFAULT_NOVELTY_QUANTILE,
        method: NoveltyMethod | None = None,
        batch_size: int | None = None,
    ) -> float:
        """Set the novelty score and its threshold from held-out labelled reference cells.

        Parameters
        ----------
        quantile
            The threshold is this quantile of the held-out cells' scores: with 0.95, about
            5 % of cells like the reference's are flagged. On a query batch whose cells
            all score higher (another technology or condition), the threshold follows
            the batch's bulk (see :meth:`annotation_table`).
        method
            ``"max_probability"`` (1 - the highest calibrated probability), ``"energy"``
            (of the calibrated logits), ``"knn_distance"`` (mean latent distance to the
            15 nearest labelled reference cells) or ``"mahalanobis"`` (to the closest
            cell type's Gaussian in the latent space); ``None`` keeps the model's.
        batch_size
            Minibatch size.

        Returns
        -------
        The threshold, also stored as ``novelty_threshold_``.
        """
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"quantile must be in (0, 1), got {quantile}.")
        method = self.novelty_method_ if method is None else method
        if method not in NOVELTY_METHODS:
            raise ValueError(f"method must be one of {list(NOVELTY_METHODS)}, got {method!r}.")
        held_out, training = self._held_out_labelled()
        rng = np.random.default_rng(0)
        if len(training) > MAX_REFERENCE_CELLS:
            training = np.sort(rng.choice(training, MAX_REFERENCE_CELLS, replace=False))
        codes = self._label_codes()
        latent = self._collect(self.adata, training, batch_size, {"z": self.module.embed})["z"]
        means, precision = class_gaussians(latent, codes[training], len(self.cell_types))
        self.novelty_method_ = method
        self.novelty_reference_ = {"latent": latent, "means": means, "precision": precision}
        outputs = self._scoring_outputs(self.adata, held_out, batch_size)
        scores = self.novelty_score(outputs["logits"], outputs["z"])
        self.novelty_reference_["held_out_scores"] = scores.astype(np.float32)
        self.novelty_threshold_ = float(np.quantile(scores, quantile))
        return self.novelty_threshold_

    # -- scores -------------------------------------------------------------------------
    def novelty_score(self, logits: np.ndarray, latent: np.ndarray) -> np.ndarray:
        """Per-cell novelty score (higher: less like the labelled reference), by the
        model's ``novelty_method_`` (see :meth:`calibrate_novelty`)."""
        method = self.novelty_method_
        reference = self.novelty_reference_
        if method == "max_probability":
            return max_probability_score(softmax(logits / self.temperature_, axis=1))
        if method == "energy":
            return energy_score(logits / self.temperature_)
        if reference is None:
            raise ValueError(f"novelty method {method!r} needs calibrate_novelty() first.")
        if method == "knn_distance":
            index = self._reference_cache("knn", reference["latent"], knn_index)
            return knn_distance_score(latent, reference["latent"], index=index)
        factor = self._reference_cache("factor", reference["precision"], precision_factor)
        return mahalanobis_score(latent, reference["means"], reference["precision"], factor)

    def _reference_cache(self, name: str, array: np.ndarray, build) -> Any:
        """``build(array)``, kept while the model holds this very ``array`` (computed once
        for the chunks of an annotation and for later calls; calibrating again or loading
        another reference replaces the array, so the cache follows)."""
        cache = self.__dict__.setdefault("_novelty_cache", {})
        held = cache.get(name)
        if held is None or held[0] is not array:
            held = cache[name] = (array, build(array))
        return held[1]

    def _novelty_thresholds(
        self, scores: np.ndarray, batches: np.ndarray, novelty_threshold: float | None
    ) -> np.ndarray:
        """Each cell's threshold: the user's, as given, or the calibrated one, moved per
        batch by the batch's shift from the held-out reference cells."""
        if novelty_threshold is not None:
            return np.full(len(scores), float(novelty_threshold))
        if self.novelty_threshold_ is None:
            warnings.warn(
                "No calibrated novelty threshold (train the model, or call "
                "calibrate_novelty()); using 0.5.",
                UserWarning,
                stacklevel=4,
            )
            return np.full(len(scores), 0.5)
        reference = self.novelty_reference_ or {}
        if "held_out_scores" not in reference:  # saved before the threshold adapted
            return np.full(len(scores), float(self.novelty_threshold_))
        return shift_adapted_thresholds(
            scores, batches, self.novelty_threshold_, reference["held_out_scores"]
        )
