"""CELLULAR on Kang et al. 2018: label transfer, integration and novel cell types.

Three measurements, each selectable with ``--parts``:

- ``transfer``: labelled control cells -> stimulated cells (the task of
  ``benchmarks.scnym_kang``), scored on the labelled stimulated cells.
- ``integration``: all 13,999 cells, batch = condition, trained with the labels of the
  1,638 labelled cells; scib-metrics on the labelled cells for CELLULAR, scVI, scANVI and
  the unintegrated PCA, all in the same run.
- ``novelty``: each of the 7 types withheld from the reference in turn; AUROC of the
  novelty score separating that type's stimulated cells from the other scored cells, and
  the fraction flagged novel at the calibrated threshold.

Usage::

    python -m benchmarks.cellular_kang [--quick] [--parts transfer integration novelty]
        [--seeds 0 1 2] [--classifier-training frozen|joint] [--batch-centering auto|on|off]
        [--data-dir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from celltyper.metrics import classification_scores, novelty_auroc
from celltyper.model import CELLULAR

from ._integration import SUMMARY_COLUMNS, _log_normalised, scib_scores
from ._quiet import quiet_run
from ._tasks import (
    DEFAULT_DATA_DIR,
    UNLABELLED,
    TransferTask,
    kang_control_to_stimulated,
    kang_integration,
)


def _fit_cellular(
    adata,
    labels_key: str,
    batch_key: str,
    quick: bool,
    seed: int,
    classifier: str = "frozen",
    batch_centering: bool | str = "auto",
) -> CELLULAR:
    CELLULAR.setup_anndata(adata, labels_key=labels_key, batch_key=batch_key)
    model = CELLULAR(adata, seed=seed, batch_centering=batch_centering)
    model.train(
        max_epochs=2 if quick else 50, classifier_training=classifier, enable_progress_bar=False
    )
    return model


def transfer(
    task: TransferTask,
    quick: bool,
    seeds: list[int],
    classifier: str = "frozen",
    batch_centering: bool | str = "auto",
) -> list[dict]:
    """Balanced accuracy etc. of CELLULAR on the scored query cells, one row per seed."""
    rows = []
    for seed in seeds:
        start = time.perf_counter()
        adata = task.adata.copy()
        model = _fit_cellular(
            adata, "train_label", task.batch_key, quick, seed, classifier, batch_centering
        )
        seconds = time.perf_counter() - start
        predictions = model.predict()[task.scored]
        scores = classification_scores(task.y_true, predictions)
        rows.append({"seed": seed, **scores, "train_seconds": seconds})
        print(f"  transfer seed {seed}: " + _fmt(scores) + f", {seconds:.0f} s", flush=True)
        print(pd.crosstab(task.y_true, predictions, rownames=["true"], colnames=["pred"]))
    return rows


def _scvi_latents(adata, batch_key: str, labels_key: str, quick: bool, seed: int) -> dict:
    import scvi

    scvi.settings.seed = seed
    adata = adata.copy()
    scvi.model.SCVI.setup_anndata(adata, batch_key=batch_key, labels_key=labels_key)
    vae = scvi.model.SCVI(adata, n_layers=2, n_latent=30, gene_likelihood="nb")
    vae.train(max_epochs=2 if quick else 100, enable_progress_bar=False)
    lvae = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category=UNLABELLED)
    lvae.train(max_epochs=2 if quick else 20, n_samples_per_label=100, enable_progress_bar=False)
    return {"scvi": vae.get_latent_representation(), "scanvi": lvae.get_latent_representation()}


def integration(
    data_dir: Path, quick: bool, seed: int, batch_centering: bool | str = "auto"
) -> pd.DataFrame:
    """scib-metrics of CELLULAR, scVI, scANVI and PCA on the labelled Kang cells."""
    task = kang_integration(data_dir)
    adata = task.adata
    if quick:
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(adata.n_obs, size=2000, replace=False))
        adata, mask = adata[keep].copy(), task.mask[keep]
    else:
        mask = task.mask
    model = _fit_cellular(
        adata.copy(), task.label_key, task.batch_key, quick, seed,
        batch_centering=batch_centering,
    )  # fmt: skip
    embeddings = {"cellular": model.get_latent_representation()}
    embeddings |= _scvi_latents(adata, task.batch_key, task.label_key, quick, seed)
    from sklearn.decomposition import PCA

    embeddings["pca"] = PCA(50, random_state=seed).fit_transform(_log_normalised(adata.X))
    return scib_scores(adata, embeddings, task.batch_key, task.label_key, mask=mask)


def withheld_task(task: TransferTask, withheld: str) -> TransferTask:
    """The transfer task with every reference cell of ``withheld`` removed."""
    reference = (task.adata.obs["train_label"] != UNLABELLED).to_numpy()
    drop = reference & (task.adata.obs["true_label"] == withheld).to_numpy()
    return TransferTask(
        f"{task.name}_without_{withheld}",
        task.adata[~drop].copy(),
        task.batch_key,
        task.scored[~drop],
    )


def novelty(
    task: TransferTask, quick: bool, seed: int, batch_centering: bool | str = "auto"
) -> pd.DataFrame:
    """Novelty AUROC and flagged fractions with each cell type withheld in turn."""
    rows = []
    for withheld in sorted(np.unique(task.y_true)):
        sub = withheld_task(task, withheld)
        model = _fit_cellular(
            sub.adata.copy(), "train_label", sub.batch_key, quick, seed,
            batch_centering=batch_centering,
        )  # fmt: skip
        table = model.annotation_table().iloc[np.flatnonzero(sub.scored)]
        is_novel = sub.y_true == withheld
        rows.append(
            {
                "withheld": withheld,
                "n_novel": int(is_novel.sum()),
                "auroc": novelty_auroc(table["novelty"], is_novel),
                "flagged_novel": float(table["novel"][is_novel].mean()),
                "flagged_known": float(table["novel"][~is_novel].mean()),
            }
        )
        print(
            f"  withheld {withheld}: AUROC {rows[-1]['auroc']:.3f}, flagged "
            f"{rows[-1]['flagged_novel']:.2f} of novel / {rows[-1]['flagged_known']:.2f} of "
            "known",
            flush=True,
        )
    return pd.DataFrame(rows)


def _fmt(scores: dict) -> str:
    return ", ".join(f"{key} {value:.3f}" for key, value in scores.items())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["transfer", "integration", "novelty"],
        choices=["transfer", "integration", "novelty"],
    )
    parser.add_argument("--quick", action="store_true", help="2 epochs, to check the wiring")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--classifier-training", default="frozen", choices=["frozen", "joint"],
        help="CELLULAR.train(classifier_training=...) for the transfer part",
    )  # fmt: skip
    parser.add_argument(
        "--batch-centering", default="auto", choices=["auto", "on", "off"],
        help="CELLULAR(batch_centering=...): each condition centred on its own mean "
        "(on; auto, the default, centres as there are 2 conditions) or not (off)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    args.batch_centering = {"on": True, "off": False}.get(args.batch_centering, "auto")

    quiet_run(args.threads, also=("celltyper",))
    results: dict = {}
    if "transfer" in args.parts or "novelty" in args.parts:
        task = kang_control_to_stimulated(args.data_dir)
    if "transfer" in args.parts:
        rows = transfer(
            task, args.quick, args.seeds, args.classifier_training, args.batch_centering
        )
        frame = pd.DataFrame(rows)
        means, sds = frame.mean(numeric_only=True), frame.std(numeric_only=True, ddof=0)
        print("\n| metric | mean | sd |\n|---|---|---|")
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "train_seconds"):
            print(f"| {key} | {means[key]:.3f} | {sds[key]:.3f} |")
        results["transfer"] = rows
    if "integration" in args.parts:
        table = integration(args.data_dir, args.quick, args.seeds[0], args.batch_centering)
        print("\nscib-metrics on the labelled Kang cells (unscaled):")
        print(table.round(3).to_markdown() if _has_tabulate() else table.round(3))
        print("\n" + table[SUMMARY_COLUMNS].round(3).to_string())
        results["integration"] = table.reset_index(names="embedding").to_dict("records")
    if "novelty" in args.parts:
        table = novelty(task, args.quick, args.seeds[0], args.batch_centering)
        print("\n" + table.round(3).to_string(index=False))
        print(f"types with AUROC >= 0.85: {(table['auroc'] >= 0.85).sum()} of {len(table)}")
        results["novelty"] = table.to_dict("records")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    return results


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
