"""Run the benchmark: prepare each dataset once, then run every method over its units.

A *unit* is one training of one method: (task, dataset, seed, variant), where the
variant is the withheld type of a novelty unit or the label fraction of a
label-efficiency unit. By default (always outside ``--quick``) each method runs all its
units in a fresh Python process (``python -m benchmarks worker JOB``): its imports, peak
memory and crashes stay its own, and a method that fails or runs out of time becomes
error rows while the others carry on. Inside a unit a sampling thread records the
process's peak resident memory (RSS) over training and prediction.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import psutil

from celltyper.metrics import classification_scores, expected_calibration_error, novelty_auroc

from ._specs import TaskSpec, prepare, subsample_unlabelled_query
from ._tasks import UNLABELLED

RSS_INTERVAL_S = 0.02
LABEL_FRACTIONS = (0.01, 0.05, 0.2)


@dataclass(frozen=True)
class Unit:
    task: str
    dataset: str
    seed: int
    variant: str = ""

    @property
    def key(self) -> str:
        return f"{self.task}/{self.dataset}/{self.seed}/{self.variant}"


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled in a thread."""

    def __init__(self, interval: float = RSS_INTERVAL_S):
        self.interval, self.peak = interval, 0
        self._process = psutil.Process()
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


# -- planning ---------------------------------------------------------------------------
def plan_units(
    specs: list[TaskSpec],
    prepared: dict[str, ad.AnnData],
    tasks: list[str],
    seeds: list[int],
    quick: bool,
) -> list[Unit]:
    """Every unit of the run, in the order a worker runs them (transfer first)."""
    units: list[Unit] = []
    order = ("transfer", "integration", "label_efficiency", "novelty")
    for task in order:
        if task not in tasks:
            continue
        for spec in specs:
            if task not in spec.tasks:
                continue
            opts = spec.task_options(task)
            task_seeds = seeds[: int(opts.get("max_seeds", len(seeds)))]
            variants = [""]
            if task == "novelty":
                obs = prepared[spec.name].obs
                types = sorted(set(obs.loc[obs["is_reference"], "train_label"]) - {UNLABELLED})
                variants = [str(t) for t in opts.get("types", types)]
                if quick:
                    variants = variants[:1]
            elif task == "label_efficiency":
                variants = [str(f) for f in opts.get("fractions", LABEL_FRACTIONS)]
            units += [Unit(task, spec.name, s, v) for s in task_seeds for v in variants]
    return units


# -- one unit ---------------------------------------------------------------------------
def unit_data(unit: Unit, adata: ad.AnnData, options: dict, quick: bool) -> ad.AnnData:
    """The AnnData a unit trains on: the task's subset of unscored query cells, then a
    withheld type (novelty) or a fraction of the labels (label efficiency)."""
    max_query = options.get("max_unlabelled_query")
    if max_query is not None and not quick:
        # Seed 0 for every seed and method: all of them see the same cells.
        adata = subsample_unlabelled_query(adata, int(max_query), seed=0)
    if unit.task not in ("novelty", "label_efficiency"):
        return adata
    labels = adata.obs["train_label"].to_numpy()
    if unit.task == "novelty":
        withheld = adata.obs["is_reference"].to_numpy() & (labels == unit.variant)
        return adata[~withheld].copy()
    fraction = float(unit.variant)
    rng = np.random.default_rng(unit.seed)
    keep = np.zeros(adata.n_obs, dtype=bool)
    # Stratified, at least one cell per type, so every reference type stays known.
    for cell_type in sorted(set(labels) - {UNLABELLED}):
        members = np.flatnonzero(labels == cell_type)
        n = max(1, round(fraction * len(members)))
        keep[rng.choice(members, size=n, replace=False)] = True
    adata = adata.copy()
    adata.obs["train_label"] = np.where(keep, labels, UNLABELLED)
    return adata


