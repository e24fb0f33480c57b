"""A synthetic task for RANKFORMER's paired mode: labels that only the change tells."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
from scipy import sparse

#: Layer of :func:`planted_state_changes` holding each cell's previous profile.
PREVIOUS_LAYER = "previous"


def planted_state_changes(
    n_cells: int = 50,
    n_genes: int = 40,
    program_size: int = 8,
    program_boost: float = 8.0,
    seed: int = 0,
) -> anndata.AnnData:
    """Cells whose label says whether they changed state since the previous time point.

    Two gene programs A and B (``program_size`` genes each, raised by ``program_boost``
    over a shared background) define two states. Every cell is in state A or B now and
    was in A or B before, the four combinations equally often; its label is ``"stayed"``
    or ``"moved"``. Either profile alone says nothing about the label (each state is
    equally often reached by staying and by moving), so a classifier of the current
    profile is at chance, while the pair of profiles gives it exactly.

    Parameters
    ----------
    n_cells
        Cells of each of the four (previous, current) combinations.
    n_genes
        Genes ``g0 ...``; the programs are the first ``2 * program_size``.
    program_size
        Genes of each program.
    program_boost
        Mean added to a program's genes in its state.
    seed
        Seed of the background and of the Poisson counts.

    Returns
    -------
    AnnData of ``4 * n_cells`` cells with raw counts (CSR float32) in ``X`` (now) and
    ``layers["previous"]`` (before, cell by cell); ``obs``: ``label``, ``state`` and
    ``previous_state`` (``"A"``/``"B"``).
    """
    if n_cells < 1:
        raise ValueError(f"n_cells must be >= 1, got {n_cells}.")
    if not 1 <= program_size <= n_genes // 2:
        raise ValueError(
            f"program_size must be between 1 and n_genes / 2 = {n_genes // 2}, got {program_size}."
        )
    rng = np.random.default_rng(seed)
    background = rng.gamma(2.0, 0.5, size=n_genes)
    programs = np.tile(background, (2, 1))
    for state in (0, 1):
        programs[state, state * program_size : (state + 1) * program_size] += program_boost
    previous = np.repeat([0, 0, 1, 1], n_cells)
    current = np.repeat([0, 1, 0, 1], n_cells)
    states = np.array(["A", "B"])
    obs = pd.DataFrame(
        {
            "label": np.where(previous == current, "stayed", "moved"),
            "state": states[current],
            "previous_state": states[previous],
        },
        index=[f"cell{i}" for i in range(len(current))],
    )
    counts_now = rng.poisson(programs[current]).astype(np.float32)
    counts_before = rng.poisson(programs[previous]).astype(np.float32)
    return anndata.AnnData(
        X=sparse.csr_matrix(counts_now),
        obs=obs,
        var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]),
        layers={PREVIOUS_LAYER: sparse.csr_matrix(counts_before)},
    )
