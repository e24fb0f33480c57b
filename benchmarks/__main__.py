"""Benchmark every celltyper model against the peers on the real datasets.

Run from the repository root::

    python -m benchmarks run [--quick] [--data-dir DIR] [--methods ...] [--tasks ...]
                             [--specs ...] [--seeds ...] [--out DIR]

Results (``results.md``, ``results.json`` and PNG plots) go to
``benchmarks/results/<name>/``. See ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from ._quiet import quiet_run
from ._specs import TASKS, load_specs
from ._tasks import DEFAULT_DATA_DIR

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FULL_SEEDS, QUICK_SEEDS = [0, 1, 2], [0]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the benchmark")
    run.add_argument("--quick", action="store_true", help="a few hundred cells, 2 epochs, 1 seed")
    run.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    run.add_argument(
        "--methods", nargs="+", default=None,
        help="method names (celltyper classes, scANVI, scVI, CellTypist, scPoli, LR, kNN, PCA)",
    )  # fmt: skip
    run.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    run.add_argument(
        "--specs", nargs="+", default=None, help="built-in spec names or paths to .toml specs"
    )
    run.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (quick: 0)"
    )
    run.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<time>")
    run.add_argument("--name", default=None, help="name of the results folder")
    run.add_argument("--threads", type=int, default=1, help="CPU threads per method")
    isolate = run.add_mutually_exclusive_group()
    isolate.add_argument(
        "--isolate", dest="isolate", action="store_true", default=None,
        help="one process per method (default outside --quick)",
    )  # fmt: skip
    isolate.add_argument("--no-isolate", dest="isolate", action="store_false")
    run.add_argument(
        "--method-timeout", type=float, default=None, help="seconds per method process"
    )
    run.add_argument(
        "--jobs", type=int, default=None,
        help="methods run side by side (with --isolate); default: CPU cores / --threads",
    )  # fmt: skip
    run.add_argument("--keep-work", action="store_true", help="keep prepared data and latents")
    again = commands.add_parser("report", help="write the results of an interrupted run")
    again.add_argument("out", type=Path, help="the run's results folder")
    worker = commands.add_parser("worker", help="internal: run one method's units")
    worker.add_argument("job", type=Path)
    return parser


def default_jobs(threads: int) -> int:
    """As many methods side by side as the machine has cores for (``threads`` each)."""
    return max(1, (os.cpu_count() or 1) // max(threads, 1))


def select_methods(names: list[str] | None) -> list:
    from ._methods import all_methods

    available = all_methods()
    if not names:
        return list(available.values())
    lookup = {name.lower(): method for name, method in available.items()}
    unknown = [n for n in names if n.lower() not in lookup]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(available)}.")
    return [lookup[n.lower()] for n in names]


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    from ._runner import run_benchmark

    quiet_run(args.threads)
    seeds = args.seeds or (QUICK_SEEDS if args.quick else FULL_SEEDS)
    isolate = (not args.quick) if args.isolate is None else args.isolate
    jobs = args.jobs or default_jobs(args.threads)
    started = datetime.now(UTC)
    name = args.name or started.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    out = args.out or RESULTS_DIR / name
    (out / "_work").mkdir(parents=True, exist_ok=True)
    specs = load_specs(args.specs)
    if args.quick and not args.specs:
        # --quick checks the wiring; specs that only add protocols run when named.
        specs = [spec for spec in specs if spec.in_quick]
    methods = select_methods(args.methods)
    result = {
        "name": out.name,
        "command": "python -m benchmarks " + shlex.join(argv),
        "started": started.isoformat(timespec="seconds"),
        "elapsed_s": None,
        "settings": {
            "quick": args.quick,
            "seeds": seeds,
            "tasks": args.tasks,
            "threads": args.threads,
            "jobs": jobs,
            "isolate": isolate,
            "cpu_count": os.cpu_count(),
            "data_dir": str(args.data_dir),
        },
        "dataset_titles": {s.name: s.description or s.name for s in specs},
        "method_notes": {m.name: m.note for m in methods if m.note},
    }
    # Saved first, so that `python -m benchmarks report` can finish an interrupted run.
    (out / "_work" / "run.json").write_text(json.dumps(result, indent=1))
    print(f"Results in {out}; methods {[m.name for m in methods]}; seeds {seeds}", flush=True)
    start = time.perf_counter()
    rows = run_benchmark(
        specs, methods, args.tasks, seeds, args.data_dir, out, args.quick, isolate,
        threads=args.threads, method_timeout=args.method_timeout, jobs=jobs,
        log=lambda msg: print(msg, flush=True),
    )  # fmt: skip
    result["elapsed_s"] = time.perf_counter() - start
    return finish(result, rows, out, keep_work=args.keep_work)


def finish(result: dict, rows: list[dict], out: Path, keep_work: bool = False) -> dict:
    """Summarise ``rows`` into ``result`` and write the results folder."""
    from ._report import best_vs_peer, summarise, write_results

    summary = summarise(rows)
    result.update(rows=rows, summary=summary, best_vs_peer=best_vs_peer(summary))
    paths = write_results(result, out)
    if not keep_work:
        shutil.rmtree(out / "_work", ignore_errors=True)
    print(paths["markdown"].read_text())
    print(f"Wrote {paths['markdown']}, {paths['json']} and the plots.")
    return result


def report(out: Path) -> dict:
    """Write the results of an interrupted run from the rows its methods finished."""
    from ._runner import read_rows

    work = out / "_work"
    if not (work / "run.json").exists():
        raise SystemExit(f"{work / 'run.json'} not found: is {out} a results folder?")
    result = json.loads((work / "run.json").read_text())
    rows = [row for path in sorted((work / "rows").glob("*.jsonl")) for row in read_rows(path)]
    started = datetime.fromisoformat(result["started"])
    result["elapsed_s"] = (datetime.now(UTC) - started).total_seconds()
    result["command"] += "  (interrupted; written by `python -m benchmarks report`)"
    return finish(result, rows, out, keep_work=True)


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.command == "worker":
        from ._runner import worker_main

        worker_main(args.job)
        return None
    if args.command == "report":
        return report(args.out)
    return run(args, argv)


if __name__ == "__main__":
    main()
