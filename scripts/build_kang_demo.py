"""Build the bundled Kang et al. (2018) IFN-beta PBMC demo dataset.

The package ships a small slice of the Kang interferon-beta PBMC data so that tutorials,
docstring examples and tests have real counts to work on without network access. This
script is the only place that reads the full source file; the package itself only ever
loads the result from ``src/celltyper/data/files/kang_pbmc_demo.h5ad``.

Usage (from the repository root)::

    python scripts/build_kang_demo.py [SOURCE] [--output PATH] [--seed 0]

``SOURCE`` defaults to ``../shared/data/kang_ifnb_counts_13999.h5ad`` relative to the
repository root.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "data" / "kang_ifnb_counts_13999.h5ad"
DEFAULT_OUTPUT = REPO_ROOT / "src" / "celltyper" / "data" / "files" / "kang_pbmc_demo.h5ad"

LABEL_KEY = "cell_type_scgen_subset"
CONDITION_KEY = "condition"
CONDITIONS = ("control", "stimulated")
SPLITS = {"control": "reference", "stimulated": "query"}
UNKNOWN = "Unknown"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "source",
        nargs="?",
        type=Path,
        default=DEFAULT_SOURCE,
        help="full Kang counts file (default: %(default)s)",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="%(default)s")
    parser.add_argument("--n-hvg", type=int, default=2000, help="%(default)s")
    parser.add_argument(
        "--n-unlabelled-control",
        type=int,
        default=1500,
        help="unlabelled control cells to sample (default: %(default)s)",
    )
    parser.add_argument(
        "--n-unlabelled-stimulated",
        type=int,
        default=2500,
        help="unlabelled stimulated cells to sample (default: %(default)s)",
    )
    parser.add_argument(
        "--min-cells",
        type=int,
        default=10,
        help="genes must be detected in this many demo cells to be eligible as HVGs "
        "(default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="%(default)s")
    return parser.parse_args(argv)


def check_source(adata: ad.AnnData) -> None:
    """Fail early if the source file is not the one this script was written for."""
    for key in (CONDITION_KEY, LABEL_KEY):
        if key not in adata.obs:
            raise KeyError(f"source file has no obs[{key!r}]; found {list(adata.obs.columns)}")
    found = set(adata.obs[CONDITION_KEY].astype(str).unique())
    if found != set(CONDITIONS):
        raise ValueError(f"obs[{CONDITION_KEY!r}] must hold {CONDITIONS}, found {sorted(found)}")
    x = adata.X
    data = x.data if sp.issparse(x) else np.asarray(x)
    if not np.array_equal(data, np.round(data)) or data.min() < 0:
        raise ValueError("source X must hold raw non-negative integer counts")


def select_hvgs(adata: ad.AnnData, n_hvg: int, min_cells: int) -> pd.Index:
    """Return the names of ``n_hvg`` highly variable genes chosen on raw counts.

    Only genes detected in at least ``min_cells`` cells of ``adata`` are candidates.
    """
    # seurat_v3 ranks by standardised variance, which rewards genes seen in a handful of
    # cells with a few large counts; without this filter ~100 of the 2,000 genes are
    # detected in fewer than 3 demo cells and carry no information.
    detected = np.asarray((adata.X > 0).sum(axis=0)).ravel()
    candidates = adata[:, detected >= min_cells].copy()
    if candidates.n_vars < n_hvg:
        raise ValueError(
            f"only {candidates.n_vars} genes are detected in >= {min_cells} cells, "
            f"fewer than n_hvg={n_hvg}"
        )
    # seurat_v3 fits a loess to the mean-variance trend of raw counts and is deterministic;
    # batch_key makes the ranking favour genes variable within both conditions rather than
    # genes that merely separate control from stimulated.
    hvg = sc.pp.highly_variable_genes(
        candidates,
        flavor="seurat_v3",
        n_top_genes=n_hvg,
        batch_key=CONDITION_KEY,
        inplace=False,
    )
    return candidates.var_names[hvg["highly_variable"].to_numpy()]


def select_cells(obs: pd.DataFrame, n_control: int, n_stimulated: int, seed: int) -> np.ndarray:
    """Return sorted integer positions of all labelled cells plus sampled unlabelled ones."""
    rng = np.random.default_rng(seed)
    labelled = obs[LABEL_KEY].notna().to_numpy()
    condition = obs[CONDITION_KEY].astype(str).to_numpy()
    chosen = [np.flatnonzero(labelled)]
    for cond, n in zip(CONDITIONS, (n_control, n_stimulated), strict=True):
        pool = np.flatnonzero(~labelled & (condition == cond))
        if n > pool.size:
            raise ValueError(f"asked for {n} unlabelled {cond} cells, only {pool.size} exist")
        chosen.append(rng.choice(pool, size=n, replace=False))
    # Keeping the source order makes the file stable across numpy versions' sampling order.
    return np.sort(np.concatenate(chosen))


def build(args: argparse.Namespace) -> ad.AnnData:
    """Build the demo AnnData from the parsed arguments."""
    source = ad.read_h5ad(args.source)
    check_source(source)
    cells = select_cells(
        source.obs, args.n_unlabelled_control, args.n_unlabelled_stimulated, args.seed
    )
    # Genes are chosen on the shipped cells so that every gene carries signal in the demo.
    subset = source[cells].copy()
    genes = select_hvgs(subset, args.n_hvg, args.min_cells)
    # Keep the source gene order rather than the HVG rank so that var_names read naturally.
    gene_mask = subset.var_names.isin(genes)
    x = sp.csr_matrix(subset.X[:, gene_mask], dtype=np.float32)
    x.sort_indices()

    src_obs = subset.obs
    condition = pd.Categorical(src_obs[CONDITION_KEY].astype(str), categories=list(CONDITIONS))
    labels = src_obs[LABEL_KEY]
    types = sorted(labels.dropna().astype(str).unique())
    cell_type = pd.Categorical(
        labels.astype(object).where(labels.notna(), UNKNOWN).astype(str),
        categories=[*types, UNKNOWN],
    )
    split = pd.Categorical(
        [SPLITS[c] for c in condition], categories=[SPLITS[c] for c in CONDITIONS]
    )
    obs = pd.DataFrame(
        {"condition": condition, "cell_type": cell_type, "split": split},
        index=src_obs.index.astype(str),
    )
    var = pd.DataFrame(index=subset.var_names[gene_mask].astype(str))
    out = ad.AnnData(X=x, obs=obs, var=var)
    out.uns["celltyper_demo"] = {
        "source": Path(args.source).name,
        "origin": "Kang et al. 2018, GEO GSE96583 (IFN-beta stimulated PBMC)",
        "n_hvg": int(args.n_hvg),
        "hvg_flavor": "seurat_v3, batch_key=condition, on the demo cells",
        "hvg_min_cells": int(args.min_cells),
        "seed": int(args.seed),
        "n_unlabelled_control": int(args.n_unlabelled_control),
        "n_unlabelled_stimulated": int(args.n_unlabelled_stimulated),
        "script": "scripts/build_kang_demo.py",
    }
    return out


def main(argv: list[str] | None = None) -> None:
    """Build the demo dataset and write it with gzip compression."""
    args = parse_args(argv)
    adata = build(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(args.output, compression="gzip")
    size_mb = args.output.stat().st_size / 1e6
    print(f"wrote {args.output} ({size_mb:.2f} MB)")
    print(adata)
    print(pd.crosstab(adata.obs["cell_type"], adata.obs["condition"], margins=True))


if __name__ == "__main__":
    main()