def evaluate(unit: Unit, fitted, data: ad.AnnData) -> tuple[dict, np.ndarray | None]:
    """Scores of a fitted method on its unit, and the latent for integration units."""
    if unit.task == "integration":
        start = time.perf_counter()
        latent = np.asarray(fitted.latent(), dtype=np.float32)
        return {"latent_seconds": time.perf_counter() - start}, latent
    query = np.flatnonzero(~data.obs["is_reference"].to_numpy())
    start = time.perf_counter()
    table = fitted.annotate(query)
    predict_seconds = time.perf_counter() - start
    scored = data.obs["scored"].to_numpy()[query]
    novel_type = data.obs["novel_type"].to_numpy().astype(bool)[query]
    extra = _transfer_novelty(table, scored, novel_type) if unit.task == "transfer" else {}
    table = table.iloc[np.flatnonzero(scored)]
    y_true = data.obs["true_label"].to_numpy()[query][scored]
    pred = table["prediction"].to_numpy().astype(str)
    row: dict = {
        "predict_seconds": predict_seconds,
        "predict_cells_per_s": len(query) / max(predict_seconds, 1e-9),
        "n_scored": int(scored.sum()),
    }
    if unit.task == "novelty":
        is_novel = y_true == unit.variant
        novel_flag = table["novel"].to_numpy(dtype=float)
        row.update(
            novelty_auroc=novelty_auroc(table["novelty"].to_numpy(dtype=float), is_novel),
            flagged_novel=float(np.mean(novel_flag[is_novel])),
            flagged_known=float(np.mean(novel_flag[~is_novel])),
            accuracy_known=float(np.mean(pred[~is_novel] == y_true[~is_novel])),
            n_novel=int(is_novel.sum()),
        )
        return row, None
    row.update(classification_scores(y_true, pred), **extra)
    confidence = np.clip(table["confidence"].to_numpy(dtype=float), 0.0, 1.0)
    row["ece"] = expected_calibration_error(confidence, pred == y_true)
    return row, None


def _transfer_novelty(table, scored: np.ndarray, novel_type: np.ndarray) -> dict:
    """Known query cells flagged novel, and the AUROC of the query's types that the
    reference lacks (when it has any), on a transfer unit."""
    flags = table["novel"].to_numpy(dtype=float)
    out: dict = {}
    if not np.isnan(flags).all():
        out["flagged_known"] = float(np.mean(flags[scored]))
    if novel_type.any():
        both = scored | novel_type
        scores = table["novelty"].to_numpy(dtype=float)[both]
        out["novel_type_auroc"] = novelty_auroc(scores, novel_type[both])
    return out


def run_unit(
    method, unit: Unit, data: ad.AnnData, batch_key: str, quick: bool, shared: dict | None = None
) -> tuple:
    """Train and score one method on one unit; ``shared`` is the unit's cache of work
    that methods of one process reuse (see :attr:`~benchmarks._methods.Method.process`)."""
    from ._methods import FitInput

    inp = FitInput(data, batch_key, unit.seed, quick, shared={} if shared is None else shared)
    with PeakRSS() as rss:
        start, cpu_start = time.perf_counter(), time.process_time()
        fitted = method.fit(inp)
        train_seconds = time.perf_counter() - start
        # CPU seconds of all threads: less sensitive than wall time to a busy machine.
        train_cpu_seconds = time.process_time() - cpu_start
        row, latent = evaluate(unit, fitted, data)
    # Work reused from another method of the same unit counts as this method's too.
    reused = getattr(fitted, "reused_seconds", (0.0, 0.0))
    row.update(
        train_seconds=train_seconds + reused[0],
        train_cpu_seconds=train_cpu_seconds + reused[1],
        reused_train_seconds=reused[0],
        peak_rss_mb=rss.peak_mb,
        n_cells=int(data.n_obs),
        n_labelled=int((data.obs["train_label"] != UNLABELLED).sum()),
    )
    return row, latent


# -- a worker: all units of one process's methods ------------------------------------------
def set_threads(threads: int) -> None:
    """Torch threads, if torch is loaded (a subprocess gets OMP_NUM_THREADS instead, so
    that methods without torch do not pay for importing it)."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def _preload(method) -> str:
    """Import the method's library before any clock starts; the reason it cannot, or ''."""
    try:
        if method.preload is not None:
            method.preload()
    except ImportError as err:
        return f"{type(err).__name__}: {err}"
    return ""


def run_method_units(job: dict, methods: list | None = None) -> None:
    """Run every unit of the methods ``job["methods"]``, unit by unit (all methods of a
    unit in turn, sharing its cache); rows go to ``job["rows_file"]`` as JSON lines.

    ``methods`` (:class:`~benchmarks._methods.Method`) are looked up by name when omitted.
    """
    import warnings

    from ._methods import all_methods

    warnings.filterwarnings("ignore")
    set_threads(job["threads"])
    from threadpoolctl import threadpool_limits

    if methods is None:
        available = all_methods()
        methods = [available[name] for name in job["methods"]]
    unavailable = {m.name: _preload(m) for m in methods}
    cache: dict[str, ad.AnnData] = {}
    with threadpool_limits(job["threads"]):
        for raw_unit in job["units"]:
            unit = Unit(**raw_unit)
            dataset = job["datasets"][unit.dataset]
            if unit.dataset not in cache:
                cache[unit.dataset] = ad.read_h5ad(dataset["file"])
            shared: dict = {}
            for method in methods:
                if method.runs(unit.task):
                    row = _unit_row(
                        method, unit, dataset, cache, job, unavailable[method.name], shared
                    )
                    with open(job["rows_file"], "a") as handle:
                        handle.write(json.dumps(row, default=float) + "\n")


