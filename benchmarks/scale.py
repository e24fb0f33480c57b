"""Scale benchmark: training and streaming annotation from an h5ad on disk.

Writes a synthetic h5ad of ``--cells`` cells x the Kang demo's 2,000 genes: each cell a
real Kang cell's counts with Poisson noise (``counts ~ Poisson(profile)``), its
``cell_type`` and ``condition`` kept. The file is written in blocks of rows (the counts
are appended to the CSR arrays on disk), never held whole. Then, for every model and for
scVI / scANVI, each in its own subprocess (so that the peak RSS is the model's own):

- set up on the file opened with ``backed="r"`` and train one epoch (a model that cannot
  train from the backed file yet is trained in memory, with a printed note);
- annotate every cell of the backed file with the streaming writer
  (``annotation_table(write_to=...h5)``; scVI: its latent, scANVI: ``predict``);
- report seconds per epoch (the last epoch of the run, the classifier's), its ratio to
  scANVI's, prediction cells/s and the peak RSS.

::

    python -m benchmarks.scale --cells 100000
    python -m benchmarks.scale --cells 1000000 --models SCNYM SCANVI --skip-train

A shared machine's noise only slows runs down; compare figures of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CELLTYPER_MODELS = ("SCNYM", "CELLULAR", "SCATLASVAE", "SCPRETRAIN", "RANKFORMER")
SCVI_MODELS = ("SCVI", "SCANVI")
MODELS = (*CELLTYPER_MODELS, *SCVI_MODELS)
#: Keywords of the one-epoch training of each model.
_TRAIN = {"SCPRETRAIN": {"pretrain_epochs": 1}}
UNLABELLED = "Unknown"


def write_synthetic_h5ad(
    path: str | Path, n_cells: int, seed: int = 0, chunk_size: int = 20_000
) -> Path:
    """Write ``n_cells`` Poisson-resampled Kang cells to ``path``, block by block.

    Parameters
    ----------
    path
        The h5ad file to write (replaced).
    n_cells
        Number of cells.
    seed
        Seed of the resampling and the noise.
    chunk_size
        Cells generated and appended at a time (bounds the memory).

    Returns
    -------
    The path. ``obs``: ``cell_type`` (the source cell's label, ``Unknown`` where the
    demo has none), ``condition`` and ``source_cell``; ``X``: CSR float32 counts.
    """
    import anndata as ad
    import h5py
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem
    from scipy import sparse

    import celltyper

    if int(n_cells) != n_cells or n_cells < 1:
        raise ValueError(f"n_cells must be a whole number >= 1, got {n_cells!r}.")
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be a whole number >= 1, got {chunk_size!r}.")
    kang = celltyper.datasets.kang_pbmc()
    profiles = sparse.csr_matrix(kang.X, dtype=np.float64)
    rng = np.random.default_rng(seed)
    source = rng.integers(0, kang.n_obs, size=n_cells)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(
                kang.obs["cell_type"].astype(str).to_numpy()[source],
                categories=sorted(kang.obs["cell_type"].astype(str).unique()),
            ),
            "condition": pd.Categorical(kang.obs["condition"].astype(str).to_numpy()[source]),
            "source_cell": source,
        },
        index=pd.Index([f"cell{i}" for i in range(n_cells)]),
    )
    var = pd.DataFrame(index=kang.var_names.copy())
    path = Path(path)
    if path.exists():
        path.unlink()
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        write_elem(f, "obs", obs)
        write_elem(f, "var", var)
        for name in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(f, name, {})
        for start in range(0, n_cells, chunk_size):
            rows = profiles[source[start : start + chunk_size]]
            # Poisson noise on the stored (non-zero) entries: a gene the cell did not
            # express keeps mean 0.
            noisy = rows.copy()
            noisy.data = rng.poisson(noisy.data).astype(np.float64)
            noisy.eliminate_zeros()
            block = sparse.csr_matrix(noisy, dtype=np.float32)
            if start == 0:
                write_elem(f, "X", block)
            else:
                sparse_dataset(f["X"]).append(block)
    check = ad.read_h5ad(path, backed="r")
    if check.shape != (n_cells, kang.n_vars):
        raise RuntimeError(f"wrote {check.shape}, expected {(n_cells, kang.n_vars)}.")
    check.file.close()
    return path


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _EpochTimer:
    """Lightning callback keeping each training epoch's wall time."""

    def __init__(self):
        from lightning.pytorch.callbacks import Callback

        timer = self

        class _Callback(Callback):
            def on_train_epoch_start(self, trainer, pl_module):
                timer._start = time.perf_counter()

            def on_train_epoch_end(self, trainer, pl_module):
                timer.seconds.append(time.perf_counter() - timer._start)

        self.seconds: list[float] = []
        self.callback = _Callback()


def _train(name: str, adata, notes: list[str]):
    """A model of ``name`` set up on ``adata`` and trained one epoch; epoch seconds."""
    timer = _EpochTimer()
    options = {"max_epochs": 1, "enable_progress_bar": False, "callbacks": [timer.callback]}
    if name in SCVI_MODELS:
        import scvi

        scvi.model.SCVI.setup_anndata(adata, labels_key="cell_type", batch_key="condition")
        model = scvi.model.SCVI(adata)
        model.train(**options)
        if name == "SCANVI":
            model = scvi.model.SCANVI.from_scvi_model(model, unlabeled_category=UNLABELLED)
            model.train(**options)
        return model, timer.seconds
    import celltyper.model

    cls = getattr(celltyper.model, name)
    cls.setup_anndata(
        adata, labels_key="cell_type", unlabeled_category=UNLABELLED, batch_key="condition"
    )
    model = cls(adata)
    model.train(**options, **_TRAIN.get(name, {}))
    return model, timer.seconds


