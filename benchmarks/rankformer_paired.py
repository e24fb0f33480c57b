"""RANKFORMER's paired mode: the planted state-change task and paired tokenisation speed.

Planted task (:func:`celltyper.datasets.planted_state_changes`): each cell's label says
whether it changed state since the previous time point, which neither profile alone tells.
A paired model (context: ``layers["previous"]``) and a base model are trained on one
draw and scored on new cells of another draw, for each seed.

Tokenisation: :func:`~celltyper.data.tokenize_paired_matrices` on the bundled Kang demo's
sparse counts repeated to ``--tokenize-cells`` cells, each cell's context the counts of
another cell, with 1 and 2 torch threads (the fastest of 3 calls); the base mode's
:func:`tokenize_matrix` with the same total budget is timed in the same run for
comparison. Timings record the load average, since the machine may be shared.

Run from the repository root::

    python -m benchmarks.rankformer_paired [--seeds 0 1 2] [--tokenize-cells 50000]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from celltyper.data import (
    PREVIOUS_LAYER,
    nonzero_gene_medians,
    planted_state_changes,
    tokenize_matrix,
    tokenize_paired_matrices,
)
from celltyper.datasets import kang_pbmc
from celltyper.model import RANKFORMER

from ._quiet import quiet_run

#: The planted task's model: small enough for a CPU, as in tests/test_rankformer_paired.py.
PLANTED_MODEL = {"d_model": 32, "n_heads": 2, "d_ff": 64, "head_hidden": 32, "n_tokens": 32}
PLANTED_TRAINING = {"max_epochs": 15, "batch_size": 32, "lr": 3e-3, "early_stopping": False}


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f}/{five:.1f}/{fifteen:.1f} on {os.cpu_count()} CPUs"


def planted_accuracy(paired: bool, seed: int, n_cells: int) -> float:
    """Accuracy on new cells of a model trained on one draw of the planted task."""
    train = planted_state_changes(n_cells=n_cells, seed=2 * seed)
    test = planted_state_changes(n_cells=n_cells, seed=2 * seed + 1)
    context = {"context_layer": PREVIOUS_LAYER} if paired else {}
    RANKFORMER.setup_anndata(train, labels_key="label", **context)
    model = RANKFORMER(train, dropout=0.0, seed=seed, **PLANTED_MODEL)
    model.train(seed=seed, enable_progress_bar=False, **PLANTED_TRAINING)
    predicted = model.predict(test)
    return float((predicted == test.obs["label"].to_numpy()).mean())


def _kang_counts(n_cells: int) -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray]:
    """The demo's counts repeated to ``n_cells``, a context for each cell, the medians."""
    matrix = sp.csr_matrix(kang_pbmc().X, dtype=np.float32)
    medians = nonzero_gene_medians(matrix)
    repeats = max(1, -(-n_cells // matrix.shape[0]))
    current = sp.vstack([matrix] * repeats).tocsr()[:n_cells]
    # Another cell's counts as the context: the same sparsity as a real earlier profile.
    context = current[np.roll(np.arange(n_cells), 1)]
    return current, context, medians


def _timed(call, repeats: int = 3) -> tuple[float, float]:
    """Wall and CPU seconds of the fastest of ``repeats`` calls (a shared machine's other
    jobs only ever slow a call down)."""
    best = (np.inf, np.inf)
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        call()
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best


def tokenisation_speed(n_cells: int, n_tokens: int, n_bins: int) -> list[dict]:
    """Cells per second of paired and base tokenisation with 1 and 2 threads."""
    current, context, medians = _kang_counts(n_cells)
    half = n_tokens // 2
    calls = {
        "paired": lambda rows: tokenize_paired_matrices(
            current[:rows], context[:rows], medians, half, n_tokens - half, n_bins
        ),
        "base": lambda rows: tokenize_matrix(current[:rows], medians, n_tokens, n_bins),
    }
    rows, previous = [], torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for mode, call in calls.items():
            call(1000)  # warm-up
            wall, cpu = _timed(lambda call=call: call(n_cells))
            rows.append(
                {
                    "mode": mode,
                    "threads": threads,
                    "n_tokens": n_tokens,
                    "n_bins": n_bins,
                    "cells_per_s_wall": n_cells / wall,
                    "cells_per_cpu_s": n_cells / cpu,
                    "load": _load(),
                }
            )
            print(
                f"  tokenisation {mode}, {threads} thread(s), {n_tokens} tokens, {n_bins} "
                f"bins: {n_cells / wall:,.0f} cells/s wall, {n_cells / cpu:,.0f} cells per "
                f"CPU-second ({_load()})"
            )
    torch.set_num_threads(previous)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-cells", type=int, default=50, help="cells per state combination")
    parser.add_argument("--tokenize-cells", type=int, default=50_000)
    parser.add_argument("--n-tokens", type=int, default=128)
    parser.add_argument("--n-bins", type=int, default=10)
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    args = parser.parse_args(argv)
    quiet_run(threads=1)

    planted = []
    for seed in args.seeds:
        for paired in (True, False):
            start = time.perf_counter()
            accuracy = planted_accuracy(paired, seed, args.n_cells)
            mode = "paired" if paired else "base"
            seconds = time.perf_counter() - start
            planted.append({"mode": mode, "seed": seed, "accuracy": accuracy, "s": seconds})
            print(
                f"  planted task, {mode}, seed {seed}: accuracy {accuracy:.3f} ({seconds:.1f} s)"
            )
    for mode in ("paired", "base"):
        scores = [row["accuracy"] for row in planted if row["mode"] == mode]
        print(
            f"planted task, {mode}: mean accuracy {np.mean(scores):.3f} over {len(scores)} seeds"
        )
    tokenisation = tokenisation_speed(args.tokenize_cells, args.n_tokens, args.n_bins)
    results = {"planted": planted, "tokenisation": tokenisation}
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
