"""Task specs: one small TOML file per dataset says how to turn an h5ad into a benchmark.

A spec names the file (relative to the data folder), the label and batch columns, the
reference / query split and the tasks to run on it; :func:`prepare` turns it into the
AnnData every method trains on. See ``docs/benchmarks.md`` for the format, and
``benchmarks/specs/*.toml`` for the built-in specs.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from ._tasks import UNLABELLED

SPEC_DIR = Path(__file__).resolve().parent / "specs"
TASKS = ("transfer", "novelty", "label_efficiency", "integration")
#: ``seurat_v3`` ranks genes on the raw counts; ``seurat`` (scanpy's default) on
#: log1p(CP10k), as a user following scanpy's tutorial would.
HVG_FLAVORS = ("seurat_v3", "seurat")
#: What a file's ``X`` holds: raw counts, or log2(x + 1) of normalised values (scClassify's
#: pancreas subsets), which :func:`pseudo_counts` turns back into integer counts.
X_KINDS = ("counts", "log2_normalised")

#: Subset sizes of ``--quick`` (cells per split, genes): enough for every metric.
QUICK_REFERENCE, QUICK_QUERY, QUICK_HVG = 240, 360, 300


@dataclass(frozen=True)
class Split:
    """Cells whose ``obs[column]`` is one of ``values``."""

    column: str
    values: tuple[str, ...]

    def mask(self, obs: pd.DataFrame) -> np.ndarray:
        if self.column not in obs.columns:
            raise KeyError(f"split column {self.column!r} is not in obs ({list(obs.columns)}).")
        return obs[self.column].astype(str).isin(self.values).to_numpy()


@dataclass
class TaskSpec:
    """One dataset and the benchmark tasks run on it (see the module docstring)."""

    name: str
    file: str
    label_key: str
    batch_key: str
    tasks: tuple[str, ...]
    description: str = ""
    unlabelled: tuple[str, ...] = (UNLABELLED,)
    n_hvg: int = 2000
    hvg_batch_key: str | None = None
    hvg_flavor: str = "seurat_v3"
    x: str = "counts"
    in_quick: bool = True
    reference: Split | None = None
    query: Split | None = None
    reference_labelled_only: bool = False
    max_unlabelled_query: int | None = None
    options: dict[str, dict] = field(default_factory=dict)
    path: Path | None = None

    def task_options(self, task: str) -> dict:
        """The spec's ``[task]`` table: ``max_seeds``, ``max_unlabelled_query``, ``types``
        (novelty) or ``fractions`` (label efficiency)."""
        return dict(self.options.get(task, {}))

    @classmethod
    def from_toml(cls, path: Path) -> TaskSpec:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
        return cls.from_dict(raw, path=Path(path))

    @classmethod
    def from_dict(cls, raw: dict, path: Path | None = None) -> TaskSpec:
        where = f"spec {path}" if path else "spec"
        missing = [k for k in ("name", "file", "label_key", "batch_key", "tasks") if k not in raw]
        if missing:
            raise ValueError(f"{where} lacks the required keys {missing}.")
        tasks = tuple(raw["tasks"])
        unknown = sorted(set(tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"{where}: unknown tasks {unknown}; choose from {list(TASKS)}.")
        reference, query = _split(raw.get("reference"), where), _split(raw.get("query"), where)
        if (reference is None) != (query is None):
            raise ValueError(f"{where}: give both [reference] and [query], or neither.")
        needs_split = {"transfer", "novelty", "label_efficiency"} & set(tasks)
        if needs_split and reference is None:
            raise ValueError(f"{where}: tasks {sorted(needs_split)} need [reference] and [query].")
        known = {
            "name", "file", "label_key", "batch_key", "tasks", "description", "unlabelled",
            "n_hvg", "hvg_batch_key", "hvg_flavor", "quick", "reference", "query",
            "max_unlabelled_query", "x", *TASKS,
        }  # fmt: skip
        extra = sorted(set(raw) - known)
        if extra:
            raise ValueError(f"{where}: unknown keys {extra}.")
        return cls(
            name=str(raw["name"]),
            file=str(raw["file"]),
            label_key=str(raw["label_key"]),
            batch_key=str(raw["batch_key"]),
            tasks=tasks,
            description=str(raw.get("description", "")),
            unlabelled=tuple(str(v) for v in raw.get("unlabelled", [UNLABELLED])),
            n_hvg=int(raw.get("n_hvg", 2000)),
            hvg_batch_key=raw.get("hvg_batch_key"),
            hvg_flavor=_hvg_flavor(raw.get("hvg_flavor", "seurat_v3"), where),
            x=_x_kind(raw.get("x", "counts"), where),
            in_quick=bool(raw.get("quick", True)),
            reference=reference,
            query=query,
            reference_labelled_only=bool((raw.get("reference") or {}).get("labelled_only")),
            max_unlabelled_query=raw.get("max_unlabelled_query"),
            options={task: dict(raw[task]) for task in TASKS if task in raw},
            path=path,
        )


def _hvg_flavor(flavor: str, where: str) -> str:
    if flavor not in HVG_FLAVORS:
        raise ValueError(f"{where}: hvg_flavor must be one of {HVG_FLAVORS}, got {flavor!r}.")
    return flavor


def _x_kind(kind: str, where: str) -> str:
    if kind not in X_KINDS:
        raise ValueError(f"{where}: x must be one of {X_KINDS}, got {kind!r}.")
    return kind


def pseudo_counts(log2_values: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
    """Integer counts from log2(x + 1) of normalised values.

    Each cell's values are divided by its smallest detected value, so that the rarest
    detected gene reads one count, as in a UMI table, and rounded. The scale of each cell
    is lost with the normalisation; the models that read counts normalise it away.
    """
    values = sp.csr_matrix(log2_values, dtype=np.float64, copy=True)
    values.data = np.exp2(values.data) - 1.0
    values.eliminate_zeros()
    for row in range(values.shape[0]):
        start, stop = values.indptr[row], values.indptr[row + 1]
        if stop > start:
            chunk = values.data[start:stop]
            values.data[start:stop] = np.maximum(np.rint(chunk / chunk.min()), 1.0)
    return values.astype(np.float32)


def _split(raw: dict | None, where: str) -> Split | None:
    if raw is None:
        return None
    if "column" not in raw or "values" not in raw:
        raise ValueError(f"{where}: a split needs `column` and `values`, got {raw}.")
    return Split(str(raw["column"]), tuple(str(v) for v in raw["values"]))


def builtin_specs() -> dict[str, TaskSpec]:
    """The specs shipped in ``benchmarks/specs``, by name."""
    specs = [TaskSpec.from_toml(p) for p in sorted(SPEC_DIR.glob("*.toml"))]
    return {s.name: s for s in specs}


def load_specs(items: list[str] | None) -> list[TaskSpec]:
    """Spec names (built-in) or paths to TOML files; ``None`` gives every built-in spec."""
    builtin = builtin_specs()
    if not items:
        return list(builtin.values())
    specs = []
    for item in items:
        if item in builtin:
            specs.append(builtin[item])
        elif Path(item).suffix == ".toml" and Path(item).exists():
            specs.append(TaskSpec.from_toml(Path(item)))
        else:
            raise ValueError(
                f"--specs {item!r} is neither a built-in spec ({sorted(builtin)}) "
                "nor an existing .toml file."
            )
    return specs


def prepare(spec: TaskSpec, data_dir: Path, quick: bool = False, seed: int = 0) -> ad.AnnData:
    """The AnnData every method trains on, from a spec.

    ``X`` holds the raw counts of the selected genes (pseudo-counts for a spec whose
    ``x`` is ``"log2_normalised"``, see :func:`pseudo_counts`). ``obs`` gains ``true_label``
    (``"Unknown"`` for unlabelled cells), ``train_label`` (the labels the methods may
    use: reference labels for a transfer task, every label for integration),
    ``is_reference``, ``scored`` (labelled query cells of types the reference has;
    labelled cells for integration), ``novel_type`` (labelled query cells of types the
    reference lacks) and ``total_counts``; the batch column is a string.
    """
    path = Path(data_dir) / spec.file
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (spec {spec.name}); pass --data-dir.")
    full = ad.read_h5ad(path)
    for key in (spec.label_key, spec.batch_key):
        if key not in full.obs.columns:
            raise KeyError(f"spec {spec.name}: {key!r} is not a column of {path}.obs.")
    labels = full.obs[spec.label_key].astype(object)
    labelled = (labels.notna() & ~labels.astype(str).isin(spec.unlabelled)).to_numpy()
    if spec.reference is None:
        is_ref = np.ones(full.n_obs, dtype=bool)
        keep = is_ref.copy()
    else:
        is_ref = spec.reference.mask(full.obs)
        is_query = spec.query.mask(full.obs) & ~is_ref
        if spec.reference_labelled_only:
            is_ref &= labelled
        keep = is_ref | is_query
    adata = full[keep].copy()
    del full
    is_ref, labelled = is_ref[keep], labelled[keep]
    if spec.x == "log2_normalised":
        adata.X = pseudo_counts(adata.X)
    elif not sp.issparse(adata.X):
        adata.X = sp.csr_matrix(adata.X)
    adata.obs["total_counts"] = np.asarray(adata.X.sum(axis=1)).reshape(-1)
    true = adata.obs[spec.label_key].astype(object)
    true = true.where(true.notna() & ~true.astype(str).isin(spec.unlabelled), UNLABELLED)
    adata.obs["true_label"] = true.astype(str).to_numpy()
    adata.obs["is_reference"] = is_ref
    adata.obs["train_label"] = np.where(is_ref, adata.obs["true_label"], UNLABELLED)
    adata.obs[spec.batch_key] = adata.obs[spec.batch_key].astype(str)
    labelled_kept = (adata.obs["true_label"] != UNLABELLED).to_numpy()
    scored = labelled_kept if spec.reference is None else labelled_kept & ~is_ref
    # Query cells of types the reference lacks cannot be transferred: they are kept (and
    # marked) as novel cells, and label transfer scores the others.
    reference_types = set(adata.obs["true_label"][is_ref & labelled_kept])
    novel = scored & ~adata.obs["true_label"].isin(reference_types).to_numpy()
    adata.obs["novel_type"] = novel
    adata.obs["scored"] = scored & ~novel
    # Genes are chosen on every selected cell, before any subsampling, so that --quick
    # and the full run use the same kind of genes.
    n_hvg = min(spec.n_hvg, QUICK_HVG) if quick else spec.n_hvg
    if 0 < n_hvg < adata.n_vars:
        hvg_batch = spec.hvg_batch_key
        if hvg_batch is not None:
            adata.obs[hvg_batch] = adata.obs[hvg_batch].astype(str)
        adata = _select_hvgs(adata, n_hvg, spec.hvg_flavor, hvg_batch)
    if quick:
        adata = adata[_quick_mask(is_ref, labelled, np.random.default_rng(seed))].copy()
    elif spec.max_unlabelled_query is not None:
        adata = subsample_unlabelled_query(adata, int(spec.max_unlabelled_query), seed)
    if adata.obs["scored"].sum() == 0:
        raise ValueError(f"spec {spec.name}: no labelled query cell to score.")
    return adata


def _select_hvgs(adata: ad.AnnData, n_hvg: int, flavor: str, batch_key: str | None):
    """``adata`` (raw counts) restricted to ``n_hvg`` highly variable genes."""
    if flavor == "seurat_v3":
        ranked = adata
    else:
        ranked = ad.AnnData(adata.X.copy(), obs=adata.obs[[batch_key]] if batch_key else None)
        sc.pp.normalize_total(ranked, target_sum=1e4)
        sc.pp.log1p(ranked)
    genes = sc.pp.highly_variable_genes(
        ranked, n_top_genes=n_hvg, flavor=flavor, batch_key=batch_key, inplace=False
    )["highly_variable"].to_numpy()
    return adata[:, genes].copy()


def _quick_mask(is_ref, labelled, rng) -> np.ndarray:
    """A few hundred cells: labelled reference cells and query cells, half labelled."""
    chosen = np.zeros(len(is_ref), dtype=bool)
    pools = [
        (is_ref & labelled, QUICK_REFERENCE),
        (~is_ref & labelled, QUICK_QUERY // 2),
        (~labelled, QUICK_QUERY // 2),
    ]
    if is_ref.all():  # integration: no query, labelled and unlabelled cells
        pools = [(labelled, QUICK_REFERENCE + QUICK_QUERY // 2), pools[2]]
    for pool, n in pools:
        idx = np.flatnonzero(pool)
        chosen[rng.choice(idx, size=min(n, len(idx)), replace=False)] = True
    return chosen


def subsample_unlabelled_query(adata: ad.AnnData, max_cells: int, seed: int = 0) -> ad.AnnData:
    """Keep at most ``max_cells`` of the unscored query cells (a seeded random subset).

    Scored and reference cells are all kept, so every method is scored on the same cells.
    """
    spare = np.flatnonzero(~adata.obs["is_reference"].to_numpy() & ~adata.obs["scored"])
    if len(spare) <= max_cells:
        return adata
    rng = np.random.default_rng(seed)
    drop = np.zeros(adata.n_obs, dtype=bool)
    drop[rng.choice(spare, size=len(spare) - max_cells, replace=False)] = True
    return adata[~drop].copy()