def run_model(name: str, path: Path, out_dir: Path, skip_train: bool) -> dict:
    """Train (one epoch) and annotate every cell of ``path`` with model ``name``."""
    import anndata as ad

    notes: list[str] = []
    row: dict = {"model": name}
    backed = ad.read_h5ad(path, backed="r")
    n_cells = backed.n_obs
    if skip_train:
        # Trained on a 20,000-cell block in memory: prediction speed does not depend on
        # how well the model learnt.
        reference = ad.read_h5ad(path, backed="r")[: min(n_cells, 20_000)].to_memory()
        model, _ = _train(name, reference, notes)
        notes.append("trained on 20,000 cells in memory (--skip-train)")
    else:
        training = ad.read_h5ad(path, backed="r")
        start = time.perf_counter()
        try:
            model, epochs = _train(name, training, notes)
            where = "backed"
        except Exception as error:  # reported, then trained in memory
            notes.append(
                f"backed training failed ({type(error).__name__}: {str(error)[:120]}); "
                "trained in memory"
            )
            training = ad.read_h5ad(path)
            start = time.perf_counter()
            model, epochs = _train(name, training, notes)
            where = "memory"
        row["train_s"] = time.perf_counter() - start
        row["epoch_s"] = epochs[-1] if epochs else row["train_s"]
        row["trained_from"] = where
    start = time.perf_counter()
    if name == "SCVI":
        model.get_latent_representation(backed)
        notes.append("scVI: latent of every cell, in memory (no classifier)")
    elif name == "SCANVI":
        model.predict(backed)
        notes.append("scANVI: predict, in memory (scvi-tools' loader)")
    else:
        model.annotation_table(backed, write_to=out_dir / f"{name}.h5")
    seconds = time.perf_counter() - start
    row["predict_cells_per_s"] = n_cells / seconds
    row["peak_rss_mb"] = _peak_rss_mb()
    row["notes"] = notes
    return row


def _run_in_subprocess(name: str, path: Path, out_dir: Path, skip_train: bool) -> dict:
    command = [
        sys.executable,
        "-m",
        "benchmarks.scale",
        "--worker",
        name,
        "--data",
        str(path),
        "--out-dir",
        str(out_dir),
    ] + (["--skip-train"] if skip_train else [])
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
    return {"model": name, "notes": [f"failed (exit {done.returncode}): {' | '.join(tail)}"]}


def format_table(rows: list[dict], n_cells: int) -> str:
    """The report: epoch seconds, ratio to scANVI, prediction cells/s, peak RSS."""
    scanvi = next((r.get("epoch_s") for r in rows if r["model"] == "SCANVI"), None)
    lines = [
        f"{n_cells:,} cells x 2,000 genes",
        f"{'model':<11} {'epoch s':>9} {'x scANVI':>9} {'predict cells/s':>16} "
        f"{'peak RSS MB':>12}",
    ]
    for r in rows:
        epoch = r.get("epoch_s")
        ratio = epoch / scanvi if epoch is not None and scanvi else None
        lines.append(
            f"{r['model']:<11} "
            f"{'-' if epoch is None else f'{epoch:.1f}':>9} "
            f"{'-' if ratio is None else f'{ratio:.2f}':>9} "
            f"{r.get('predict_cells_per_s', float('nan')):>16,.0f} "
            f"{r.get('peak_rss_mb', float('nan')):>12,.0f}"
        )
        for note in r.get("notes", []):
            lines.append(f"    note: {note}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scale", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--cells", type=int, default=100_000, help="cells in the file")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--skip-train", action="store_true", help="time prediction only")
    parser.add_argument("--data", type=Path, default=None, help="reuse this h5ad file")
    parser.add_argument("--out-dir", type=Path, default=None, help="folder of the files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-size", type=int, default=20_000, help="cells per block")
    parser.add_argument("--write-only", action="store_true", help="only write the file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, checked (``--cells`` and ``--chunk-size`` at least 1)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("cells", "chunk_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    if args.worker:
        row = run_model(args.worker, args.data, args.out_dir, args.skip_train)
        print("RESULT " + json.dumps(row), flush=True)
        return
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="celltyper_scale_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = args.data
    if path is None:
        path = out_dir / f"synthetic_{args.cells}.h5ad"
        start = time.perf_counter()
        write_synthetic_h5ad(path, args.cells, args.seed, args.chunk_size)
        size = os.path.getsize(path) / 2**20
        print(f"wrote {path} ({size:,.0f} MiB) in {time.perf_counter() - start:.1f} s")
    if args.write_only:
        return
    import anndata as ad

    n_cells = ad.read_h5ad(path, backed="r").n_obs
    rows = []
    for name in args.models:
        row = _run_in_subprocess(name, path, out_dir, args.skip_train)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(format_table(rows, n_cells))


if __name__ == "__main__":
    main()
