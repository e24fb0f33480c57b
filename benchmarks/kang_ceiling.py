"""How well can the Kang labels be predicted at all? In-domain cross-validation.

The Kang transfer task scores classifiers trained on labelled control cells against the
labels of the 879 labelled stimulated cells. This script asks what the same methods reach
when the domain shift is taken away: stratified k-fold cross-validation *inside* one
condition, each method trained on the labels of the other folds of the cells it is
scored on (and, like in the transfer task, on unlabelled cells of that condition). A
method cannot be expected to transfer from control to stimulated cells better than it
predicts the stimulated labels when trained on them.

Two parts, each selectable with ``--parts``:

- ``accuracy``: balanced accuracy etc. of the pooled out-of-fold predictions, with the
  per-type recall of each method.
- ``novelty``: each type withheld in turn from the training folds' labels; AUROC of the
  novelty score separating that type's out-of-fold cells from the other out-of-fold
  cells, with no domain shift at all.

Methods come from the benchmark harness (``benchmarks._methods.all_methods``) and run
with its recipes.

Usage::

    python -m benchmarks.kang_ceiling [--domain stimulated|control] [--folds 5]
        [--methods LR kNN CELLULAR ...] [--parts accuracy novelty]
        [--novelty-methods LR CELLULAR] [--max-unlabelled 3000] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from celltyper.metrics import classification_scores, novelty_auroc

from ._methods import FitInput, Method, all_methods, fit_logistic_regression
from ._quiet import quiet_run
from ._report import _table
from ._tasks import DEFAULT_DATA_DIR, UNLABELLED, kang_control_to_stimulated

DEFAULT_METHODS = ["LR", "kNN", "CellTypist", "CELLULAR", "SCNYM", "SCPRETRAIN", "scANVI"]
#: Regularisation of the strongly regularised logistic regression (``LR-C0.01``).
STRONG_L2_C = 0.01
#: Methods of the novelty part: 7 types x k folds fits each.
DEFAULT_NOVELTY_METHODS = ["LR", "CELLULAR"]


def method_registry() -> dict[str, Method]:
    """The harness's methods and ``LR-C0.01``."""
    # The strongest classifier of those tried on these labels: stronger L2 and
    # class-balanced weights.
    strong_l2 = functools.partial(
        fit_logistic_regression, C=STRONG_L2_C, class_weight="balanced", max_iter=3000
    )
    extra = Method("LR-C0.01", "peer", strong_l2, embeds=False, cost_hint=0.0)
    return {**all_methods(), extra.name: extra}


@dataclass
class Domain:
    """The cells of one condition: ``labelled`` marks those with a known type."""

    adata: object
    labelled: np.ndarray

    @property
    def y(self) -> np.ndarray:
        return self.adata.obs["true_label"].to_numpy()


def load_domain(data_dir: Path, condition: str, max_unlabelled: int | None, seed: int) -> Domain:
    """The cells of ``condition`` on the genes of the transfer task (same HVGs).

    The transfer task keeps only the labelled control cells, so ``condition="control"``
    has no unlabelled cells; the stimulated condition keeps up to ``max_unlabelled``
    unlabelled cells (all when ``None``), as the harness does for its query.
    """
    task = kang_control_to_stimulated(data_dir)
    adata = task.adata[(task.adata.obs["condition"] == condition).to_numpy()].copy()
    labelled = (adata.obs["true_label"] != UNLABELLED).to_numpy()
    if max_unlabelled is not None and (~labelled).sum() > max_unlabelled:
        rng = np.random.default_rng(seed)
        keep_unlabelled = rng.choice(np.flatnonzero(~labelled), max_unlabelled, replace=False)
        keep = np.sort(np.concatenate([np.flatnonzero(labelled), keep_unlabelled]))
        adata, labelled = adata[keep].copy(), labelled[keep]
    if labelled.sum() == 0:
        raise ValueError(f"no labelled cells in condition {condition!r}.")
    return Domain(adata, labelled)


def folds(domain: Domain, n_folds: int, seed: int) -> list[np.ndarray]:
    """Indices (into the domain's cells) of the labelled cells of each fold."""
    cells = np.flatnonzero(domain.labelled)
    splitter = StratifiedKFold(n_folds, shuffle=True, random_state=seed)
    return [cells[test] for _, test in splitter.split(cells, domain.y[cells])]


def fit_without(
    method, domain: Domain, hidden: np.ndarray, seed: int, quick: bool, withheld: str | None
):
    """Fit ``method`` with the labels of ``hidden`` cells (and of ``withheld``) removed."""
    adata = domain.adata.copy()
    train_label = np.where(domain.labelled, domain.y, UNLABELLED).astype(object)
    train_label[hidden] = UNLABELLED
    if withheld is not None:
        train_label[train_label == withheld] = UNLABELLED
    adata.obs["train_label"] = pd.Categorical(train_label.astype(str))
    return method.fit(FitInput(adata, "condition", seed, quick))


