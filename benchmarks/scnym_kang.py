"""SCNYM against scANVI and logistic regression on Kang control -> stimulated.

Reference: the labelled control cells. Query: every stimulated cell, unlabelled during
training (semi-supervised methods see them). Scored: the labelled stimulated cells.

Run from the repository root::

    python -m benchmarks.scnym_kang [--quick] [--data-dir DIR]
        [--methods scnym scnym-centred scanvi lr]
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scanpy as sc
from sklearn.linear_model import LogisticRegression

from celltyper.metrics import classification_scores
from celltyper.model import SCNYM

from ._quiet import quiet_run
from ._tasks import DEFAULT_DATA_DIR, UNLABELLED, TransferTask, kang_control_to_stimulated


def run_scnym(
    task: TransferTask, quick: bool, seed: int, batch_centering: bool = False
) -> np.ndarray:
    adata = task.adata.copy()
    SCNYM.setup_anndata(adata, labels_key="train_label", batch_key=task.batch_key)
    model = SCNYM(adata, seed=seed, batch_centering=batch_centering)
    model.train(max_epochs=3 if quick else None, enable_progress_bar=False)
    return model.predict()[task.scored]


def run_scanvi(task: TransferTask, quick: bool, seed: int) -> np.ndarray:
    import scvi

    scvi.settings.seed = seed
    adata = task.adata.copy()
    scvi.model.SCVI.setup_anndata(adata, batch_key=task.batch_key, labels_key="train_label")
    vae = scvi.model.SCVI(adata, n_layers=2, n_latent=30, gene_likelihood="nb")
    vae.train(max_epochs=2 if quick else 100, enable_progress_bar=False)
    lvae = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category=UNLABELLED)
    lvae.train(max_epochs=2 if quick else 20, n_samples_per_label=100, enable_progress_bar=False)
    return np.asarray(lvae.predict())[task.scored]


def run_logistic_regression(task: TransferTask, quick: bool, seed: int) -> np.ndarray:
    adata = task.adata.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    reference = (adata.obs["train_label"] != UNLABELLED).to_numpy()
    classifier = LogisticRegression(max_iter=200 if quick else 1000, random_state=seed)
    classifier.fit(adata.X[reference], adata.obs["train_label"].to_numpy()[reference])
    return classifier.predict(adata.X[task.scored])


METHODS: dict[str, Callable] = {
    "scnym": run_scnym,
    # SCNYM(batch_centering=True): each condition centred on its own mean.
    "scnym-centred": functools.partial(run_scnym, batch_centering=True),
    "scanvi": run_scanvi,
    "lr": run_logistic_regression,
}


def _summarise(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation of every metric per method over the seeds."""
    summary = []
    for method in dict.fromkeys(row["method"] for row in rows):
        mine = [row for row in rows if row["method"] == method]
        entry = {"method": method, "n_seeds": len(mine)}
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "train_seconds"):
            values = np.array([row[key] for row in mine])
            entry[key], entry[f"{key}_sd"] = float(values.mean()), float(values.std())
        summary.append(entry)
    return summary


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument(
        "--methods", nargs="+", default=["scnym", "scanvi", "lr"], choices=list(METHODS)
    )
    parser.add_argument("--quick", action="store_true", help="2-3 epochs, to check the wiring")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)

    quiet_run()

    task = kang_control_to_stimulated(args.data_dir)
    n_ref = int((task.adata.obs["train_label"] != UNLABELLED).sum())
    print(
        f"Task {task.name}: {n_ref} labelled reference cells, "
        f"{task.adata.n_obs - n_ref} unlabelled query cells, {int(task.scored.sum())} scored, "
        f"{task.adata.n_vars} genes; seeds {args.seeds}"
    )
    rows = []
    for seed in args.seeds:
        for name in args.methods:
            start = time.perf_counter()
            predictions = METHODS[name](task, args.quick, seed)
            seconds = time.perf_counter() - start
            scores = classification_scores(task.y_true, predictions)
            rows.append({"method": name, "seed": seed, **scores, "train_seconds": seconds})
            print(
                f"  seed {seed} {name}: balanced accuracy {scores['balanced_accuracy']:.3f} "
                f"in {seconds:.0f} s",
                flush=True,
            )

    summary = _summarise(rows)
    print(
        "\n| method | accuracy | balanced accuracy | macro F1 | train s | seeds |\n"
        "|---|---|---|---|---|---|"
    )
    for row in summary:
        print(
            f"| {row['method']} | {row['accuracy']:.3f} ± {row['accuracy_sd']:.3f} "
            f"| {row['balanced_accuracy']:.3f} ± {row['balanced_accuracy_sd']:.3f} "
            f"| {row['macro_f1']:.3f} ± {row['macro_f1_sd']:.3f} "
            f"| {row['train_seconds']:.0f} | {row['n_seeds']} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": rows, "summary": summary}, indent=2))
    return summary


if __name__ == "__main__":
    main()
