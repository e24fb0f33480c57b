"""Summaries of a run: mean and spread over seeds, a Markdown report, JSON and PNG plots."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

#: Per task: (row key, column title, higher is better).
METRICS: dict[str, list[tuple[str, str, bool]]] = {
    "transfer": [
        ("accuracy", "accuracy", True),
        ("balanced_accuracy", "balanced accuracy", True),
        ("macro_f1", "macro F1", True),
        ("cohen_kappa", "Cohen's kappa", True),
        ("ece", "ECE", False),
        ("flagged_known", "known flagged", False),
        ("novel_type_auroc", "novel-type AUROC", True),
        ("train_seconds", "train s", False),
        ("train_cpu_seconds", "train CPU s", False),
        ("predict_cells_per_s", "predict cells/s", True),
        ("peak_rss_mb", "peak RSS MB", False),
    ],
    "novelty": [
        ("novelty_auroc", "novelty AUROC", True),
        ("flagged_novel", "novel flagged", True),
        ("flagged_known", "known flagged", False),
        ("accuracy_known", "accuracy on known types", True),
        ("train_seconds", "train s", False),
    ],
    "label_efficiency": [
        ("accuracy", "accuracy", True),
        ("balanced_accuracy", "balanced accuracy", True),
        ("macro_f1", "macro F1", True),
        ("train_seconds", "train s", False),
    ],
    "integration": [
        ("Bio conservation", "bio conservation", True),
        ("Batch correction", "batch correction", True),
        ("Total", "total", True),
        ("train_seconds", "train s", False),
        ("peak_rss_mb", "peak RSS MB", False),
    ],
}
LOG_SCALE = ("train_seconds", "train_cpu_seconds", "predict_cells_per_s", "peak_rss_mb")
TASK_TITLES = {
    "transfer": "Label transfer",
    "novelty": "Novel cell types (each reference type withheld in turn)",
    "label_efficiency": "Label efficiency (fraction of the reference labels kept)",
    "integration": "Integration (scib-metrics on the labelled cells)",
}
#: Metrics of the "best celltyper model vs best peer" table.
HEADLINE = {
    "transfer": [
        "accuracy", "balanced_accuracy", "macro_f1", "cohen_kappa", "ece",
        "train_seconds", "predict_cells_per_s", "peak_rss_mb",
    ],
    "novelty": ["novelty_auroc", "flagged_novel"],
    "label_efficiency": ["balanced_accuracy"],
    "integration": ["Bio conservation", "Batch correction", "Total"],
}  # fmt: skip


def _group_variant(row: dict) -> str:
    # Novelty results are averaged over the withheld types; label efficiency is not.
    return "" if row["task"] == "novelty" else row.get("variant", "")


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation per (task, dataset, variant, method) over its runs.

    For novelty the runs are every (seed, withheld type). Failed runs are counted in
    ``n_failed`` and left out of the means.
    """
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["task"], row["dataset"], _group_variant(row), row["method"], row["family"])
        groups.setdefault(key, []).append(row)
    summary = []
    for (task, dataset, variant, method, family), members in groups.items():
        ok = [r for r in members if r["status"] == "ok"]
        entry = {
            "task": task,
            "dataset": dataset,
            "variant": variant,
            "method": method,
            "family": family,
            "n_runs": len(ok),
            "n_failed": len(members) - len(ok),
            "seeds": sorted({r["seed"] for r in ok}),
            "status": "ok" if ok else members[0]["status"],
            "error": "" if ok else members[0].get("error", ""),
        }
        for key, _, _ in METRICS.get(task, []):
            values = np.array([r[key] for r in ok if r.get(key) is not None], dtype=float)
            values = values[np.isfinite(values)]
            entry[key] = float(values.mean()) if len(values) else None
            entry[f"{key}_sd"] = float(values.std()) if len(values) else None
        summary.append(entry)
    return summary


def best_vs_peer(summary: list[dict]) -> list[dict]:
    """For each headline metric: the best celltyper model, the best peer and the gap."""
    out = []
    keys = sorted({(s["task"], s["dataset"], s["variant"]) for s in summary})
    for task, dataset, variant in keys:
        entries = [
            s
            for s in summary
            if (s["task"], s["dataset"], s["variant"]) == (task, dataset, variant)
        ]
        directions = {k: up for k, _, up in METRICS.get(task, [])}
        for metric in HEADLINE.get(task, []):
            best = {}
            for family in ("celltyper", "peer"):
                scored = [
                    s for s in entries if s["family"] == family and s.get(metric) is not None
                ]
                if scored:
                    pick = max if directions[metric] else min
                    best[family] = pick(scored, key=lambda s: s[metric])
            if len(best) < 2:
                continue
            ours, peer = best["celltyper"], best["peer"]
            out.append(
                {
                    "task": task,
                    "dataset": dataset,
                    "variant": variant,
                    "metric": metric,
                    "higher_is_better": directions[metric],
                    "best_celltyper": ours["method"],
                    "celltyper_value": ours[metric],
                    "best_peer": peer["method"],
                    "peer_value": peer[metric],
                    "gap": ours[metric] - peer[metric],
                }
            )
    return out


