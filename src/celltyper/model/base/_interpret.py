"""Expected-gradient attribution of a classifier's outputs to genes, for every model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from mudata import MuData
from scvi.utils import track

from celltyper._utils import seeded


class InterpretMixin:
    """:meth:`interpret` for every model whose module implements the interpretation
    interface (``interpretation_input`` and ``logits_from_interpretation_input`` of
    :class:`~celltyper.module.CellTyperModule`)."""

    def _check_interpretable(self) -> None:
        if not self.n_labels:
            raise ValueError(
                f"{type(self).__name__} was set up without labels_key, so it has no "
                "classifier whose predictions interpret() could explain."
            )
        if not self.module.interpretable:
            raise ValueError(
                f"{type(self).__name__} cannot attribute its predictions to genes: "
                f"{self.module.not_interpretable_reason}"
            )

    @torch.no_grad()
    def _background(self, data, indices: np.ndarray, batch_size: int | None) -> torch.Tensor:
        loader = self._make_data_loader(adata=data, indices=indices, batch_size=batch_size)
        return torch.cat([self.module.interpretation_input(t).cpu() for t in loader])

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
        and ``a ~ U(0, 1)`` (Erion et al. 2021), in the space of the classifier's input
        (log-normalised expression for most models: see the module's
        ``interpretation_input``).

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
        self._check_interpretable()
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
            with self._model_data(adata, chunked=False) as data:
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
            logits = self.module.logits_from_interpretation_input(x.to(device))
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
                out = self.module.logits_from_interpretation_input(points)
                cls = classes[start:stop].repeat_interleave(n_samples).to(device)
                selected = out.gather(1, cls.view(-1, 1)).sum()
                (grad,) = torch.autograd.grad(selected, points)
                contrib = (xs.to(device) - refs.to(device)) * grad
                result[start:stop] = contrib.view(stop - start, n_samples, -1).mean(1).cpu()
        return result.numpy()