def _unit_row(method, unit: Unit, dataset: dict, cache: dict, job: dict, unavailable: str,
              shared: dict) -> dict:  # fmt: skip
    """One unit of one method as a result row; failures become error rows."""
    base = {"method": method.name, "family": method.family, **asdict(unit)}
    if unavailable:
        return {**base, "status": "not available", "error": unavailable}
    try:
        options = dataset.get(unit.task, {})
        data = unit_data(unit, cache[unit.dataset], options, job["quick"])
        row, latent = run_unit(method, unit, data, dataset["batch_key"], job["quick"], shared)
        if latent is not None:
            path = Path(job["latent_dir"]) / f"{unit.dataset}__{method.name}__{unit.seed}.npy"
            np.save(path, latent)
            row["latent_file"] = str(path)
        base.update(status="ok", **row)
    except ImportError as err:
        base.update(status="not available", error=f"{type(err).__name__}: {err}")
    except Exception as err:  # one failing unit must not stop the others
        traceback.print_exc()
        base.update(status="error", error=f"{type(err).__name__}: {err}"[:500])
    shown = base.get("error") or _brief(base)
    print(f"[{method.name}] {unit.key}: {base['status']} {shown}", flush=True)
    return base


def _brief(row: dict) -> str:
    keys = ("balanced_accuracy", "novelty_auroc", "train_seconds")
    return " ".join(f"{k}={row[k]:.3f}" for k in keys if k in row)


def worker_main(job_path: Path) -> None:
    run_method_units(json.loads(Path(job_path).read_text()))