def _fmt(key: str, mean: float | None, sd: float | None) -> str:
    if mean is None:
        return "n/a"
    if key in ("predict_cells_per_s", "peak_rss_mb"):
        return f"{mean:,.0f} ± {sd:,.0f}"
    if key.endswith("seconds"):
        return f"{mean:.1f} ± {sd:.1f}"
    return f"{mean:.3f} ± {sd:.3f}"


def _number(key: str, value: float, sign: bool = False) -> str:
    plus = "+" if sign else ""
    if key in ("predict_cells_per_s", "peak_rss_mb"):
        return f"{value:{plus},.0f}"
    if key.endswith("seconds"):
        return f"{value:{plus}.1f}"
    return f"{value:{plus}.3f}"


def _table(header: list[str], lines: Iterable[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return out


def _ordered(entries: list[dict]) -> list[dict]:
    return sorted(entries, key=lambda s: (s["family"] != "celltyper", s["method"]))


def _method_cell(entry: dict) -> str:
    failed = f" ({entry['n_failed']} failed)" if entry["n_failed"] and entry["n_runs"] else ""
    return f"{entry['method']}{failed}"


def _novelty_by_type_table(rows: list[dict], dataset: str, entries: list[dict]) -> list[str]:
    """Methods x withheld types: the novelty AUROC of each type, averaged over seeds."""
    mine = [
        r
        for r in rows
        if r["task"] == "novelty" and r["dataset"] == dataset and r["status"] == "ok"
    ]
    types = sorted({r["variant"] for r in mine})
    body = []
    for entry in _ordered(entries):
        cells = []
        for cell_type in types:
            values = [
                r["novelty_auroc"]
                for r in mine
                if r["method"] == entry["method"] and r["variant"] == cell_type
            ]
            cells.append(_number("novelty_auroc", float(np.mean(values))) if values else "n/a")
        body.append([entry["method"], *cells])
    return _table(["method", *types], body)


def markdown_report(result: dict) -> str:
    """The run as Markdown: one table per task and dataset, the best-vs-peer table, errors."""
    summary, titles = result["summary"], result.get("dataset_titles", {})
    settings = result["settings"]
    mode = "in process"
    if settings["isolate"]:
        jobs = settings.get("jobs") or 1
        mode = f"one process per method, {jobs} side by side; scVI and scANVI share one"
    lines = [f"# Benchmark results: {result['name']}", ""]
    lines += [
        f"Command: `{result['command']}`",
        "",
        f"Started {result['started']}, {result['elapsed_s'] / 60:.1f} min on "
        f"{settings['cpu_count']} CPU cores ({settings['threads']} thread(s) per method; "
        f"{mode}{'; --quick' if settings['quick'] else ''}). Mean ± standard deviation "
        "over the runs (seeds; for novelty, seeds x withheld types).",
        "",
    ]
    for task in ("transfer", "novelty", "label_efficiency", "integration"):
        entries = [s for s in summary if s["task"] == task and s["status"] == "ok"]
        for dataset in dict.fromkeys(s["dataset"] for s in entries):
            mine = [s for s in entries if s["dataset"] == dataset]
            lines += [f"## {TASK_TITLES[task]}: {titles.get(dataset, dataset)}", ""]
            if task == "label_efficiency":
                lines += _label_efficiency_table(mine)
            else:
                metrics = METRICS[task]
                header = ["method", *[title for _, title, _ in metrics], "runs"]
                body = [
                    [
                        _method_cell(s),
                        *[_fmt(k, s.get(k), s.get(f"{k}_sd")) for k, _, _ in metrics],
                        str(s["n_runs"]),
                    ]
                    for s in _ordered(mine)
                ]
                lines += _table(header, body)
            if task == "novelty":
                lines += ["", "Novelty AUROC per withheld type (mean over seeds):", ""]
                lines += _novelty_by_type_table(result.get("rows", []), dataset, mine)
            lines.append("")
    comparisons = result.get("best_vs_peer", [])
    if comparisons:
        lines += ["## Best celltyper model against the best peer", ""]
        body = []
        for c in comparisons:
            where = titles.get(c["dataset"], c["dataset"])
            if c["variant"]:
                where += f" ({float(c['variant']):.0%} labels)"
            arrow = "" if c["higher_is_better"] else " (lower is better)"
            body.append(
                [
                    c["task"],
                    where,
                    c["metric"].replace("_", " ") + arrow,
                    f"{c['best_celltyper']} {_number(c['metric'], c['celltyper_value'])}",
                    f"{c['best_peer']} {_number(c['metric'], c['peer_value'])}",
                    _number(c["metric"], c["gap"], sign=True),
                ]
            )
        lines += _table(["task", "data", "metric", "best celltyper", "best peer", "gap"], body)
        lines.append("")
    notes = result.get("method_notes", {})
    if notes:
        lines += ["## How the methods ran", ""]
        lines += [f"- {name}: {note}" for name, note in notes.items()]
        lines.append("")
    problems = [s for s in summary if s["status"] != "ok" or s["n_failed"]]
    if problems:
        lines += ["## Not available and failed runs", ""]
        for s in problems:
            detail = s["error"] or "some runs failed; see results.json"
            lines.append(
                f"- {s['method']}, {s['task']} {s['dataset']} {s['variant']}: "
                f"{s['status']}: {detail}".replace("  ", " ")
            )
        lines.append("")
    return "\n".join(lines)


def _label_efficiency_table(entries: list[dict]) -> list[str]:
    fractions = sorted({s["variant"] for s in entries}, key=float)
    header = ["method"]
    for key in ("balanced_accuracy", "accuracy"):
        header += [f"{key.replace('_', ' ')} {float(f):.0%}" for f in fractions]
    body = []
    for method in dict.fromkeys(s["method"] for s in _ordered(entries)):
        by_fraction = {s["variant"]: s for s in entries if s["method"] == method}
        line = [method]
        for key in ("balanced_accuracy", "accuracy"):
            for f in fractions:
                s = by_fraction.get(f)
                line.append(_fmt(key, s.get(key), s.get(f"{key}_sd")) if s else "n/a")
        body.append(line)
    return _table(header, body)


# -- plots --------------------------------------------------------------------------------
def plot_results(result: dict, out_dir: Path) -> list[Path]:
    """A bar chart per metric and a scatter of accuracy against training time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = [s for s in result["summary"] if s["status"] == "ok"]
    titles = result.get("dataset_titles", {})
    written = []
    for task, metrics in METRICS.items():
        entries = [s for s in summary if s["task"] == task]
        if not entries:
            continue
        groups = list(dict.fromkeys((s["dataset"], s["variant"]) for s in entries))
        methods = list(dict.fromkeys(s["method"] for s in _ordered(entries)))
        for key, title, higher in metrics:
            if all(s.get(key) is None for s in entries):
                continue  # e.g. no method has a default novelty threshold
            fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * len(methods) / 3), 4))
            width = 0.8 / len(methods)
            for i, method in enumerate(methods):
                means, sds = [], []
                for dataset, variant in groups:
                    match = [
                        s
                        for s in entries
                        if (s["dataset"], s["variant"], s["method"]) == (dataset, variant, method)
                    ]
                    value = match[0].get(key) if match else None
                    means.append(np.nan if value is None else value)
                    sds.append(0.0 if value is None else match[0].get(f"{key}_sd") or 0.0)
                x = np.arange(len(groups)) + (i - (len(methods) - 1) / 2) * width
                ax.bar(x, means, width, yerr=sds, label=method, capsize=2)
            labels = [
                titles.get(d, d) + (f"\n{float(v):.0%} labels" if v else "") for d, v in groups
            ]
            ax.set_xticks(np.arange(len(groups)), labels, fontsize=8)
            ax.set_ylabel(title + ("" if higher else " (lower is better)"))
            ax.set_title(f"{TASK_TITLES[task]}: {title}", fontsize=10)
            positive = [s[key] for s in entries if s.get(key) is not None and s[key] > 0]
            if key in LOG_SCALE and positive:
                ax.set_yscale("log")
            ax.legend(fontsize=7, ncol=2)
            fig.tight_layout()
            path = out_dir / f"bar_{task}_{key.replace(' ', '_').lower()}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(path)
    transfer = [s for s in summary if s["task"] == "transfer"]
    datasets = list(dict.fromkeys(s["dataset"] for s in transfer))
    if datasets:
        fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
        for ax, dataset in zip(axes[0], datasets, strict=True):
            for s in transfer:
                if s["dataset"] != dataset or s.get("accuracy") is None:
                    continue
                if s.get("train_seconds") is None:
                    continue
                color = "tab:red" if s["family"] == "celltyper" else "tab:blue"
                ax.errorbar(
                    s["train_seconds"], s["accuracy"], yerr=s["accuracy_sd"], fmt="o", color=color
                )
                ax.annotate(s["method"], (s["train_seconds"], s["accuracy"]), fontsize=8)
            ax.set_xscale("log")
            ax.set_xlabel("training seconds (log scale)")
            ax.set_ylabel("accuracy")
            ax.set_title(titles.get(dataset, dataset), fontsize=10)
        fig.suptitle("Accuracy against training time (red: celltyper, blue: peers)", fontsize=10)
        fig.tight_layout()
        path = out_dir / "scatter_accuracy_vs_train_time.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def write_results(result: dict, out_dir: Path) -> dict[str, Path]:
    """results.json, results.md and the plots, in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    paths["json"].write_text(json.dumps(result, indent=1, default=float))
    paths["markdown"].write_text(markdown_report(result))
    for i, path in enumerate(plot_results(result, out_dir)):
        paths[f"plot{i}"] = path
    return paths
