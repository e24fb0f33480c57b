"""Prediction, confidence, novelty and representations shared by every celltyper model."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from mudata import MuData
from scipy.special import softmax
from scvi.data._constants import _SCVI_UUID_KEY

from celltyper._utils._clusters import majority_vote, over_cluster

from ._confidence import ConfidenceMixin
from ._data import Registration, build_model_data


class AnnotationMixin(ConfidenceMixin):
    """``predict``, ``annotate``, novelty, latent space and cell-type representations.

    Requires the host model's module to implement the
    :class:`~celltyper.module.CellTyperModule` interface (``embed`` and ``classify``).
    """

    # -- data resolution ----------------------------------------------------------------
    @classmethod
    def _extra_obs_columns(
        cls, registry: dict, obs: pd.DataFrame, *, keep_new_batches: bool, what: str
    ) -> dict[str, np.ndarray]:
        """obs columns a model registers beyond the batch and the labels, for new data.

        New data are rebuilt by :func:`~celltyper.model.base.build_model_data`, which
        carries the batch and label columns; a model registering further obs columns
        returns them here from the user's ``obs`` (none by default).
        """
        return {}

    @classmethod
    def _extra_layers(cls, registry: dict, rna: AnnData, *, what: str) -> dict:
        """Layers a model registers beyond its expression, for new data.

        Like :meth:`_extra_obs_columns` for layers: ``{layer: matrix}`` read from the
        user's expression AnnData ``rna`` (in its own genes; they are aligned to the
        model's). None by default.
        """
        return {}

    @property
    def registration(self) -> Registration:
        """Genes, batches and cell types of the data the model was set up with."""
        return Registration.from_registry(self.registry_)

    @property
    def cell_types(self) -> list[str]:
        """Reference cell types, in the order of the classifier's outputs."""
        return [str(c) for c in self.registration.cell_types]

    @contextmanager
    def _model_data(
        self,
        adata: AnnData | MuData | None,
        what: str = "adata",
        gene_column: str | None = None,
    ) -> Iterator:
        """The registered object to compute on; new data get a temporary aligned copy
        (aligned on ``var[gene_column]`` when given)."""
        if adata is None or adata is self.adata:
            yield self.adata
            return
        internal = build_model_data(
            adata,
            self.registration,
            input_kind=self.input_kind_,
            model_name=type(self).__name__,
            min_gene_overlap=getattr(self, "min_gene_overlap_", 0.5),
            what=what,
            extra_columns=partial(
                self._extra_obs_columns, self.registry_, keep_new_batches=False, what=what
            ),
            gene_column=gene_column,
            extra_layers=partial(self._extra_layers, self.registry_, what=what),
        )
        self._validate_anndata(internal)
        try:
            yield internal
        finally:
            # Do not let registrations of temporary objects pile up in the model.
            uuid = internal.uns.get(_SCVI_UUID_KEY)
            self._per_instance_manager_store.get(self.id, {}).pop(uuid, None)
            self._setup_adata_manager_store.pop(uuid, None)

    def _collect(
        self,
        data,
        indices: Sequence[int] | None,
        batch_size: int | None,
        outputs: dict[str, Callable],
    ) -> dict[str, np.ndarray]:
        """Run ``outputs`` (name -> f(tensors)) over minibatches, module in eval mode."""
        loader = self._make_data_loader(adata=data, indices=indices, batch_size=batch_size)
        collected: dict[str, list] = {name: [] for name in outputs}
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.inference_mode():
                for tensors in loader:
                    for name, fn in outputs.items():
                        collected[name].append(fn(tensors).detach().cpu().numpy())
        finally:
            self.module.train(was_training)
        return {name: np.concatenate(parts) for name, parts in collected.items()}

    # -- public API ---------------------------------------------------------------------
    def get_latent_representation(
        self,
        adata: AnnData | MuData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        gene_column: str | None = None,
    ) -> np.ndarray:
        """Latent representation of each cell, ``(n_cells, n_latent)``.

        Parameters
        ----------
        adata
            Data to embed (genes aligned to the model's); ``None`` uses the model's data.
        indices
            Positions of the cells to embed; ``None`` embeds all.
        batch_size
            Minibatch size; defaults to ``scvi.settings.batch_size``.
        gene_column
            A ``var`` column of ``adata`` with gene names of the model's kind, aligned on
            instead of ``var_names`` (see :meth:`predict`).
        """
        self._check_if_trained(warn=True)
        with self._model_data(adata, gene_column=gene_column) as data:
            out = self._collect(data, indices, batch_size, {"z": self.module.embed})
        return out["z"]

    def predict(
        self,
        adata: AnnData | MuData | None = None,
        indices: Sequence[int] | None = None,
        soft: bool = False,
        batch_size: int | None = None,
        gene_column: str | None = None,
    ) -> np.ndarray | pd.DataFrame:
        """Predicted cell type of each cell.

        Parameters
        ----------
        adata
            Data to annotate; ``None`` uses the model's data.
        indices
            Positions of the cells to predict; ``None`` predicts all.
        soft
            Return the probabilities: a DataFrame with one column per reference cell type,
            indexed by ``obs_names``.
        batch_size
            Minibatch size.
        gene_column
            A column of ``adata.var`` holding gene names of the kind the model was trained
            on, to align on instead of ``adata.var_names``: e.g. ``"gene_ids"`` when the
            model knows Ensembl IDs and ``adata`` is indexed by symbols. ``adata`` is not
            changed.

        Returns
        -------
        An array of cell-type names, or the probability DataFrame when ``soft=True``.
        """
        self._check_if_trained(warn=True)
        with self._model_data(adata, gene_column=gene_column) as data:
            probs = self._collect(data, indices, batch_size, {"p": self._probabilities})["p"]
            names = _obs_names(data, indices)
        if soft:
            return pd.DataFrame(probs, index=names, columns=self.cell_types)
        return np.asarray(self.cell_types, dtype=object)[probs.argmax(axis=1)]

    def annotation_table(
        self,
        adata: AnnData | MuData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        novelty_threshold: float | None = None,
        majority_voting: bool = False,
        gene_column: str | None = None,
    ) -> pd.DataFrame:
        """Prediction, confidence, novelty score and novelty flag of each cell.

        Parameters
        ----------
        adata
            Data to annotate; ``None`` uses the model's data.
        indices
            Positions of the cells; ``None`` uses all.
        batch_size
            Minibatch size.
        novelty_threshold
            Cells whose novelty score exceeds it are flagged novel. By default, the
            threshold calibrated on held-out reference cells (``novelty_threshold_``),
            raised for each batch of at least 50 cells by the shift of its bulk from
            those cells: a query from another technology scores higher as a whole, and
            the flag is for types the reference lacks, not for another batch.
        majority_voting
            Also over-cluster these cells' latent space (Leiden on its neighbour graph,
            through scanpy) and give each cluster its most frequent prediction, as
            CellTypist does: columns ``over_clustering`` and ``majority_voting``.
        gene_column
            A ``var`` column of ``adata`` with gene names of the model's kind, aligned on
            instead of ``var_names`` (see :meth:`predict`).

        Returns
        -------
        DataFrame indexed by ``obs_names`` with columns ``prediction``, ``confidence``
        (the highest class probability, temperature-calibrated), ``novelty`` (the score
        of ``novelty_method_``, see :meth:`calibrate_novelty`) and ``novel``, then the
        majority-voting columns when asked for.
        """
        table, _ = self._annotation_outputs(
            adata, indices, batch_size, novelty_threshold, majority_voting, gene_column
        )
        return table

    def _annotation_outputs(
        self,
        adata,
        indices,
        batch_size,
        novelty_threshold,
        majority_voting=False,
        gene_column=None,
    ):
        self._check_if_trained(warn=True)
        with self._model_data(adata, gene_column=gene_column) as data:
            out = self._scoring_outputs(data, indices, batch_size)
            names = _obs_names(data, indices)
        probs = softmax(out["logits"] / self.temperature_, axis=1)
        latent = out["z"]
        novelty = self.novelty_score(out["logits"], latent)
        threshold = self._novelty_thresholds(novelty, out["batch"], novelty_threshold)
        table = pd.DataFrame(
            {
                "prediction": pd.Categorical(
                    np.asarray(self.cell_types, dtype=object)[probs.argmax(axis=1)],
                    categories=self.cell_types,
                ),
                "confidence": probs.max(axis=1),
                "novelty": novelty,
                "novel": novelty > threshold,
            },
            index=names,
        )
        if majority_voting:
            clusters = over_cluster(latent)
            voted = majority_vote(table["prediction"].astype(str).to_numpy(), clusters)
            table["over_clustering"] = pd.Categorical(clusters)
            table["majority_voting"] = pd.Categorical(voted, categories=self.cell_types)
        return table, latent

    def annotate(
        self,
        adata: AnnData | MuData | None = None,
        key_added: str | None = None,
        overwrite: bool = False,
        novelty_threshold: float | None = None,
        batch_size: int | None = None,
        majority_voting: bool = False,
        gene_column: str | None = None,
    ) -> pd.DataFrame:
        """Write predictions, confidence, novelty and the latent space into ``adata``.

        Writes ``obs[key]`` (predicted cell type), ``obs[key + "_confidence"]``,
        ``obs[key + "_novelty"]`` (score), ``obs[key + "_novel"]`` (bool) and
        ``obsm["X_" + key]``; with ``majority_voting``, also
        ``obs[key + "_over_clustering"]`` and ``obs[key + "_majority_voting"]``. Nothing
        else in ``adata`` changes.

        Parameters
        ----------
        adata
            The object to annotate; ``None`` annotates the model's data (for a model from
            :meth:`load_query_data`, pass your query object to annotate it).
        key_added
            Column prefix; defaults to the model name in lower case (``"scnym"``), so that
            several models can annotate one object side by side.
        overwrite
            Replace existing columns instead of raising.
        novelty_threshold
            Overrides the calibrated threshold.
        batch_size
            Minibatch size.
        majority_voting
            Refine the labels by clusters, as in :meth:`annotation_table`.
        gene_column
            A ``var`` column of ``adata`` with gene names of the model's kind, aligned on
            instead of ``var_names`` (see :meth:`predict`); ``var`` is not changed.

        Returns
        -------
        The table written to ``obs`` (see :meth:`annotation_table`).
        """
        target = self.adata if adata is None else adata
        key = key_added or type(self).__name__.lower()
        obs_keys = [key, f"{key}_confidence", f"{key}_novelty", f"{key}_novel"]
        if majority_voting:
            obs_keys += [f"{key}_over_clustering", f"{key}_majority_voting"]
        obsm_key = f"X_{key}"
        existing = [k for k in obs_keys if k in target.obs.columns]
        existing += [obsm_key] if obsm_key in target.obsm else []
        if existing and not overwrite:
            raise ValueError(
                f"annotate() would overwrite {existing}; pass overwrite=True or another key_added."
            )
        table, latent = self._annotation_outputs(
            adata, None, batch_size, novelty_threshold, majority_voting, gene_column
        )
        if len(table) != target.n_obs:
            raise ValueError("Internal error: prediction count does not match the cells.")
        for column, values in zip(obs_keys, table.columns, strict=True):
            target.obs[column] = table[values].to_numpy()
        target.obs[key] = pd.Categorical(table["prediction"].to_numpy(), self.cell_types)
        target.obsm[obsm_key] = latent
        return table

    # -- cell-type representations ------------------------------------------------------
    def get_cell_type_representations(
        self,
        method: Literal["centroid", "median", "medoid"] = "centroid",
        adata: AnnData | MuData | None = None,
        labels_key: str | None = None,
        batch_size: int | None = None,
    ) -> pd.DataFrame:
        """One latent vector per cell type.

        Parameters
        ----------
        method
            ``"centroid"`` (mean), ``"median"`` (per dimension) or ``"medoid"`` (the cell
            with the smallest summed Euclidean distance to the others of its type).
        adata
            Data to summarise; ``None`` uses the labelled cells of the model's data.
        labels_key
            Column of ``adata.obs`` grouping the cells; ``None`` uses the reference labels
            for the model's data and the model's predictions for other data.
        batch_size
            Minibatch size.

        Returns
        -------
        DataFrame, cell types x latent dimensions.
        """
        if method not in ("centroid", "median", "medoid"):
            raise ValueError(f"method must be centroid, median or medoid, got {method!r}.")
        latent = self.get_latent_representation(adata, batch_size=batch_size)
        groups = self._representation_groups(adata, labels_key, batch_size)
        keep = pd.notna(groups)
        latent, groups = latent[keep], np.asarray(groups[keep]).astype(str)
        if len(groups) == 0:
            raise ValueError("No labelled cell to summarise.")
        rows = {}
        for cell_type in pd.unique(groups):
            members = latent[groups == cell_type]
            rows[cell_type] = _summarise(members, method)
        columns = [f"latent_{i}" for i in range(latent.shape[1])]
        return pd.DataFrame.from_dict(rows, orient="index", columns=columns)

    def _representation_groups(self, adata, labels_key, batch_size) -> np.ndarray:
        target = self.adata if adata is None else adata
        if labels_key is not None:
            if labels_key not in target.obs.columns:
                raise KeyError(f"labels_key={labels_key!r} is not a column of adata.obs.")
            groups = target.obs[labels_key].astype(object).to_numpy()
            unlabeled = self.registration.unlabeled_category
            return np.where(groups == unlabeled, None, groups)
        if adata is None:
            return self._registered_labels()
        return self.predict(adata, batch_size=batch_size)


def _obs_names(data: AnnData | MuData, indices: Sequence[int] | None) -> pd.Index:
    names = data.obs_names
    return names if indices is None else names[np.asarray(indices)]


def _summarise(members: np.ndarray, method: str) -> np.ndarray:
    if method == "centroid":
        return members.mean(axis=0)
    if method == "median":
        return np.median(members, axis=0)
    members = members.astype(np.float64)
    squared = (members**2).sum(axis=1)
    totals = np.zeros(len(members))
    # Chunked so that large cell types never need the full n x n distance matrix.
    for start in range(0, len(members), 1024):
        block = members[start : start + 1024]
        d2 = squared[start : start + 1024, None] + squared[None, :] - 2.0 * block @ members.T
        totals[start : start + 1024] = np.sqrt(np.maximum(d2, 0.0)).sum(axis=1)
    return members[int(np.argmin(totals))]
