"""Novelty scores and calibration of one celltyper model, every score from one fit.

Each novelty method of :meth:`~celltyper.model.base.ConfidenceMixin.calibrate_novelty`
is a post-hoc score, so one trained model measures them all. Two protocols:

- ``--withheld``: each reference type in turn is removed from the reference (the
  harness's novelty task); AUROC of the withheld type's query cells against the rest;
- otherwise the spec's transfer data; AUROC of the query types the reference lacks
  (``novel_type``, e.g. Baron's mouse-only types), when there are any.

Both report the share of known-type query cells flagged novel, balanced accuracy with and
without majority voting, and the ECE before and after temperature scaling::

    python -m benchmarks.novelty_check --spec kang_ctrl_to_stim --model SCNYM --withheld
    python -m benchmarks.novelty_check --spec cellbench_10x_to_celseq_dropseq --model SCNYM
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from ._quiet import quiet_run
from ._runner import Unit, unit_data
from ._specs import builtin_specs, prepare
from ._tasks import DEFAULT_DATA_DIR, UNLABELLED

METHODS = ("max_probability", "energy", "knn_distance", "mahalanobis")


def _fit(model_name: str, adata, batch_key: str, seed: int, train: dict):
    import celltyper.model

    cls = getattr(celltyper.model, model_name)
    cls.setup_anndata(
        adata, labels_key="train_label", unlabeled_category=UNLABELLED, batch_key=batch_key
    )
    model = cls(adata, seed=seed)
    start = time.perf_counter()
    model.train(enable_progress_bar=False, **train)
    return model, time.perf_counter() - start


def score_fit(model, adata, novel: np.ndarray | None) -> dict:
    """Every novelty method's AUROC and flag rates on the query, and the calibration."""
    from celltyper.metrics import (
        classification_scores,
        expected_calibration_error,
        novelty_auroc,
    )

    query = np.flatnonzero(~adata.obs["is_reference"].to_numpy())
    known = adata.obs["scored"].to_numpy()[query]
    novel = np.zeros(len(query), bool) if novel is None else novel[query]
    truth = adata.obs["true_label"].to_numpy()[query]
    row: dict = {"temperature": round(float(model.temperature_), 3)}
    for method in METHODS:
        model.calibrate_novelty(method=method)
        table = model.annotation_table(indices=query)
        flags, scores = table["novel"].to_numpy(), table["novelty"].to_numpy()
        entry = {"flagged_known": round(float(flags[known].mean()), 4)}
        if novel.any():
            both = known | novel
            entry["auroc"] = round(float(novelty_auroc(scores[both], novel[both])), 4)
            entry["flagged_novel"] = round(float(flags[novel].mean()), 4)
        row[method] = entry
    predicted = table["prediction"].astype(str).to_numpy()
    right = predicted[known] == truth[known]
    row["balanced_accuracy"] = round(
        float(classification_scores(truth[known], predicted[known])["balanced_accuracy"]), 4
    )
    row["ece"] = round(float(expected_calibration_error(table["confidence"][known], right)), 4)
    voted = model.annotation_table(indices=query, majority_voting=True)["majority_voting"]
    voted = voted.astype(str).to_numpy()[known]
    row["balanced_accuracy_majority_voting"] = round(
        float(classification_scores(truth[known], voted)["balanced_accuracy"]), 4
    )
    calibrated = model.temperature_
    model.temperature_ = 1.0
    raw = model.annotation_table(indices=query)["confidence"].to_numpy()[known]
    model.temperature_ = calibrated
    row["ece_uncalibrated"] = round(float(expected_calibration_error(raw, right)), 4)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.novelty_check")
    parser.add_argument("--spec", required=True, choices=sorted(builtin_specs()))
    parser.add_argument("--model", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--withheld", action="store_true", help="withhold each type in turn")
    parser.add_argument("--types", nargs="*", help="withheld types (default: all)")
    parser.add_argument("--train", type=json.loads, default={}, help="train() keywords, JSON")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    quiet_run(args.threads)
    spec = builtin_specs()[args.spec]
    full = prepare(spec, DEFAULT_DATA_DIR, seed=args.seed)
    rows = []
    if args.withheld:
        reference_types = sorted(set(full.obs["train_label"]) - {UNLABELLED})
        task = "novelty" if "novelty" in spec.tasks else "transfer"
        options = spec.task_options(task)
        for withheld in args.types or reference_types:
            unit = Unit("novelty", spec.name, args.seed, withheld)
            adata = unit_data(unit, full, options, quick=False)
            truth = adata.obs["true_label"].to_numpy()
            novel = (truth == withheld) & ~adata.obs["is_reference"].to_numpy()
            adata.obs["scored"] = adata.obs["scored"].to_numpy() & ~novel
            model, seconds = _fit(args.model, adata, spec.batch_key, args.seed, args.train)
            row = {"withheld": withheld, **score_fit(model, adata, novel)}
            rows.append({**row, "train_seconds": round(seconds, 1)})
            print(json.dumps(rows[-1]), flush=True)
    else:
        adata = unit_data(
            Unit("transfer", spec.name, args.seed), full, spec.task_options("transfer"), False
        )
        novel = adata.obs["novel_type"].to_numpy().astype(bool)
        model, seconds = _fit(args.model, adata, spec.batch_key, args.seed, args.train)
        rows.append({**score_fit(model, adata, novel), "train_seconds": round(seconds, 1)})
        print(json.dumps(rows[-1]), flush=True)
    for method in METHODS:
        values = [row[method].get("auroc") for row in rows if "auroc" in row[method]]
        flags = [row[method]["flagged_known"] for row in rows]
        mean = f"AUROC {np.mean(values):.3f}" if values else "AUROC -"
        print(f"{method:16s} {mean}  known flagged {np.mean(flags):.3f}")
    return rows


if __name__ == "__main__":
    main()
