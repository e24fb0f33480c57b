"""SCPRETRAIN on Kang et al. 2018: label efficiency and pretraining cost.

All 13,999 Kang cells (control + stimulated, 2,000 HVGs, raw counts; datasets = the two
conditions). Per seed, 5 % of the 1,638 labelled cells (stratified by cell type, at least
one per type) are given as labels; the other labelled cells are scored. Compared:

- ``pretrained``: ``SCPRETRAIN.train()`` (pretraining on every cell, then fine-tuning);
- ``scratch``: the same network fine-tuned from its random initialisation
  (``train(pretrain=False)``);
- ``lr_pretrained``: logistic regression on the 200-d pretrained representation
  (``celltyper.tl.classic_classifier``, before fine-tuning);
- ``lr_pca``: logistic regression on PCA(200) of log1p(normalize_total 1e4) of every cell.

Then the cost: the first seed's pretraining on all cells (it uses no label) against 100
epochs of scVI on the same cells, timed right after it in this process.

Run from the repository root::

    python -m benchmarks.scpretrain_kang [--quick] [--seeds 0 1 2] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scanpy as sc
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression

import celltyper
from celltyper.metrics import classification_scores, evaluation_scores
from celltyper.model import SCPRETRAIN

from ._quiet import quiet_run
from ._tasks import DEFAULT_DATA_DIR, UNLABELLED, kang_integration

LABEL_FRACTION = 0.05
QUIET = {"enable_progress_bar": False}


def label_subset(truth: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Mask of the labelled cells given as labels: ``fraction`` of each type, >= 1 each."""
    rng = np.random.default_rng(seed)
    given = np.zeros(len(truth), dtype=bool)
    for cell_type in np.unique(truth[truth != UNLABELLED]):
        members = np.flatnonzero(truth == cell_type)
        n = max(1, round(fraction * len(members)))
        given[rng.choice(members, n, replace=False)] = True
    return given


def _scores(truth: np.ndarray, probabilities: pd.DataFrame | np.ndarray, classes) -> dict:
    probs = probabilities.to_numpy() if isinstance(probabilities, pd.DataFrame) else probabilities
    scores = evaluation_scores(truth, probs, classes)
    predicted = np.asarray(classes, dtype=object)[probs.argmax(axis=1)].astype(str)
    scores["macro_f1"] = classification_scores(truth, predicted)["macro_f1"]
    return scores


def pca_embedding(adata, n_components: int, seed: int) -> np.ndarray:
    lognorm = adata.copy()
    sc.pp.normalize_total(lognorm, target_sum=1e4)
    sc.pp.log1p(lognorm)
    x = lognorm.X.toarray() if hasattr(lognorm.X, "toarray") else np.asarray(lognorm.X)
    return PCA(n_components=n_components, random_state=seed).fit_transform(x)


def run_seed(task, seed: int, quick: bool, pca: np.ndarray) -> tuple[list[dict], dict]:
    truth = task.adata.obs["true_label"].astype(str).to_numpy()
    given = label_subset(truth, LABEL_FRACTION, seed)
    scored = (truth != UNLABELLED) & ~given
    adata = task.adata.copy()
    adata.obs["train_label"] = np.where(given, truth, UNLABELLED)
    fine_tune = {"max_epochs": 3 if quick else 200, **QUIET}
    # 30 epochs per phase: the default when docs/models/scpretrain.md's table was run.
    pretrain = {"max_epochs": 2 if quick else 30}
    rows = []

    def record(method, probabilities, classes, seconds, extra=None):
        scores = _scores(truth[scored], probabilities, classes)
        rows.append(
            {"method": method, "seed": seed, **scores, "seconds": seconds, **(extra or {})}
        )
        print(
            f"  seed {seed} {method}: balanced accuracy {scores['balanced_accuracy']:.3f}, "
            f"accuracy {scores['accuracy']:.3f} ({seconds:.0f} s)",
            flush=True,
        )

    SCPRETRAIN.setup_anndata(adata, labels_key="train_label", batch_key=task.batch_key)
    model = SCPRETRAIN(adata, seed=seed)
    tic = time.perf_counter()
    model.pretrain(**pretrain, **QUIET)
    pretrain_seconds = time.perf_counter() - tic
    # LR on the pretrained representation, before any fine-tuning.
    tic = time.perf_counter()
    clf = celltyper.tl.classic_classifier(model, kind="lr", random_state=seed)
    latent = model.get_latent_representation()
    record(
        "lr_pretrained",
        clf[-1].predict_proba(latent[scored]),
        clf.classes_,
        time.perf_counter() - tic,
    )
    tic = time.perf_counter()
    model.train(**fine_tune)
    record(
        "pretrained",
        model.predict(indices=np.flatnonzero(scored), soft=True),
        model.cell_types,
        pretrain_seconds + time.perf_counter() - tic,
        {"pretrain_seconds": pretrain_seconds, "epochs": len(model.history["train_loss"])},
    )

    scratch = SCPRETRAIN(adata, seed=seed)
    tic = time.perf_counter()
    scratch.train(pretrain=False, **fine_tune)
    record(
        "scratch",
        scratch.predict(indices=np.flatnonzero(scored), soft=True),
        scratch.cell_types,
        time.perf_counter() - tic,
        {"epochs": len(scratch.history["train_loss"])},
    )

    tic = time.perf_counter()
    lr = LogisticRegression(max_iter=1000, random_state=seed)
    lr.fit(pca[given], truth[given])
    record("lr_pca", lr.predict_proba(pca[scored]), lr.classes_, time.perf_counter() - tic)
    history = model.pretrain_history_
    pretraining = {
        "n_cells": adata.n_obs,
        "n_genes": adata.n_vars,
        "pretrain_seconds": pretrain_seconds,
        "pretrain_kmeans_seconds": history["kmeans_seconds"],
        "pretrain_train_seconds": history["train_seconds"],
        "pretrain_kmeans_table": history["kmeans"].to_dict(orient="records"),
        "pretrain_loss_first_last": [
            float(history["loss"]["train_loss"].iloc[0]),
            float(history["loss"]["train_loss"].iloc[-1]),
        ],
    }
    return rows, pretraining


