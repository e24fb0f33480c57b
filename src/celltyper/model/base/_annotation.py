"""Prediction, confidence, novelty and representations shared by every celltyper model."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from mudata import MuData
from scipy import sparse
from scipy.special import softmax
from scvi import REGISTRY_KEYS
from scvi.data._constants import _SCVI_UUID_KEY

from celltyper._utils import RowSource, dense_tensors
from celltyper._utils._clusters import majority_vote, over_cluster
from celltyper.module._base import SparseRows

from ._confidence import ConfidenceMixin
from ._data import Registration, build_model_data, model_data_source
from ._inference import (
    DEFAULT_INFERENCE_BATCH,
    check_batch_size,
    chunk_rows_for,
    sorted_indices,
    split_minibatches,
)
from ._output import annotation_writer
from ._zero_filled import ZeroFilledGenesMixin


class AnnotationMixin(ZeroFilledGenesMixin, ConfidenceMixin):
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
        chunked: bool = True,
    ) -> Iterator:
        """The cells to compute on, aligned on ``var[gene_column]`` when given.

        With ``chunked`` (the default), a
        :class:`~celltyper.model.base._inference.RowSource` for :meth:`_collect`:
        new data are then read block by block from the user's matrix (in memory or
        ``backed="r"``) and aligned per block, without a copy of the whole matrix
        (:func:`~celltyper.model.base._data.model_data_source`); fields that path does
        not read fall back to the aligned copy. Without, the registered object: the
        model's own, or a temporary aligned copy of new data registered with scvi-tools
        (for code that reads it through scvi-tools' data loaders).
        """
        if adata is None or adata is self.adata:
            yield RowSource.from_manager(self.adata_manager) if chunked else self.adata
            return
        common = {
            "input_kind": self.input_kind_,
            "model_name": type(self).__name__,
            "min_gene_overlap": getattr(self, "min_gene_overlap_", 0.5),
            "what": what,
            "extra_columns": partial(
                self._extra_obs_columns, self.registry_, keep_new_batches=False, what=what
            ),
            "gene_column": gene_column,
        }
        if chunked:
            source = model_data_source(adata, self.registry_, **common)
            if source is not None:
                self._warn_zero_filled_genes(adata, what, gene_column)
                yield source
                return
        internal = build_model_data(
            adata,
            self.registration,
            extra_layers=partial(self._extra_layers, self.registry_, what=what),
            **common,
        )
        self._validate_anndata(internal)
        self._warn_zero_filled_genes(adata, what, gene_column)
        try:
            if chunked:
                yield RowSource.from_manager(self.get_anndata_manager(internal))
            else:
                yield internal
        finally:
            # Do not let registrations of temporary objects pile up in the model.
            uuid = internal.uns.get(_SCVI_UUID_KEY)
            self._per_instance_manager_store.get(self.id, {}).pop(uuid, None)
            self._setup_adata_manager_store.pop(uuid, None)

    #: Cells per module call at inference when the caller gives no ``batch_size``
    #: (memory grows with it: a transformer's attention, for one).
    _inference_batch_size: ClassVar[int] = DEFAULT_INFERENCE_BATCH

    def _chunk_inputs(self, block: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray | None]:
        """The module's inputs for a chunk of cells, read as stored.

        ``block`` maps registry keys to the chunk's rows (matrices dense or scipy
        sparse, obs fields as codes). Returns the inputs, sliced by rows into minibatches
        (tensors, by default every field densified once: what scvi-tools'
        ``AnnDataLoader`` would give; a sparse expression matrix stays sparse, as
        :class:`~celltyper.module._base.SparseRows`, for a module that reads it so),
        and an order of the chunk's cells in which to
        compute them (``None``: as read); the outputs are put back in the read order.
        """
        x = block.get(REGISTRY_KEYS.X_KEY)
        reads_sparse = getattr(self.module, "reads_sparse_rows", None)
        if sparse.issparse(x) and reads_sparse is not None and reads_sparse():
            # The module multiplies the stored entries only: no densification at all.
            tensors = dense_tensors({k: v for k, v in block.items() if k != REGISTRY_KEYS.X_KEY})
            tensors[REGISTRY_KEYS.X_KEY] = SparseRows(sparse.csr_matrix(x, dtype=np.float32))
            return tensors, None
        return dense_tensors(block), None

    def _iter_outputs(
        self,
        data,
        indices: np.ndarray | None,
        batch_size: int | None,
        outputs: dict[str, Callable],
        chunk_size: int | None = None,
    ) -> Iterator[tuple[slice | np.ndarray, dict[str, np.ndarray]]]:
        """``outputs`` (name -> f(module inputs)) chunk by chunk, module in eval mode; an
        ``f`` may also return a dict of named tensors (one pass, several outputs).

        ``data`` is a registered AnnData or a ``RowSource``; ``indices`` increasing
        positions (or ``None``: every cell). Yields each chunk's row selection and its
        outputs as numpy arrays, in row order.
        """
        check_batch_size(batch_size)
        source = data if isinstance(data, RowSource) else self._registered_source(data)
        n_genes = self.summary_stats.n_vars
        chunk = chunk_rows_for(n_genes, chunk_size)
        minibatch = batch_size or self._inference_batch_size
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.inference_mode():
                for rows in source.selectors(indices, chunk):
                    inputs, order = self._chunk_inputs(source.read(rows))
                    parts: dict[str, list] = {}
                    for tensors in split_minibatches(inputs, minibatch):
                        for name, fn in outputs.items():
                            value = fn(tensors)
                            # An output may give several arrays at once: {name: tensor}.
                            named = value if isinstance(value, dict) else {name: value}
                            for key, tensor in named.items():
                                parts.setdefault(key, []).append(tensor.detach().cpu().numpy())
                    values = {name: np.concatenate(p) for name, p in parts.items()}
                    if order is not None:
                        back = np.argsort(order, kind="stable")
                        values = {name: v[back] for name, v in values.items()}
                    yield rows, values
        finally:
            self.module.train(was_training)

    def _registered_source(self, data) -> RowSource:
        manager = self.get_anndata_manager(data, required=True)
        return RowSource.from_manager(manager)

    def _collect(
        self,
        data,
        indices: Sequence[int] | None,
        batch_size: int | None,
        outputs: dict[str, Callable],
        chunk_size: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Run ``outputs`` (name -> f(tensors)) over the cells ``indices`` of ``data`` (a
        registered AnnData or a ``RowSource``), chunk by chunk (see
        :mod:`~celltyper.model.base._inference`); arrays in the order of ``indices``."""
        n_obs = data.n_obs
        positions, back = sorted_indices(indices, n_obs)
        collected: dict[str, list] = {}
        for _, values in self._iter_outputs(data, positions, batch_size, outputs, chunk_size):
            for name, value in values.items():
                collected.setdefault(name, []).append(value)
        result = {}
        for name, parts in collected.items():
            if parts:
                result[name] = np.concatenate(parts)
            else:  # no cell: the shape of one cell's output, with no row
                result[name] = np.zeros((0,), dtype=np.float32)
        if back is not None:
            result = {name: value[back] for name, value in result.items()}
        return result

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
            Cells per module call; ``None``: the model's inference default (large: the
            cells are read in chunks of consecutive rows, also from an AnnData opened
            with ``backed="r"``, which is never densified whole).
        gene_column
            A ``var`` column of ``adata`` with gene names of the model's kind, aligned on
            instead of ``var_names`` (see :meth:`predict`).
        """
        self._check_if_trained(warn=True)
        with self._model_data(adata, gene_column=gene_column, chunked=True) as data:
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
        with self._model_data(adata, gene_column=gene_column, chunked=True) as data:
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
        write_to: str | Path | None = None,
    ) -> pd.DataFrame | Path:
        """Prediction, confidence, novelty score and novelty flag of each cell.

        Parameters
        ----------
        adata
            Data to annotate; ``None`` uses the model's data. An AnnData opened with
            ``backed="r"`` is read chunk by chunk, never whole.
        indices
            Positions of the cells; ``None`` uses all.
        batch_size
            Cells per module call (``None``: the model's inference default).
        novelty_threshold
            Cells whose novelty score exceeds it are flagged novel. By default, the
            threshold calibrated on held-out reference cells (``novelty_threshold_``),
            raised for each batch of at least 50 cells by the shift of its bulk from
            those cells: a query from another technology scores higher as a whole, and
            the flag is for types the reference lacks, not for another batch.
        majority_voting
            Also over-cluster these cells' latent space (Leiden on its neighbour graph,
            through scanpy) and give each cluster its most frequent prediction, as
            CellTypist does: columns ``over_clustering`` and ``majority_voting``. Needs
            every cell's latent in memory: not with ``write_to``.
        gene_column
            A ``var`` column of ``adata`` with gene names of the model's kind, aligned on
            instead of ``var_names`` (see :meth:`predict`).
        write_to
            Write the table to this file as it is computed instead of returning it, so
            that millions of cells need no cells x classes array in memory: ``.csv``
            (the table's columns, indexed by obs name), ``.h5``/``.hdf5`` or ``.zarr``
            (arrays ``obs_names``, ``prediction``, ``confidence``, ``novelty``,
            ``novel`` and ``latent``, cells x latent dimensions). An existing file is
            replaced. Read it back with :func:`~celltyper.model.base.read_annotation`.
            Each chunk's predictions, confidence, novelty and latent are written as they
            are computed; the novelty flags, whose per-batch thresholds need the whole
            query's scores, are written after the last chunk (one score and batch code
            per cell are kept in memory meanwhile).

        Returns
        -------
        DataFrame indexed by ``obs_names`` with columns ``prediction``, ``confidence``
        (the highest class probability, temperature-calibrated), ``novelty`` (the score
        of ``novelty_method_``, see :meth:`calibrate_novelty`) and ``novel``, then the
        majority-voting columns when asked for. With ``write_to``, the path written.
        """
        if write_to is not None and majority_voting:
            raise ValueError(
                f"majority_voting=True needs every cell's latent in memory; it cannot be "
                f"combined with write_to={str(write_to)!r}. Annotate in memory, or vote on "
                "the written latent yourself."
            )
        table, _ = self._annotation_outputs(
            adata,
            indices,
            batch_size,
            novelty_threshold,
            majority_voting,
            gene_column,
            write_to=write_to,
        )
        return table

    def _score_chunk(self, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Prediction code, confidence, novelty, latent and batch of a chunk's cells."""
        probs = softmax(out["logits"] / self.temperature_, axis=1)
        return {
            "code": probs.argmax(axis=1),
            "confidence": probs.max(axis=1),
            "novelty": self.novelty_score(out["logits"], out["z"]),
            "latent": out["z"],
            "batch": out["batch"],
        }

    def _annotation_outputs(
        self,
        adata,
        indices,
        batch_size,
        novelty_threshold,
        majority_voting=False,
        gene_column=None,
        write_to: str | Path | None = None,
    ):
        self._check_if_trained(warn=True)
        outputs = {"scores": self._scores}
        with self._model_data(adata, gene_column=gene_column, chunked=True) as source:
            positions, back = sorted_indices(indices, source.n_obs)
            names = _obs_names(source, indices)
            if write_to is not None:
                if back is not None:
                    raise ValueError(
                        "indices must be increasing positions with write_to (the file is "
                        "written in row order); sort them first."
                    )
                return self._write_annotation(
                    source, positions, batch_size, outputs, names, novelty_threshold, write_to
                ), None
            parts: dict[str, list] = {}
            for _, out in self._iter_outputs(source, positions, batch_size, outputs):
                for name, value in self._score_chunk(out).items():
                    parts.setdefault(name, []).append(value)
        scored = {name: np.concatenate(value) for name, value in parts.items()}
        if back is not None:
            scored = {name: value[back] for name, value in scored.items()}
        latent, novelty = scored["latent"], scored["novelty"]
        threshold = self._novelty_thresholds(novelty, scored["batch"], novelty_threshold)
        table = pd.DataFrame(
            {
                "prediction": pd.Categorical.from_codes(scored["code"], self.cell_types),
                "confidence": scored["confidence"],
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

    def _write_annotation(
        self, source, positions, batch_size, outputs, names, novelty_threshold, write_to
    ) -> Path:
        """Stream the annotation of ``source`` to ``write_to`` (see annotation_table)."""
        n_cells = len(names)
        novelty = np.zeros(n_cells, dtype=np.float64)
        batches = np.zeros(n_cells, dtype=np.int64)
        with annotation_writer(write_to, names, self.cell_types) as writer:
            done = 0
            for _, out in self._iter_outputs(source, positions, batch_size, outputs):
                scored = self._score_chunk(out)
                stop = done + len(scored["code"])
                writer.write(done, stop, scored)
                novelty[done:stop] = scored["novelty"]
                batches[done:stop] = np.asarray(scored["batch"]).reshape(-1)
                done = stop
            threshold = self._novelty_thresholds(novelty, batches, novelty_threshold)
            writer.finish(novelty > threshold)
        return Path(write_to)

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
