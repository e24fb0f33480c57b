"""Plots of learned cell embeddings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

_MISSING_COLOR = "#d3d3d3"
_PANEL_SIZE = (4.5, 4.0)


def latent_umap(
    adata: anndata.AnnData,
    latent_key: str,
    color: str | Sequence[str],
    path: str | Path,
    n_neighbors: int = 15,
    random_state: int = 0,
    colors: Mapping[str, Mapping[str, str]] | None = None,
) -> Path:
    """Draw a UMAP of a latent representation, one panel per ``obs`` column.

    The neighbour graph and UMAP are computed on a throw-away AnnData holding only the
    latent and the requested columns, so ``adata`` is left exactly as it was (no new
    ``obsp``, ``obsm``, ``uns`` or colour palettes).

    Parameters
    ----------
    adata
        Annotated data with the latent representation in ``adata.obsm[latent_key]``.
    latent_key
        Key in ``adata.obsm`` of the ``(n_obs, n_latent)`` representation, e.g.
        ``"X_scnym"``.
    color
        Column(s) of ``adata.obs`` to colour by, one panel each. Categorical, string
        and boolean columns get a legend; numeric columns (e.g. a prediction
        confidence) get a colour bar, fixed to ``[0, 1]`` when all values lie in it.
    path
        Where to write the PNG; missing parent folders are created.
    n_neighbors
        Number of neighbours of the kNN graph the UMAP is built from.
    random_state
        Seed for the neighbour search and the UMAP layout, for reproducible plots.
    colors
        Fixed colours of a categorical column's categories, ``{column: {category:
        colour}}`` (e.g. ``{"novel": {"known": "lightgrey", "novel": "red"}}``). Such a
        column is drawn category by category in the given order, so the last one (the
        cells to spot) lies on top.

    Returns
    -------
    pathlib.Path
        The path of the written PNG.

    Raises
    ------
    KeyError
        If ``latent_key`` is not in ``adata.obsm`` or a ``color`` column is not in
        ``adata.obs``.
    ValueError
        If the latent is not a 2-D array with one row per cell, or ``color`` is empty.

    Examples
    --------
    >>> from celltyper.pl import latent_umap
    >>> latent_umap(adata, "X_scnym", ["cell_type", "scnym_confidence"], "umap.png")
    PosixPath('umap.png')
    """
    # Imported here so that importing celltyper.pl stays cheap; scanpy pulls in umap/numba.
    import scanpy as sc

    columns = [color] if isinstance(color, str) else list(color)
    if not columns:
        raise ValueError("`color` is empty; pass at least one column of `adata.obs`")
    if latent_key not in adata.obsm:
        raise KeyError(
            f"latent_key={latent_key!r} is not in adata.obsm; available keys: "
            f"{list(adata.obsm.keys())}"
        )
    missing = [c for c in columns if c not in adata.obs.columns]
    if missing:
        raise KeyError(
            f"color column(s) {missing} not in adata.obs; available columns: "
            f"{list(adata.obs.columns)}"
        )
    latent = np.asarray(adata.obsm[latent_key], dtype=np.float32)
    if latent.ndim != 2 or latent.shape[0] != adata.n_obs:
        raise ValueError(
            f"adata.obsm[{latent_key!r}] must have shape (n_obs, n_latent) = "
            f"({adata.n_obs}, ...), got {latent.shape}"
        )

    light = anndata.AnnData(
        obs=adata.obs[list(dict.fromkeys(columns))].copy(),
        obsm={"X_latent": latent},
    )
    sc.pp.neighbors(
        light,
        n_neighbors=min(n_neighbors, max(adata.n_obs - 1, 2)),
        use_rep="X_latent",
        random_state=random_state,
    )
    sc.tl.umap(light, random_state=random_state)
    coords = light.obsm["X_umap"]

    # Drawing in a shuffled order keeps the last category from hiding all the others.
    order = np.random.default_rng(random_state).permutation(adata.n_obs)
    point_size = float(np.clip(12_000 / max(adata.n_obs, 1), 1.0, 40.0))

    # A bare Figure with an Agg canvas renders off-screen without touching pyplot's
    # global state or the user's chosen backend.
    fig = Figure(figsize=(_PANEL_SIZE[0] * len(columns), _PANEL_SIZE[1]), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(columns), squeeze=False)[0]
    fixed = dict(colors or {})
    for ax, column in zip(axes, columns, strict=True):
        values = light.obs[column]
        if column in fixed:
            _draw_highlighted(ax, coords[order], values.iloc[order], fixed[column], point_size)
        elif _is_numeric(values):
            _draw_numeric(fig, ax, coords[order], values.to_numpy(dtype=float)[order], point_size)
        else:
            _draw_categorical(ax, coords[order], values.iloc[order], point_size)
        ax.set_title(column)
        ax.set_xlabel("UMAP1")
        ax.set_ylabel("UMAP2")
        ax.set_xticks([])
        ax.set_yticks([])

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=150)
    return out


def _is_numeric(values: pd.Series) -> bool:
    """Whether a column should get a colour bar rather than a legend."""
    return pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)


def _draw_numeric(
    fig: Figure, ax: Axes, coords: np.ndarray, values: np.ndarray, size: float
) -> None:
    """Scatter a continuous column with a colour bar; NaN cells are drawn in grey."""
    finite = np.isfinite(values)
    ax.scatter(*coords[~finite].T, s=size, c=_MISSING_COLOR, linewidths=0)
    vmin = vmax = None
    if finite.any() and values[finite].min() >= 0 and values[finite].max() <= 1:
        # Confidences and probabilities are compared across panels and plots, so they
        # share one fixed scale instead of stretching to each column's range.
        vmin, vmax = 0.0, 1.0
    mappable = ax.scatter(
        *coords[finite].T,
        s=size,
        c=values[finite],
        cmap="viridis",
        vmin=vmin,
        vmax=vmax,
        linewidths=0,
    )
    fig.colorbar(mappable, ax=ax, shrink=0.8)


def _draw_categorical(ax: Axes, coords: np.ndarray, values: pd.Series, size: float) -> None:
    """Scatter a categorical column with one legend entry per category."""
    labels = values.astype("category") if values.dtype != "category" else values
    categories = list(labels.cat.categories)
    colors = _palette(len(categories))
    codes = labels.cat.codes.to_numpy()
    point_colors = [colors[c] if c >= 0 else _MISSING_COLOR for c in codes]
    ax.scatter(*coords.T, s=size, c=point_colors, linewidths=0)
    handles = [
        Line2D([], [], marker="o", linestyle="", color=colors[i], label=str(cat))
        for i, cat in enumerate(categories)
    ]
    if (codes < 0).any():
        handles.append(Line2D([], [], marker="o", linestyle="", color=_MISSING_COLOR, label="NA"))
    ax.legend(
        handles=handles,
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        frameon=False,
        fontsize="small",
        ncols=1 if len(handles) <= 14 else 2,
    )


def _draw_highlighted(
    ax: Axes, coords: np.ndarray, values: pd.Series, colors: Mapping[str, str], size: float
) -> None:
    """Scatter a column whose categories have fixed colours, the last category on top."""
    labels = values.astype(str).to_numpy()
    handles = []
    for category, color in colors.items():
        members = labels == str(category)
        ax.scatter(*coords[members].T, s=size, c=color, linewidths=0)
        handles.append(
            Line2D(
                [],
                [],
                marker="o",
                linestyle="",
                color=color,
                label=f"{category} ({members.sum():,})",
            )
        )
    ax.legend(
        handles=handles,
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        frameon=False,
        fontsize="small",
    )


def _palette(n: int) -> list:
    """Distinct colours for ``n`` categories."""
    if n <= 10:
        return list(colormaps["tab10"].colors[:n])
    if n <= 20:
        return list(colormaps["tab20"].colors[:n])
    cmap = colormaps["turbo"]
    return [cmap(x) for x in np.linspace(0.05, 0.95, n)]