def out_of_fold(
    method, domain: Domain, splits: list[np.ndarray], seed: int, quick: bool,
    withheld: str | None = None,
) -> pd.DataFrame:  # fmt: skip
    """Annotation table of every labelled cell, each predicted by the fit without its fold."""
    tables = []
    for test in splits:
        fitted = fit_without(method, domain, test, seed, quick, withheld)
        table = fitted.annotate(test)
        table.index = test
        tables.append(table)
    return pd.concat(tables).sort_index()


def accuracy(domain: Domain, splits, methods, seed: int, quick: bool) -> tuple[list, dict]:
    """One row of scores per method, and each method's per-type recall."""
    rows, recalls = [], {}
    cells = np.sort(np.concatenate(splits))
    y = domain.y[cells]
    for method in methods:
        start = time.perf_counter()
        table = out_of_fold(method, domain, splits, seed, quick)
        scores = classification_scores(y, table["prediction"].to_numpy())
        seconds = time.perf_counter() - start
        rows.append({"method": method.name, **scores, "seconds": seconds})
        recall = pd.Series(table["prediction"].to_numpy() == y).groupby(y).mean()
        recalls[method.name] = recall
        print(
            f"  {method.name}: balanced accuracy {scores['balanced_accuracy']:.3f}, accuracy "
            f"{scores['accuracy']:.3f}, macro F1 {scores['macro_f1']:.3f} ({seconds:.0f} s)",
            flush=True,
        )
    return rows, recalls


def novelty(domain: Domain, splits, methods, seed: int, quick: bool) -> pd.DataFrame:
    """AUROC per method and withheld type, with no domain shift."""
    cells = np.sort(np.concatenate(splits))
    y = domain.y[cells]
    out = {}
    for method in methods:
        for withheld in sorted(np.unique(y)):
            table = out_of_fold(method, domain, splits, seed, quick, withheld)
            auroc = novelty_auroc(table["novelty"].to_numpy(), y == withheld)
            out.setdefault(method.name, {})[withheld] = auroc
            print(f"  {method.name} without {withheld}: AUROC {auroc:.3f}", flush=True)
    return pd.DataFrame(out).T


def _markdown(frame: pd.DataFrame) -> str:
    """A frame of floats as a Markdown table, its index as the first column."""
    rows = [[str(name), *(f"{v:.3f}" for v in row)] for name, row in frame.iterrows()]
    return "\n".join(_table([frame.index.name or "", *map(str, frame.columns)], rows))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--domain", default="stimulated", choices=["stimulated", "control"])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--novelty-methods", nargs="+", default=DEFAULT_NOVELTY_METHODS)
    parser.add_argument(
        "--parts", nargs="+", default=["accuracy"], choices=["accuracy", "novelty"]
    )
    parser.add_argument("--max-unlabelled", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 epochs, to check the wiring")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)

    quiet_run(args.threads, also=("celltyper",))
    registry = method_registry()
    unknown = sorted(set(args.methods + args.novelty_methods) - set(registry))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {sorted(registry)}")

    domain = load_domain(args.data_dir, args.domain, args.max_unlabelled, args.seed)
    splits = folds(domain, args.folds, args.seed)
    n_labelled = int(domain.labelled.sum())
    print(
        f"Kang {args.domain} cells: {n_labelled} labelled, "
        f"{domain.adata.n_obs - n_labelled} unlabelled; {args.folds}-fold CV, seed {args.seed}"
    )
    results: dict = {"domain": args.domain, "folds": args.folds, "seed": args.seed}
    if "accuracy" in args.parts:
        methods = [registry[name] for name in args.methods]
        rows, recalls = accuracy(domain, splits, methods, args.seed, args.quick)
        table = pd.DataFrame(rows).set_index("method")
        print("\n" + _markdown(table[["balanced_accuracy", "accuracy", "macro_f1", "seconds"]]))
        recall = pd.DataFrame(recalls).T
        recall.index.name = "recall"
        print("\n" + _markdown(recall))
        results["accuracy"] = rows
        results["recall"] = recall.to_dict("index")
    if "novelty" in args.parts:
        methods = [registry[name] for name in args.novelty_methods]
        table = novelty(domain, splits, methods, args.seed, args.quick)
        table.index.name = "novelty AUROC"
        print("\n" + _markdown(table))
        print("types with AUROC >= 0.85: " + ", ".join(
            f"{name} {int((row >= 0.85).sum())} of {len(row)}" for name, row in table.iterrows()
        ))  # fmt: skip
        results["novelty"] = table.to_dict("index")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    return results


if __name__ == "__main__":
    main()
