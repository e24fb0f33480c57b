"""RANKFORMER on Kang control -> stimulated: accuracy, tokenisation and inference speed.

Reference: the labelled control cells. Query: every stimulated cell, unlabelled during
training (masked-gene pretraining and the masked-gene loss may use them). Scored: the
labelled stimulated cells. Training runs on the CPU within ``--budget-minutes`` (Lightning's
``max_time``, split between pretraining and fine-tuning). Tokenisation is timed on the
task's sparse count matrix (repeated to ``--tokenize-cells`` cells) with 1 and 2 torch
threads; timings record ``os.cpu_count()`` and the load average, since the machine may be
shared.

Run from the repository root::

    python -m benchmarks.rankformer_kang [--quick] [--data-dir DIR] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import scipy.sparse as sp
import torch
from scvi import REGISTRY_KEYS

from celltyper.data import nonzero_gene_medians, tokenize_matrix
from celltyper.metrics import classification_scores
from celltyper.model import RANKFORMER

from ._quiet import quiet_run
from ._tasks import DEFAULT_DATA_DIR, UNLABELLED, TransferTask, kang_control_to_stimulated


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f}/{five:.1f}/{fifteen:.1f} on {os.cpu_count()} CPUs"


def tokenisation_speed(task: TransferTask, n_cells: int, n_tokens: int, n_bins: int) -> list:
    """Cells per second of :func:`~celltyper.data.tokenize_matrix` with 1 and 2 threads."""
    matrix = sp.csr_matrix(task.adata.X, dtype=np.float32)
    reference = (task.adata.obs["train_label"] != UNLABELLED).to_numpy()
    medians = nonzero_gene_medians(matrix[reference])
    repeats = max(1, -(-n_cells // matrix.shape[0]))
    big = sp.vstack([matrix] * repeats).tocsr()[:n_cells]
    rows = []
    previous = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        tokenize_matrix(big[:1000], medians, n_tokens, n_bins)  # warm-up
        wall, cpu = time.perf_counter(), time.process_time()
        tokenize_matrix(big, medians, n_tokens, n_bins)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rows.append(
            {
                "threads": threads,
                "cells": big.shape[0],
                "cells_per_s": big.shape[0] / wall,
                "cells_per_cpu_s": big.shape[0] / max(cpu, 1e-9),
                "load": _load(),
            }
        )
        print(
            f"  tokenisation, {threads} thread(s), k={n_tokens}, bins={n_bins}: "
            f"{rows[-1]['cells_per_s']:,.0f} cells/s wall, "
            f"{rows[-1]['cells_per_cpu_s']:,.0f} cells per CPU-second ({_load()})",
            flush=True,
        )
    torch.set_num_threads(previous)
    return rows


def run_rankformer(task: TransferTask, args: argparse.Namespace, seed: int) -> dict:
    """Train on the task; returns predictions, scores and timings."""
    adata = task.adata.copy()
    RANKFORMER.setup_anndata(adata, labels_key="train_label", batch_key=task.batch_key)
    model = RANKFORMER(
        adata,
        preset=args.preset,
        n_tokens=args.n_tokens,
        n_bins=args.n_bins,
        median_cells=args.median_cells,
        seed=seed,
    )
    budget = 0.05 if args.quick else args.budget_minutes
    common = {"enable_progress_bar": False, "batch_size": args.batch_size, "lr": args.lr}
    counter = CellCounter()
    start = time.perf_counter()
    if args.pretrain_epochs > 0:
        pretrain_budget = budget * args.pretrain_share
        model.pretrain(
            max_epochs=1 if args.quick else args.pretrain_epochs,
            max_time={"seconds": 60 * pretrain_budget},
            callbacks=[counter],
            **common,
        )
        budget -= pretrain_budget
    query_budget = budget * args.query_share if args.query_epochs > 0 else 0.0
    model.train(
        max_epochs=2 if args.quick else args.epochs,
        mlm_weight=args.mlm_weight,
        early_stopping_patience=args.patience,
        max_time={"seconds": 60 * (budget - query_budget)},
        callbacks=[counter],
        **common,
    )
    if args.query_epochs > 0:
        # scArches-style surgery on the unlabelled stimulated cells: LayerNorms adapt
        # through the masked-gene loss, the head's BatchNorm statistics to the query.
        stimulated = (adata.obs[task.batch_key] != "control").to_numpy()
        query = task.adata[stimulated].copy()
        model = RANKFORMER.load_query_data(query, model)
        model.train(
            max_epochs=1 if args.quick else args.query_epochs,
            max_time={"seconds": 60 * query_budget},
            callbacks=[counter],
            **common,
        )
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    predictions = model.predict(task.adata)
    inference_seconds = time.perf_counter() - start
    scores = classification_scores(task.y_true, predictions[task.scored])
    return {
        **scores,
        "train_seconds": train_seconds,
        "train_cells_per_s": counter.cells_per_s,
        "inference_cells_per_s": task.adata.n_obs / inference_seconds,
        "n_parameters": model.n_parameters,
        "epochs": len(model.history["train_loss"]),
        "load": _load(),
    }


class CellCounter(pl.Callback):
    """Counts the cells of the training minibatches and the time spent in fit."""

    def __init__(self):
        self.cells = 0
        self.seconds = 0.0
        self._start = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds += time.perf_counter() - self._start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        parts = batch if isinstance(batch, list | tuple) else [batch]
        self.cells += sum(len(part[REGISTRY_KEYS.X_KEY]) for part in parts)

    @property
    def cells_per_s(self) -> float:
        return self.cells / self.seconds if self.seconds else float("nan")


def gpu_training_speed(task: TransferTask, args: argparse.Namespace) -> float | None:
    """Training cells per second on a GPU (bf16 autocast), or ``None`` without one."""
    if not torch.cuda.is_available():
        return None
    adata = task.adata.copy()
    RANKFORMER.setup_anndata(adata, labels_key="train_label", batch_key=task.batch_key)
    model = RANKFORMER(adata, preset=args.preset, n_tokens=args.n_tokens, n_bins=args.n_bins)
    counter = CellCounter()
    model.train(
        max_epochs=2,
        mlm_weight=args.mlm_weight,
        accelerator="gpu",
        enable_progress_bar=False,
        callbacks=[counter],
    )
    return counter.cells_per_s


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--quick", action="store_true", help="a few steps, to check the wiring")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--preset", default="small", choices=list(RANKFORMER.presets))
    parser.add_argument("--n-tokens", type=int, default=128)
    parser.add_argument("--n-bins", type=int, default=10)
    parser.add_argument("--median-cells", default="labelled", choices=["labelled", "all"])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--pretrain-epochs", type=int, default=0)
    parser.add_argument("--pretrain-share", type=float, default=0.3)
    parser.add_argument("--mlm-weight", type=float, default=0.0)
    parser.add_argument("--query-epochs", type=int, default=1)
    parser.add_argument("--query-share", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--budget-minutes", type=float, default=15.0)
    parser.add_argument("--tokenize-cells", type=int, default=50_000)
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)

    quiet_run(1)

    task = kang_control_to_stimulated(args.data_dir)
    n_ref = int((task.adata.obs["train_label"] != UNLABELLED).sum())
    print(
        f"Task {task.name}: {n_ref} labelled reference cells, "
        f"{task.adata.n_obs - n_ref} unlabelled query cells, {int(task.scored.sum())} scored, "
        f"{task.adata.n_vars} genes; {_load()}",
        flush=True,
    )
    n_tokenize = 5_000 if args.quick else args.tokenize_cells
    tokenisation = tokenisation_speed(task, n_tokenize, args.n_tokens, args.n_bins)
    runs = []
    for seed in args.seeds:
        result = run_rankformer(task, args, seed)
        runs.append({"seed": seed, **result})
        print(
            f"  seed {seed}: balanced accuracy {result['balanced_accuracy']:.3f}, accuracy "
            f"{result['accuracy']:.3f}, macro F1 {result['macro_f1']:.3f}; "
            f"{result['epochs']} epochs in {result['train_seconds']:.0f} s "
            f"({result['train_cells_per_s']:,.0f} training cells/s); inference "
            f"{result['inference_cells_per_s']:,.0f} cells/s; "
            f"{result['n_parameters']:,} parameters ({result['load']})",
            flush=True,
        )
    gpu = gpu_training_speed(task, args)
    if gpu is not None:
        print(f"  GPU training throughput: {gpu:,.0f} cells/s")
    balanced = np.array([r["balanced_accuracy"] for r in runs])
    print(
        f"\nRANKFORMER ({args.preset}, k={args.n_tokens}, bins={args.n_bins}, pretrain "
        f"{args.pretrain_epochs} epochs, mlm_weight {args.mlm_weight}): balanced accuracy "
        f"{balanced.mean():.3f} ± {balanced.std():.3f} over {len(runs)} seed(s)"
    )
    results = {
        "settings": vars(args) | {"data_dir": str(args.data_dir), "json": None},
        "cpu_count": os.cpu_count(),
        "tokenisation": tokenisation,
        "runs": runs,
        "gpu_training_cells_per_s": gpu,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