def time_scvi(task, quick: bool) -> dict:
    """Wall-clock seconds of 100 epochs of scVI (defaults) on every cell."""
    import scvi

    scvi.settings.seed = 0
    adata = task.adata.copy()
    scvi.model.SCVI.setup_anndata(adata, batch_key=task.batch_key)
    vae = scvi.model.SCVI(adata)
    epochs = 2 if quick else 100
    tic = time.perf_counter()
    vae.train(max_epochs=epochs, early_stopping=False, **QUIET)
    return {"scvi_epochs": epochs, "scvi_seconds": time.perf_counter() - tic}


def summarise(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    metrics = [
        "balanced_accuracy",
        "accuracy",
        "macro_f1",
        "cohen_kappa",
        "macro_auroc",
        "seconds",
    ]
    grouped = frame.groupby("method", sort=False)[metrics]
    return grouped.mean().join(grouped.std(ddof=0), rsuffix="_sd").assign(n_seeds=grouped.size())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--quick", action="store_true", help="2-3 epochs, to check the wiring")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--skip-timing", action="store_true", help="no scVI timing")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)

    quiet_run(1)

    task = kang_integration(args.data_dir)
    truth = task.adata.obs["true_label"].astype(str).to_numpy()
    n_labelled = int((truth != UNLABELLED).sum())
    print(
        f"Kang: {task.adata.n_obs} cells x {task.adata.n_vars} genes, {n_labelled} labelled; "
        f"{LABEL_FRACTION:.0%} of them given as labels; seeds {args.seeds}",
        flush=True,
    )
    pca = pca_embedding(task.adata, 200, 0)
    rows, timing = [], None
    for seed in args.seeds:
        seed_rows, pretraining = run_seed(task, seed, args.quick, pca)
        rows += seed_rows
        if timing is None and not args.skip_timing:
            timing = {**pretraining, **time_scvi(task, args.quick)}
            print(
                f"  pretraining on {timing['n_cells']} cells: {timing['pretrain_seconds']:.1f} s "
                f"(K-means {timing['pretrain_kmeans_seconds']:.1f} s, training "
                f"{timing['pretrain_train_seconds']:.1f} s); scVI {timing['scvi_epochs']} "
                f"epochs right after: {timing['scvi_seconds']:.1f} s",
                flush=True,
            )
    summary = summarise(rows)
    print("\n| method | balanced accuracy | accuracy | macro F1 | kappa | macro AUROC | s |")
    print("|---|---|---|---|---|---|---|")
    for method, row in summary.iterrows():
        print(
            f"| {method} | {row.balanced_accuracy:.3f} ± {row.balanced_accuracy_sd:.3f} "
            f"| {row.accuracy:.3f} ± {row.accuracy_sd:.3f} "
            f"| {row.macro_f1:.3f} ± {row.macro_f1_sd:.3f} "
            f"| {row.cohen_kappa:.3f} ± {row.cohen_kappa_sd:.3f} "
            f"| {row.macro_auroc:.3f} ± {row.macro_auroc_sd:.3f} | {row.seconds:.0f} |"
        )
    result = {"runs": rows, "summary": summary.reset_index().to_dict(orient="records")}
    if timing is not None:
        print(
            f"\nPretraining on all {timing['n_cells']} cells: {timing['pretrain_seconds']:.1f} s; "
            f"scVI, {timing['scvi_epochs']} epochs: {timing['scvi_seconds']:.1f} s"
        )
        result["timing"] = timing
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2, default=float))
    return result


if __name__ == "__main__":
    main()
