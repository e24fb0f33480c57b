"""CELLULAR: contrastive learning for robust cell annotation (Andrekson & Mercado)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from anndata import AnnData
from mudata import MuData
from scipy import linalg, sparse
from scvi import REGISTRY_KEYS
from sklearn.decomposition import PCA, IncrementalPCA

from celltyper._utils import (
    dense_float32,
    is_in_memory,
    iter_row_chunks,
    log1p_scaled_counts,
    row_totals,
)
from celltyper.data import LabelledUnlabelledSplitter
from celltyper.module import CELLULARModule
from celltyper.train import (
    ClassifierHeadTrainingPlan,
    ContrastiveTrainingPlan,
    JointClassifierTrainingPlan,
)

from .base import (
    BatchCenteringMixin,
    CellTyperModel,
    TrainingStage,
    UnmeasuredGenesMixin,
    seeded,
)

logger = logging.getLogger(__name__)

#: Largest number of principal components of the centroid-distance target.
MAX_PCA_COMPONENTS = 100


def centroid_distances(x: np.ndarray, labels: np.ndarray, n_labels: int, seed: int = 0):
    """Euclidean distances between cell-type centroids in the PCA of ``x``.

    Uses ``min(100, n_cells - 1, n_genes)`` components. Types without a cell get distance
    0 (they never enter the loss, which only compares types present in a minibatch).
    """
    n_components = min(MAX_PCA_COMPONENTS, x.shape[0] - 1, x.shape[1])
    scores = PCA(n_components=n_components, random_state=seed).fit_transform(x)
    centroids = np.zeros((n_labels, n_components))
    for code in np.unique(labels):
        centroids[code] = scores[labels == code].mean(axis=0)
    return _pairwise_distances(centroids, np.isin(np.arange(n_labels), labels))


def _pairwise_distances(centroids: np.ndarray, present: np.ndarray) -> np.ndarray:
    diff = centroids[:, None, :] - centroids[None, :, :]
    distances = np.sqrt((diff**2).sum(axis=-1))
    return distances * (present[:, None] & present[None, :])


#: Widest input whose covariance (float64, features x features) the streamed PCA keeps;
#: wider inputs use scikit-learn's ``IncrementalPCA``.
MAX_COVARIANCE_FEATURES = 4096


def streamed_centroid_distances(
    blocks: Iterable[tuple[int, int, np.ndarray]],
    labels: np.ndarray,
    n_labels: int,
    n_features: int,
    max_covariance_features: int = MAX_COVARIANCE_FEATURES,
) -> np.ndarray:
    """:func:`centroid_distances` of data read block by block (a matrix on disk).

    The centroids are the class means of the inputs, projected on the principal axes
    (the PCA is linear), so only the axes need the data. Up to
    ``max_covariance_features`` columns, they are the top eigenvectors of the covariance
    summed over the blocks (exact: the axes of a full PCA; the in-memory
    :func:`centroid_distances` uses a randomized one, so the distances agree closely, not
    bit for bit); wider data go through scikit-learn's ``IncrementalPCA`` on batches of
    at least ``5 x`` the components.

    Parameters
    ----------
    blocks
        ``(start, stop, x)``: dense rows ``start:stop`` of the cells, in order.
    labels
        Label code of every cell.
    n_labels
        Number of classes.
    n_features
        Columns of the data.
    max_covariance_features
        Widest data whose covariance is kept.
    """
    n_cells = len(labels)
    n_components = min(MAX_PCA_COMPONENTS, n_cells - 1, n_features)
    use_covariance = n_features <= max_covariance_features
    if use_covariance:
        gram = np.zeros((n_features, n_features))
    else:
        pca = IncrementalPCA(n_components=n_components)
        step = max(5 * n_components, 1024)
        # Batch ends: the last batch holds at least n_components cells.
        ends = list(range(step, n_cells, step))
        if ends and n_cells - ends[-1] < n_components:
            ends.pop()
        ends.append(n_cells)
        pending: list[np.ndarray] = []
        fitted = 0
    sums = np.zeros((n_labels, n_features))
    for start, stop, x in blocks:
        sums += _class_sums(x, labels[start:stop], n_labels)
        if use_covariance:
            x64 = np.asarray(x, dtype=np.float64)
            gram += x64.T @ x64
            continue
        pending.append(x)
        while ends and stop >= ends[0]:
            batch = np.concatenate(pending)
            take = ends.pop(0) - fitted
            pca.partial_fit(batch[:take])
            pending = [batch[take:]]
            fitted += take
    counts = np.bincount(labels, minlength=n_labels)
    means = sums / np.maximum(counts, 1)[:, None]
    if use_covariance:
        mean = sums.sum(axis=0) / n_cells
        covariance = gram / n_cells - np.outer(mean, mean)
        _, axes = linalg.eigh(
            covariance, subset_by_index=[n_features - n_components, n_features - 1]
        )
    else:
        mean, axes = pca.mean_, pca.components_.T
    centroids = (means - mean) @ axes
    return _pairwise_distances(centroids, counts > 0)


def _class_sums(x: np.ndarray, labels: np.ndarray, n_labels: int) -> np.ndarray:
    indicator = sparse.csr_matrix(
        (np.ones(len(labels)), (labels, np.arange(len(labels)))), shape=(n_labels, len(labels))
    )
    return np.asarray(indicator @ x, dtype=np.float64)


class CELLULAR(UnmeasuredGenesMixin, BatchCenteringMixin, CellTyperModel):
    """CELLULAR: a contrastively trained embedding with a classifier on top.

    Two stages, both run by :meth:`train`. Stage 1 trains an encoder (genes -> 1000 -> 500
    -> 100, LayerNorm, no batch input) on labelled reference cells with three losses: a
    supervised soft-nearest-neighbour loss that pulls cells of a type together
    (learnable temperature in [0.1, 1]), a batch-mixing loss that makes the batches of a
    cell type indistinguishable, and a centroid-distance loss that keeps the layout of
    cell-type centroids seen in the PCA of the input. Stage 2 trains a classifier
    (BatchNorm, 2 x 512, dropout 0.2) on the frozen embedding with class-weighted
    cross-entropy. Input: ``log1p(x / total * mean_total)``, ``mean_total`` being the mean
    total counts of the labelled reference cells, computed once; raw counts are normalised
    by the module minibatch by minibatch, log-normalised data are used as they are.

    Parameters
    ----------
    adata
        AnnData or MuData registered with :meth:`setup_anndata` / :meth:`setup_mudata`.
    n_latent
        Dimension of the embedding.
    n_hidden
        Widths of the encoder's hidden layers.
    dropout_rate
        Dropout of the encoder and the classifier.
    classifier_hidden
        Width of the classifier's two hidden layers.
    batch_centering
        Centre each cell's log-expression on the mean of its batch (every registered cell
        of the batch, labelled or not) before the encoder. Removes a shift shared by a
        whole batch, such as a stimulation or a technology; ``True`` needs ``batch_key``
        with 2 or more batches, ``"auto"`` (the default) centres when there are. The
        encoder keeps no batch input: a query's new batches are centred on their own
        means in :meth:`load_query_data`, or when the query is registered and trained
        with the reference (as ``celltyper annotate`` does). The published method has no
        such step; measured on every benchmark task, it lifts Kang control ->
        stimulated from 0.725 to 0.781 balanced accuracy and keeps the others within
        their seed spread (see the docs page).
    skip_unmeasured_genes
        Whether the encoder leaves out genes that some batch did not measure (zero in all
        its cells where the other batches predict 10 or more counts, as with a smaller
        gene panel filled with zeros; see :attr:`unread_genes`). Their zeros would tell
        the encoder the batch.
    seed
        Seed of the weight initialisation, of the PCA and the default seed of :meth:`train`.

    Notes
    -----
    :meth:`train` (shared by every model) runs two stages, each up to 50 epochs with
    early stopping after 10 without improvement (best weights restored), minibatches of
    256 cells, 20 % of each labelled type held out, Adam (lr 1e-3, weight decay 5e-5):

    - ``"encoder"``: :class:`~celltyper.train.ContrastiveTrainingPlan` on the labelled
      cells only, early-stopping on the held-out contrastive total; learning rate warmed
      up over 4 epochs (at most half the epochs), then a cosine decay. Its curves are
      kept in ``contrastive_history_`` (``target_loss_train``, ``batch_loss_train``,
      ``centroid_loss_train``, ``temperature_train``, ``validation_loss``, ...).
    - ``"classifier"``: :class:`~celltyper.train.ClassifierHeadTrainingPlan`,
      class-weighted cross-entropy (inverse class frequencies of the labelled training
      cells) on the frozen embedding, early-stopping on the held-out cross-entropy;
      ``history`` holds its curves.

    Its own options: ``classifier_training``, ``"frozen"`` (the default) or ``"joint"``:
    the classifier stage trains encoder and classifier together on the contrastive loss
    plus the cross-entropy (:class:`~celltyper.train.JointClassifierTrainingPlan`), which
    measured no better on Kang control -> stimulated (see the docs page); and
    ``classifier_epochs``, the epochs of the classifier stage (default: ``max_epochs``,
    itself 50 by default). A model from :meth:`load_query_data` runs the classifier stage
    only, frozen, on every query cell: its labelled cells, if any, supervise the head,
    and all of them update its BatchNorm statistics. Hyperparameters, by name or in
    ``plan_kwargs``: those of the plans (``lr``, ``weight_decay``, ``warmup_epochs``, ...)
    and of :meth:`~celltyper.module.CELLULARModule.loss` (``target_weight``,
    ``batch_weight``, ``centroid_weight``, ``batch_temperature``,
    ``classification_weight``, ...).

    Examples
    --------
    >>> import celltyper
    >>> adata = celltyper.datasets.kang_pbmc()
    >>> celltyper.model.CELLULAR.setup_anndata(
    ...     adata, labels_key="cell_type", batch_key="condition"
    ... )
    >>> model = celltyper.model.CELLULAR(adata)
    >>> model.train()
    >>> model.annotate()  # obs["cellular"], ..., obsm["X_cellular"]
    """

    _module_cls = CELLULARModule
    _training_plan_cls = ClassifierHeadTrainingPlan
    _data_splitter_cls = LabelledUnlabelledSplitter
    _input_kind = "log1p"
    _requires_labels = True
    _train_defaults = {"batch_size": 256, "validation_size": 0.2, "early_stopping": True}
    _train_options = {"classifier_training": "frozen", "classifier_epochs": None}

    def __init__(
        self,
        adata: AnnData | MuData,
        n_latent: int = 100,
        n_hidden: Sequence[int] = (1000, 500),
        dropout_rate: float = 0.2,
        classifier_hidden: int = 512,
        batch_centering: bool | Literal["auto"] = "auto",
        skip_unmeasured_genes: bool = True,
        seed: int = 0,
    ):
        super().__init__(adata)
        # Stored resolved, so that a query's new batches cannot switch it on later.
        batch_centering = self._resolved_batch_centering(batch_centering)
        self._init_data_checks(batch_centering)
        is_counts = self.input_kind_ == "counts"
        matrix, codes = self._labelled_reference()
        mean_total = (
            float(self._labelled_totals(matrix).mean()) if is_counts and len(codes) else 1.0
        )
        with seeded(seed):
            self.module = self._module_cls(
                n_input=self.summary_stats.n_vars,
                n_labels=self.n_labels,
                n_latent=n_latent,
                n_hidden=tuple(n_hidden),
                dropout_rate=dropout_rate,
                classifier_hidden=classifier_hidden,
                normalize_counts=is_counts,
                mean_total=mean_total,
            )
        self._init_encoder_genes(skip_unmeasured_genes)
        if batch_centering:
            self._init_batch_centering()
        # A query model is built on unlabelled data; its buffers come from the reference.
        if len(codes) > 1:
            distances = self._centroid_distances(matrix, codes, mean_total, seed)
            self.module.set_pca_centroid_distances(torch.as_tensor(distances))
        self._model_summary_string = (
            f"CELLULAR with encoder {tuple(n_hidden)} -> {n_latent}, classifier 2 x "
            f"{classifier_hidden}, {self.n_labels} cell types, input {self.input_kind_}"
            + self._unread_genes_summary()
        )
        self.init_params_ = self._get_init_params(locals())

    @property
    def _labelled(self) -> np.ndarray:
        """Indices of the registered cells with a reference label."""
        return np.flatnonzero(self._label_codes() < self.n_labels)

    def _labelled_reference(self):
        """Expression matrix and label codes of the labelled registered cells.

        A matrix on disk is returned whole (its labelled rows are read block by block
        where needed); one in memory is subset to the labelled cells.
        """
        labelled = self._labelled
        matrix = self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        if not is_in_memory(matrix):
            return matrix, self._label_codes()[labelled]
        return matrix[labelled], self._label_codes()[labelled]

    def _labelled_totals(self, matrix) -> np.ndarray:
        """Total counts of the labelled cells of :meth:`_labelled_reference`'s matrix."""
        if is_in_memory(matrix):
            return row_totals(matrix)
        blocks = iter_row_chunks(matrix, rows=self._labelled, dense=False)
        return np.concatenate([row_totals(block) for _, _, block in blocks])

    def _centroid_distances(
        self, matrix, codes: np.ndarray, mean_total: float, seed: int
    ) -> np.ndarray:
        """The PCA centroid distances of the labelled cells' model input."""
        is_counts = self.input_kind_ == "counts"
        centering = getattr(self.module, "batch_centering", False)
        batch_codes = self._batch_codes()[self._labelled] if centering else None
        read = self._read_genes().astype(np.float32)

        def model_input(block, start: int, stop: int) -> np.ndarray:
            x = dense_float32(log1p_scaled_counts(block, mean_total) if is_counts else block)
            x = x * read
            if centering:
                x = x - (self._batch_means() * read)[batch_codes[start:stop]]
            return x

        if is_in_memory(matrix):
            return centroid_distances(
                model_input(matrix, 0, len(codes)), codes, self.n_labels, seed
            )

        def inputs():
            for start, stop, block in iter_row_chunks(matrix, rows=self._labelled, dense=False):
                yield start, stop, model_input(block, start, stop)

        return streamed_centroid_distances(
            inputs(), codes, self.n_labels, self.summary_stats.n_vars
        )

    # -- training stages ------------------------------------------------------------------
    def _training_stages(self, options: dict[str, Any]) -> list[TrainingStage]:
        training = options["classifier_training"]
        if training not in ("frozen", "joint"):
            raise ValueError(f"classifier_training must be 'frozen' or 'joint', got {training!r}.")
        query = self._is_query_model
        if training == "joint" and query:
            raise ValueError(
                "classifier_training='joint' trains the encoder, which a query model keeps "
                "frozen (it is the reference's embedding); use 'frozen'."
            )
        head = TrainingStage(
            "classifier",
            JointClassifierTrainingPlan if training == "joint" else self._training_plan_cls,
            max_epochs=50,
            epochs_option="classifier_epochs",
            early_stopping_patience=10,
            # A query's unlabelled cells adapt the head's BatchNorm statistics.
            splitter_kwargs={"include_unlabelled": query},
        )
        if query:  # its encoder is the reference's
            return [head]
        encoder = TrainingStage(
            "encoder",
            ContrastiveTrainingPlan,
            max_epochs=50,
            early_stopping_patience=10,
            # The contrastive losses need a label on every cell.
            splitter_kwargs={"include_unlabelled": False},
            keep_history_as="contrastive_history_",
        )
        return [encoder, head]

    @classmethod
    def _extra_plan_classes(cls) -> tuple[type, ...]:
        return (ContrastiveTrainingPlan, JointClassifierTrainingPlan)

    @classmethod
    def _computed_plan_arguments(cls) -> set[str]:
        return {"class_weights", "use_batches"}

    def _stage_plan_kwargs(self, stage: TrainingStage, datamodule) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"use_batches": self.n_batches > 1}
        if stage.name == "classifier":
            kwargs["class_weights"] = self._class_weights(datamodule.labelled_train_idx)
        return kwargs

    def _class_weights(self, indices: np.ndarray) -> torch.Tensor:
        """Inverse class frequencies of the labelled training cells, mean 1 over cells."""
        counts = np.bincount(self._label_codes()[indices], minlength=self.n_labels)
        weights = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
        if counts.sum():
            weights = weights / (weights * counts).sum() * counts.sum()
        return torch.as_tensor(weights, dtype=torch.float32)


__all__ = ["CELLULAR"]