def launch(job: dict, methods: list, isolate: bool, timeout: float | None, work: Path) -> str:
    """Run the methods' units, in a subprocess when ``isolate``; returns an error or ''."""
    name = job["name"]
    job_path, log = work / "jobs" / f"{name}.json", work / "logs" / f"{name}.log"
    job_path.write_text(json.dumps(job, indent=1))
    if not isolate:
        run_method_units(job, methods)
        return ""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(job["threads"])
    env["PYTHONWARNINGS"] = "ignore"
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "benchmarks", "worker", str(job_path)]
    with open(log, "w") as handle:
        try:
            proc = subprocess.run(
                command, cwd=root, env=env, stdout=handle, stderr=subprocess.STDOUT,
                timeout=timeout, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return f"timed out after {timeout:.0f} s"
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        return f"worker exited with code {proc.returncode}: {' | '.join(tail)}"[:500]
    return ""


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- the whole run ------------------------------------------------------------------------
def run_benchmark(
    specs: list[TaskSpec],
    methods: list,
    tasks: list[str],
    seeds: list[int],
    data_dir: Path,
    out_dir: Path,
    quick: bool,
    isolate: bool,
    threads: int = 1,
    method_timeout: float | None = None,
    jobs: int = 1,
    log=print,
) -> list[dict]:
    """Prepare the data, run each method's units, score integration; returns the rows."""
    work = out_dir / "_work"
    for sub in ("data", "latent", "jobs", "rows", "logs"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    specs = [s for s in specs if set(s.tasks) & set(tasks)]
    prepared: dict[str, ad.AnnData] = {}
    datasets: dict[str, dict] = {}
    for spec in specs:
        start = time.perf_counter()
        adata = prepare(spec, data_dir, quick=quick)
        path = work / "data" / f"{spec.name}.h5ad"
        adata.write_h5ad(path)
        prepared[spec.name] = adata
        datasets[spec.name] = {
            "file": str(path),
            "batch_key": spec.batch_key,
            **{task: spec.task_options(task) for task in spec.tasks},
        }
        log(
            f"{spec.name}: {adata.n_obs} cells ({int(adata.obs['is_reference'].sum())} "
            f"reference, {int(adata.obs['scored'].sum())} scored) x {adata.n_vars} genes, "
            f"prepared in {time.perf_counter() - start:.0f} s"
        )
    units = plan_units(specs, prepared, tasks, seeds, quick)
    settings = {"quick": quick, "threads": threads, "isolate": isolate, "timeout": method_timeout}

    groups = process_groups(methods)

    def one(group: list) -> list[dict]:
        return _run_group(group, units, datasets, work, settings, log)

    if isolate and jobs > 1:
        # Processes run side by side, each with ``threads`` threads, the costliest first,
        # so that the cheap ones fill the gaps instead of a long one finishing alone.
        order = sorted(range(len(groups)), key=lambda i: -sum(m.cost_hint for m in groups[i]))
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {i: pool.submit(one, groups[i]) for i in order}
            per_group = [futures[i].result() for i in range(len(groups))]
    else:
        per_group = [one(group) for group in groups]
    by_method = {m.name: [] for m in methods}
    for group_rows in per_group:
        for row in group_rows:
            by_method[row["method"]].append(row)
    # Rows in the order the methods were given.
    rows = [row for name in by_method for row in by_method[name]]
    score_integration(rows, specs, prepared, threads, log)
    return rows


def process_groups(methods: list) -> list[list]:
    """The methods split into worker processes: one each, except that methods naming the
    same :attr:`~benchmarks._methods.Method.process` share one (in the given order)."""
    groups: dict[str, list] = {}
    for method in methods:
        groups.setdefault(method.process or method.name, []).append(method)
    return list(groups.values())


def _run_group(methods: list, units, datasets, work: Path, settings: dict, log) -> list[dict]:
    """All units of a group of methods; units that produced no row become error rows."""
    rows: list[dict] = []
    runnable = []
    for method in methods:
        mine = [u for u in units if method.runs(u.task)]
        reason = method.unavailable() if mine else None
        if reason:
            log(f"{method.name}: not available: {reason}")
            base = {"method": method.name, "family": method.family}
            rows += [
                {**base, **asdict(u), "status": "not available", "error": reason} for u in mine
            ]
        elif mine:
            runnable.append(method)
    if not runnable:
        return rows
    name = "+".join(m.name for m in runnable)
    mine = [u for u in units if any(m.runs(u.task) for m in runnable)]
    rows_file = work / "rows" / f"{name}.jsonl"
    rows_file.unlink(missing_ok=True)
    job = {
        "name": name,
        "methods": [m.name for m in runnable],
        "units": [asdict(u) for u in mine],
        "datasets": datasets,
        "quick": settings["quick"],
        "threads": settings["threads"],
        "rows_file": str(rows_file),
        "latent_dir": str(work / "latent"),
    }
    start = time.perf_counter()
    isolate = settings["isolate"]
    log(f"{name}: {len(mine)} units{' in a subprocess' if isolate else ''}")
    failure = launch(job, runnable, isolate, settings["timeout"], work)
    done = read_rows(rows_file)
    finished = {
        (r["method"], Unit(r["task"], r["dataset"], r["seed"], r["variant"]).key) for r in done
    }
    for method in runnable:
        base = {"method": method.name, "family": method.family}
        done += [
            {**base, **asdict(u), "status": "error", "error": failure or "no result"}
            for u in mine
            if method.runs(u.task) and (method.name, u.key) not in finished
        ]
    n_ok = sum(r["status"] == "ok" for r in done)
    log(
        f"{name}: {n_ok}/{len(done)} units ok in {time.perf_counter() - start:.0f} s"
        + (f" ({failure})" if failure else "")
    )
    return rows + done


def score_integration(rows, specs, prepared, threads, log) -> None:
    """scib-metrics of every integration latent, one scib run per dataset and seed."""
    for spec in specs:
        mine = [
            r
            for r in rows
            if r["task"] == "integration" and r["dataset"] == spec.name and r["status"] == "ok"
        ]
        for seed in sorted({r["seed"] for r in mine}):
            group = [r for r in mine if r["seed"] == seed]
            adata = prepared[spec.name]
            start = time.perf_counter()
            try:
                from ._integration import scib_scores
                from ._shims import exact_scib_neighbours

                embeddings = {r["method"]: np.load(r["latent_file"]) for r in group}
                with exact_scib_neighbours():
                    table = scib_scores(
                        adata, embeddings, spec.batch_key, "true_label",
                        mask=adata.obs["scored"].to_numpy(), n_jobs=threads,
                    )  # fmt: skip
            except Exception as err:
                traceback.print_exc()
                for r in group:
                    r.update(status="error", error=f"scib: {type(err).__name__}: {err}"[:500])
                continue
            for r in group:
                r.update({str(k): float(v) for k, v in table.loc[r["method"]].items()})
            log(f"scib {spec.name} seed {seed}: {time.perf_counter() - start:.0f} s")
