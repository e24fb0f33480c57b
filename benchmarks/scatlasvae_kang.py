"""SCATLASVAE on Kang et al. (2018): integration, query surgery and memory, against scvi-tools.

Three measurements, each against its scvi-tools counterpart in the same run:

1. ``integration``: all 13,999 cells, batch = condition, no labels given to either model;
   scib-metrics scores of the SCATLASVAE and scVI latent spaces on the labelled cells.
2. ``surgery``: reference = the labelled control cells; query = every stimulated cell,
   mapped by scArches surgery (``load_query_data``) and fine-tuned; balanced accuracy on
   the labelled stimulated cells, against scANVI by surgery (``SCANVI.load_query_data``).
   The kNN transfer of SCATLASVAE's latent space is reported too.
3. ``memory``: a 100,000-cell x 2,000-gene sparse AnnData (Kang cells resampled with
   noise); each model trains in its own subprocess, which reports its peak RSS and the
   seconds per epoch.

Run from the repository root::

    python -m benchmarks.scatlasvae_kang [--quick] [--parts integration surgery memory]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from celltyper.metrics import classification_scores
from celltyper.model import SCATLASVAE
from celltyper.tl import knn_transfer

from ._integration import scib_scores
from ._quiet import quiet_run
from ._tasks import DEFAULT_DATA_DIR, UNLABELLED, kang_control_to_stimulated, kang_integration

PARTS = ("integration", "surgery", "memory")


# -- 1. integration --------------------------------------------------------------------------
def integration(data_dir: Path, epochs: int, seed: int) -> pd.DataFrame:
    import scvi

    task = kang_integration(data_dir)
    adata = task.adata
    embeddings, seconds = {}, {}

    start = time.perf_counter()
    ours = adata.copy()
    SCATLASVAE.setup_anndata(ours, batch_key=task.batch_key)
    model = SCATLASVAE(ours, seed=seed)
    model.train(max_epochs=epochs, enable_progress_bar=False)
    embeddings["SCATLASVAE"] = model.get_latent_representation()
    seconds["SCATLASVAE"] = time.perf_counter() - start

    start = time.perf_counter()
    scvi.settings.seed = seed
    theirs = adata.copy()
    scvi.model.SCVI.setup_anndata(theirs, batch_key=task.batch_key)
    vae = scvi.model.SCVI(theirs)  # scVI's defaults: 1 x 128 hidden, 10-d latent, ZINB
    vae.train(max_epochs=epochs, enable_progress_bar=False)
    embeddings["scVI"] = vae.get_latent_representation()
    seconds["scVI"] = time.perf_counter() - start

    table = scib_scores(adata, embeddings, task.batch_key, task.label_key, mask=task.mask)
    table["train_seconds"] = pd.Series(seconds)
    return table


# -- 2. surgery --------------------------------------------------------------------------
def _split_transfer_task(data_dir: Path):
    task = kang_control_to_stimulated(data_dir)
    is_reference = (task.adata.obs["train_label"] != UNLABELLED).to_numpy()
    reference = task.adata[is_reference].copy()
    query = task.adata[~is_reference].copy()
    scored = task.scored[~is_reference]
    y_true = query.obs["true_label"].to_numpy()[scored]
    return task, reference, query, scored, y_true


def surgery(
    data_dir: Path, ref_epochs: int, query_epochs: int, seed: int, head_epochs: int | None
) -> pd.DataFrame:
    import scvi

    task, reference, query, scored, y_true = _split_transfer_task(data_dir)
    print(
        f"  surgery: {reference.n_obs} reference cells, {query.n_obs} query cells, "
        f"{int(scored.sum())} scored",
        flush=True,
    )
    rows = {}

    start = time.perf_counter()
    ref = reference.copy()
    SCATLASVAE.setup_anndata(ref, labels_key="train_label", batch_key=task.batch_key)
    model = SCATLASVAE(ref, seed=seed)
    model.train(max_epochs=ref_epochs, n_epochs_prediction=head_epochs, enable_progress_bar=False)
    query_model = SCATLASVAE.load_query_data(query.copy(), model)
    query_model.train(max_epochs=query_epochs, enable_progress_bar=False)
    predictions = query_model.predict()[scored]
    rows["SCATLASVAE (surgery, head)"] = {
        **classification_scores(y_true, predictions),
        "train_seconds": time.perf_counter() - start,
    }
    knn = knn_transfer(model, query)["prediction"].to_numpy()[scored]
    rows["SCATLASVAE (kNN on latent)"] = {**classification_scores(y_true, knn)}

    start = time.perf_counter()
    scvi.settings.seed = seed
    ref = reference.copy()
    scvi.model.SCVI.setup_anndata(ref, batch_key=task.batch_key, labels_key="train_label")
    # scvi-tools' recommended architecture for scArches surgery.
    vae = scvi.model.SCVI(
        ref,
        n_layers=2,
        n_latent=30,
        encode_covariates=True,
        deeply_inject_covariates=False,
        use_layer_norm="both",
        use_batch_norm="none",
    )
    vae.train(max_epochs=ref_epochs, enable_progress_bar=False)
    scanvi = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category=UNLABELLED)
    scanvi.train(
        max_epochs=max(1, ref_epochs // 10), n_samples_per_label=100, enable_progress_bar=False
    )
    scanvi_query = scvi.model.SCANVI.load_query_data(query.copy(), scanvi)
    scanvi_query.train(
        max_epochs=query_epochs,
        plan_kwargs={"weight_decay": 0.0},
        enable_progress_bar=False,
    )
    predictions = np.asarray(scanvi_query.predict())[scored]
    rows["scANVI (surgery)"] = {
        **classification_scores(y_true, predictions),
        "train_seconds": time.perf_counter() - start,
    }
    return pd.DataFrame.from_dict(rows, orient="index")


# -- 3. memory -----------------------------------------------------------------------------
def build_large_adata(data_dir: Path, n_cells: int, seed: int) -> ad.AnnData:
    """``n_cells`` Kang cells drawn with replacement, each count jittered by Poisson noise.

    Built block by block in CSR, so the full dense matrix never exists here either.
    """
    task = kang_integration(data_dir)
    source = sp.csr_matrix(task.adata.X, dtype=np.float32)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, source.shape[0], size=n_cells)
    blocks = []
    for start in range(0, n_cells, 10_000):
        block = source[picks[start : start + 10_000]].copy()
        # Noise on the non-zero counts keeps the sparsity of real data.
        block.data = rng.poisson(block.data).astype(np.float32)
        block.eliminate_zeros()
        blocks.append(block)
    obs = pd.DataFrame(
        {"condition": task.adata.obs["condition"].to_numpy()[picks]},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    return ad.AnnData(X=sp.vstack(blocks).tocsr(), obs=obs, var=task.adata.var[[]].copy())


def _peak_rss_kib() -> int:
    """Peak resident memory of this process since it started (``VmHWM``, KiB).

    ``getrusage(RUSAGE_SELF).ru_maxrss`` is not used: Linux carries the high-water mark of
    the forked parent's memory across ``exec`` into it, so it would report the parent's.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not Linux: best effort


