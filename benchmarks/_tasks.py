"""Benchmark tasks built from the real datasets in ``../shared/data``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
UNLABELLED = "Unknown"


@dataclass
class TransferTask:
    """Reference -> query label transfer on one AnnData.

    ``adata.obs["train_label"]`` holds the reference labels and ``UNLABELLED`` elsewhere
    (query cells are unlabelled during training); ``adata.obs["true_label"]`` holds every
    known label; ``scored`` marks the query cells that are scored.
    """

    name: str
    adata: ad.AnnData
    batch_key: str
    scored: np.ndarray

    @property
    def y_true(self) -> np.ndarray:
        return self.adata.obs["true_label"].to_numpy()[self.scored]


def kang_control_to_stimulated(data_dir: Path = DEFAULT_DATA_DIR, n_hvg: int = 2000):
    """Kang et al. 2018: labelled control cells -> stimulated cells.

    Training cells: the labelled control cells (reference) and every stimulated cell,
    unlabelled; scored: the labelled stimulated cells. Genes: ``n_hvg`` highly variable
    genes (seurat_v3 on counts, per condition) of those cells. ``X`` holds raw counts.
    """
    path = Path(data_dir) / "kang_ifnb_counts_13999.h5ad"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; pass --data-dir.")
    full = ad.read_h5ad(path)
    labels = full.obs["cell_type_scgen_subset"]
    control = (full.obs["condition"] == "control").to_numpy()
    labelled = labels.notna().to_numpy()
    keep = (control & labelled) | ~control
    adata = full[keep].copy()
    # Library sizes over the whole transcriptome, before the genes are subset.
    adata.obs["total_counts"] = np.asarray(adata.X.sum(axis=1)).reshape(-1)
    adata.obs["true_label"] = adata.obs["cell_type_scgen_subset"].astype(object)
    adata.obs["true_label"] = adata.obs["true_label"].fillna(UNLABELLED).astype(str)
    is_control = (adata.obs["condition"] == "control").to_numpy()
    adata.obs["train_label"] = np.where(is_control, adata.obs["true_label"], UNLABELLED)
    adata.obs["condition"] = adata.obs["condition"].astype(str)
    sc.pp.highly_variable_genes(
        adata, n_top_genes=n_hvg, flavor="seurat_v3", batch_key="condition", subset=True
    )
    scored = (~is_control) & (adata.obs["true_label"] != UNLABELLED).to_numpy()
    return TransferTask("kang_ctrl_to_stim", adata, "condition", scored)


@dataclass
class IntegrationTask:
    """Every cell of one dataset; ``mask`` marks the labelled cells that scib scores."""

    name: str
    adata: ad.AnnData
    batch_key: str
    label_key: str
    mask: np.ndarray


def kang_integration(data_dir: Path = DEFAULT_DATA_DIR, n_hvg: int = 2000) -> IntegrationTask:
    """Kang et al. 2018, all 13,999 cells: batch = condition, biology = labelled cells.

    ``X`` holds raw counts of ``n_hvg`` highly variable genes (seurat_v3 per condition);
    ``obs["true_label"]`` has the 7 scGen cell types and ``UNLABELLED`` elsewhere.
    """
    path = Path(data_dir) / "kang_ifnb_counts_13999.h5ad"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; pass --data-dir.")
    adata = ad.read_h5ad(path)
    adata.obs["total_counts"] = np.asarray(adata.X.sum(axis=1)).reshape(-1)
    labels = adata.obs["cell_type_scgen_subset"].astype(object)
    adata.obs["true_label"] = labels.fillna(UNLABELLED).astype(str)
    adata.obs["condition"] = adata.obs["condition"].astype(str)
    sc.pp.highly_variable_genes(
        adata, n_top_genes=n_hvg, flavor="seurat_v3", batch_key="condition", subset=True
    )
    mask = (adata.obs["true_label"] != UNLABELLED).to_numpy()
    return IntegrationTask("kang_integration", adata, "condition", "true_label", mask)
