"""One celltyper model on one spec, with the given ``train()`` keywords: label transfer
scores, calibration, the share of known query cells flagged novel, and the cost.

Compares training settings across protocols (the harness subsample, the whole object)
without the full harness::

    python -m benchmarks.protocol_check --spec kang_whole_object --model SCNYM \\
        --seeds 0 1 2 --train '{"unlabelled_ratio": 1.0}'
    python -m benchmarks.protocol_check --spec baron_human_to_mouse --model CELLULAR \\
        --seeds 0 1 2 --init '{"batch_centering": true}'
    python -m benchmarks.protocol_check --spec kang_whole_object --model CELLULAR \\
        --hvg-flavor seurat  # genes chosen on log1p(CP10k), scanpy's default flavour
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np

from ._quiet import quiet_run
from ._runner import _transfer_novelty
from ._specs import HVG_FLAVORS, builtin_specs, prepare, subsample_unlabelled_query
from ._tasks import DEFAULT_DATA_DIR, UNLABELLED


def check(
    spec_name: str,
    model_name: str,
    seed: int,
    train: dict,
    init: dict | None = None,
    data_dir=DEFAULT_DATA_DIR,
    hvg_flavor: str | None = None,
):
    """Construct ``model_name`` with ``init``, train it on the spec's data with ``train``
    and score the query; ``hvg_flavor`` replaces the spec's gene selection."""
    import celltyper.model
    from celltyper.metrics import classification_scores, expected_calibration_error

    spec = builtin_specs()[spec_name]
    if hvg_flavor is not None:
        spec = dataclasses.replace(spec, hvg_flavor=hvg_flavor)
    adata = prepare(spec, data_dir, seed=seed)
    limit = spec.task_options("transfer").get("max_unlabelled_query")
    if limit is not None:
        adata = subsample_unlabelled_query(adata, int(limit), seed)
    cls = getattr(celltyper.model, model_name)
    cls.setup_anndata(
        adata, labels_key="train_label", unlabeled_category=UNLABELLED, batch_key=spec.batch_key
    )
    model = cls(adata, seed=seed, **(init or {}))
    start = time.perf_counter()
    model.train(enable_progress_bar=False, **train)
    seconds = time.perf_counter() - start
    query = np.flatnonzero(~adata.obs["is_reference"].to_numpy())
    scored = adata.obs["scored"].to_numpy()[query]
    novel_type = adata.obs["novel_type"].to_numpy().astype(bool)[query]
    query_table = model.annotation_table(indices=query)
    novelty = _transfer_novelty(query_table, scored, novel_type)
    table = query_table.iloc[np.flatnonzero(scored)]
    truth = adata.obs["true_label"].to_numpy()[query][scored]
    predicted = table["prediction"].astype(str).to_numpy()
    scores = classification_scores(truth, predicted)
    ece = expected_calibration_error(table["confidence"], predicted == truth)
    return {
        "spec": spec_name,
        "model": model_name,
        "seed": seed,
        "train": train,
        "init": init or {},
        "hvg_flavor": spec.hvg_flavor,
        "balanced_accuracy": round(float(scores["balanced_accuracy"]), 4),
        "accuracy": round(float(scores["accuracy"]), 4),
        "ece": round(float(ece), 4),
        "known_flagged_novel": round(float(table["novel"].mean()), 4),
        **{k: round(v, 4) for k, v in novelty.items() if k != "flagged_known"},
        "epochs": len(model.history["train_loss"]),
        "train_seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.protocol_check")
    parser.add_argument("--spec", required=True, choices=sorted(builtin_specs()))
    parser.add_argument("--model", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--train", type=json.loads, default={}, help="train() keywords, JSON")
    parser.add_argument("--init", type=json.loads, default={}, help="constructor keywords, JSON")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--hvg-flavor", choices=HVG_FLAVORS, default=None, help="default: the spec's"
    )
    args = parser.parse_args(argv)
    quiet_run(args.threads)
    rows = []
    for seed in args.seeds:
        rows.append(
            check(args.spec, args.model, seed, args.train, args.init, hvg_flavor=args.hvg_flavor)
        )
        print(json.dumps(rows[-1]), flush=True)
    values = [row["balanced_accuracy"] for row in rows]
    print(f"balanced accuracy {np.mean(values):.3f} ± {np.std(values):.3f} over {len(rows)} seeds")
    return rows


if __name__ == "__main__":
    main()