def _memory_child(path: str, method: str, epochs: int) -> None:
    """Runs in a subprocess: train ``method`` on ``path``; print peak RSS and timing."""
    quiet_run(1)
    adata = ad.read_h5ad(path)
    if method == "SCATLASVAE":
        SCATLASVAE.setup_anndata(adata, batch_key="condition")
        model = SCATLASVAE(adata)
    else:
        import scvi

        scvi.model.SCVI.setup_anndata(adata, batch_key="condition")
        model = scvi.model.SCVI(adata)
    # Both models pass over every cell once per epoch (scVI would otherwise hold out 10 %;
    # SCATLASVAE without labels has no validation cells).
    extra = {"train_size": 1.0} if method == "scVI" else {}
    start = time.perf_counter()
    model.train(max_epochs=epochs, enable_progress_bar=False, **extra)
    seconds = time.perf_counter() - start
    peak_kib = _peak_rss_kib()
    print(
        json.dumps(
            {
                "method": method,
                "peak_rss_gib": peak_kib / 2**20,
                "seconds_per_epoch": seconds / epochs,
                "dense_matrix_gib": adata.n_obs * adata.n_vars * 4 / 2**30,
            }
        )
    )


def memory(data_dir: Path, n_cells: int, epochs: int, seed: int) -> pd.DataFrame:
    adata = build_large_adata(data_dir, n_cells, seed)
    print(
        f"  memory: {adata.n_obs} cells x {adata.n_vars} genes, CSR with {adata.X.nnz} "
        f"non-zeros ({adata.X.nnz / (adata.n_obs * adata.n_vars):.1%})",
        flush=True,
    )
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "large.h5ad")
        adata.write_h5ad(path)
        del adata
        for method in ("SCATLASVAE", "scVI"):
            command = [sys.executable, "-m", "benchmarks.scatlasvae_kang"]
            command += ["--memory-child", path, method, "--memory-epochs", str(epochs)]
            out = subprocess.run(
                command,
                check=True,
                capture_output=True,
                text=True,
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rows[result.pop("method")] = result
    return pd.DataFrame.from_dict(rows, orient="index")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--quick", action="store_true", help="a few epochs, to check the wiring")
    parser.add_argument("--epochs", type=int, default=100, help="integration epochs (both)")
    parser.add_argument("--ref-epochs", type=int, default=200, help="surgery reference epochs")
    parser.add_argument("--query-epochs", type=int, default=50, help="surgery query epochs")
    parser.add_argument(
        "--head-epochs",
        type=int,
        default=0,
        help="SCATLASVAE reference: last epochs with the head loss (0: throughout)",
    )
    parser.add_argument("--memory-cells", type=int, default=100_000)
    parser.add_argument("--memory-epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument(
        "--memory-child", nargs=2, metavar=("PATH", "METHOD"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    quiet_run(1)
    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 20)
    if args.memory_child:
        _memory_child(*args.memory_child, args.memory_epochs)
        return {}
    if args.quick:
        args.epochs, args.ref_epochs, args.query_epochs = 2, 2, 2
        args.memory_cells, args.memory_epochs = min(args.memory_cells, 20_000), 1

    results = {}
    if "integration" in args.parts:
        print(f"Integration on Kang, {args.epochs} epochs each", flush=True)
        table = integration(args.data_dir, args.epochs, args.seed)
        print(table[["Batch correction", "Bio conservation", "Total", "train_seconds"]].round(4))
        results["integration"] = table
    if "surgery" in args.parts:
        print(
            f"Surgery control -> stimulated: reference {args.ref_epochs} epochs, query "
            f"{args.query_epochs} epochs",
            flush=True,
        )
        head_epochs = None if args.head_epochs <= 0 else args.head_epochs
        table = surgery(args.data_dir, args.ref_epochs, args.query_epochs, args.seed, head_epochs)
        print(table.round(4))
        results["surgery"] = table
    if "memory" in args.parts:
        print(f"Memory: {args.memory_cells} cells, {args.memory_epochs} epochs each", flush=True)
        table = memory(args.data_dir, args.memory_cells, args.memory_epochs, args.seed)
        print(table.round(3))
        results["memory"] = table
    if args.json is not None:
        args.json.write_text(
            json.dumps({name: t.to_dict(orient="index") for name, t in results.items()}, indent=2)
        )
    return results


if __name__ == "__main__":
    main()
