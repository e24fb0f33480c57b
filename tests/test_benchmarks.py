"""The benchmark harness (``python -m benchmarks run``).

Synthetic data check the pieces (specs, data preparation, variants, scoring, summaries,
shims, error rows, the subprocess worker); the real-data test runs ``--quick`` on
``../shared/data`` (skipped when absent) and checks that every metric is computed.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp
from benchmarks._methods import PEERS, FitInput, Method, all_methods
from benchmarks._report import METRICS, best_vs_peer, markdown_report, summarise
from benchmarks._runner import Unit, evaluate, plan_units, run_benchmark, unit_data
from benchmarks._shims import OneVsRestLogisticRegression, celltypist_train
from benchmarks._specs import TaskSpec, builtin_specs, load_specs, prepare, pseudo_counts
from conftest import make_counts_adata

SYNTHETIC_SPEC = """
name = "synthetic"
description = "synthetic b0 -> b1"
file = "synthetic.h5ad"
label_key = "cell_type"
batch_key = "batch"
unlabelled = ["Unknown", "Novel"]
n_hvg = 60
hvg_batch_key = "batch"
tasks = ["transfer", "novelty", "label_efficiency"]

[reference]
column = "batch"
values = ["b0"]
labelled_only = true

[query]
column = "batch"
values = ["b1"]

[novelty]
types = ["T1"]

[label_efficiency]
fractions = [0.1, 0.5]
"""


@pytest.fixture
def synthetic_spec(tmp_path) -> TaskSpec:
    """A user's own h5ad and spec: batch b0 labelled -> batch b1."""
    adata = make_counts_adata(n_types=4, n_batches=2, cells_per=30, n_genes=80, seed=3)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    adata.write_h5ad(tmp_path / "synthetic.h5ad")
    path = tmp_path / "synthetic.toml"
    path.write_text(SYNTHETIC_SPEC)
    return TaskSpec.from_toml(path)


def test_pseudo_counts_invert_log2_normalised_values():
    counts = np.array([[0, 2, 6, 1], [3, 0, 0, 9]], dtype=float)
    scaled = counts / counts.sum(axis=1, keepdims=True) * 1e4  # normalised, then log2(x + 1)
    rebuilt = pseudo_counts(sp.csr_matrix(np.log2(scaled + 1)))
    np.testing.assert_array_equal(rebuilt.toarray(), [[0, 2, 6, 1], [1, 0, 0, 3]])


def test_spec_rejects_an_unknown_x_kind():
    with pytest.raises(ValueError, match="x must be one of"):
        TaskSpec.from_dict({**tomllib.loads(SYNTHETIC_SPEC), "x": "log1p"})


def test_builtin_specs_parse():
    specs = builtin_specs()
    assert set(specs) == {
        "kang_ctrl_to_stim",
        "cellbench_10x_to_celseq_dropseq",
        "kang_integration",
        "kang_whole_object",
        "baron_human_to_mouse",
        "baron_mouse_to_human",
        "wang_to_xin",
    }
    assert specs["wang_to_xin"].x == "log2_normalised" and specs["kang_ctrl_to_stim"].x == "counts"
    # The whole-object protocol: every cell, scanpy's default HVG flavour, not in --quick.
    whole = specs["kang_whole_object"]
    assert not whole.reference_labelled_only and whole.max_unlabelled_query is None
    assert whole.hvg_flavor == "seurat" and not whole.in_quick
    assert specs["kang_ctrl_to_stim"].in_quick
    assert specs["kang_ctrl_to_stim"].reference.values == ("control",)
    assert specs["kang_ctrl_to_stim"].reference_labelled_only
    assert specs["cellbench_10x_to_celseq_dropseq"].query.values == ("CEL-seq2", "Drop-seq")
    assert specs["kang_integration"].reference is None
    assert specs["kang_ctrl_to_stim"].task_options("label_efficiency")["fractions"] == [
        0.01,
        0.05,
        0.2,
    ]
    assert specs["kang_integration"].task_options("integration")["max_seeds"] == 1


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"name": "x", "file": "f", "label_key": "l", "batch_key": "b"}, "required keys"),
        (
            {"name": "x", "file": "f", "label_key": "l", "batch_key": "b", "tasks": ["sing"]},
            "unknown tasks",
        ),
        (
            {"name": "x", "file": "f", "label_key": "l", "batch_key": "b", "tasks": ["transfer"]},
            "need \\[reference\\]",
        ),
        (
            {
                "name": "x", "file": "f", "label_key": "l", "batch_key": "b",
                "tasks": ["integration"], "reference": {"column": "b", "values": ["1"]},
            },
            "both",
        ),
        (
            {
                "name": "x", "file": "f", "label_key": "l", "batch_key": "b",
                "tasks": ["integration"], "hvgs": 10,
            },
            "unknown keys",
        ),
    ],
)  # fmt: skip
def test_bad_specs_are_rejected(raw, message):
    with pytest.raises(ValueError, match=message):
        TaskSpec.from_dict(raw)


def test_load_specs_names_and_paths(synthetic_spec):
    assert [s.name for s in load_specs(["kang_integration", str(synthetic_spec.path)])] == [
        "kang_integration",
        "synthetic",
    ]
    with pytest.raises(ValueError, match="neither a built-in spec"):
        load_specs(["no_such_spec"])


def test_prepare_from_a_user_spec(synthetic_spec):
    adata = prepare(synthetic_spec, synthetic_spec.path.parent)
    obs = adata.obs
    assert adata.n_vars == 60
    # Reference: labelled b0 cells only (the unlabelled "Novel" b0 cells are dropped).
    assert set(obs.loc[obs["is_reference"], "batch"]) == {"b0"}
    assert (obs.loc[obs["is_reference"], "true_label"] != "Unknown").all()
    assert obs["is_reference"].sum() == 4 * 30
    # Query labels are hidden from training; "Novel" counts as unlabelled and unscored.
    assert (obs.loc[~obs["is_reference"], "train_label"] == "Unknown").all()
    assert obs["scored"].sum() == 4 * 30
    assert not obs.loc[obs["true_label"] == "Unknown", "scored"].any()
    assert (obs.loc[obs["scored"], "batch"] == "b1").all()
    np.testing.assert_array_equal(adata.X.data, np.round(adata.X.data))  # raw counts


def test_query_types_the_reference_lacks_are_marked_novel_not_scored(synthetic_spec):
    raw = ad.read_h5ad(synthetic_spec.path.parent / "synthetic.h5ad")
    raw.obs["cell_type"] = raw.obs["cell_type"].astype(str)
    is_ref_t3 = (raw.obs["batch"] == "b0").to_numpy() & (raw.obs["cell_type"] == "T3").to_numpy()
    raw.obs.loc[is_ref_t3, "cell_type"] = "Unknown"  # the reference loses T3
    raw.write_h5ad(synthetic_spec.path.parent / "synthetic.h5ad")
    obs = prepare(synthetic_spec, synthetic_spec.path.parent).obs
    t3_query = (~obs["is_reference"] & (obs["true_label"] == "T3")).to_numpy()
    assert t3_query.sum() == 30
    assert obs["novel_type"].to_numpy()[t3_query].all() and obs["novel_type"].sum() == 30
    assert not obs["scored"].to_numpy()[t3_query].any()
    assert obs["scored"].sum() == 3 * 30


def test_hvg_flavor_seurat_ranks_log_normalised_counts(synthetic_spec):
    raw = synthetic_spec.__dict__ | {"hvg_flavor": "seurat", "n_hvg": 20}
    spec = TaskSpec(**raw)
    adata = prepare(spec, synthetic_spec.path.parent)
    assert adata.n_vars == 20
    np.testing.assert_array_equal(adata.X.data, np.round(adata.X.data))  # still raw counts
    counts = ad.read_h5ad(synthetic_spec.path.parent / "synthetic.h5ad")
    counts = counts[counts.obs_names.isin(adata.obs_names)].copy()
    sc.pp.normalize_total(counts, target_sum=1e4)
    sc.pp.log1p(counts)
    expected = sc.pp.highly_variable_genes(
        counts, n_top_genes=20, flavor="seurat", batch_key="batch", inplace=False
    )
    assert set(adata.var_names) == set(counts.var_names[expected["highly_variable"]])
    with pytest.raises(ValueError, match="hvg_flavor"):
        TaskSpec.from_dict({**tomllib.loads(SYNTHETIC_SPEC), "hvg_flavor": "cell_ranger"})


def test_variants_withhold_a_type_and_subsample_labels(synthetic_spec):
    adata = prepare(synthetic_spec, synthetic_spec.path.parent)
    novel = unit_data(Unit("novelty", "synthetic", 0, "T1"), adata, {}, quick=False)
    ref = novel.obs["is_reference"]
    assert "T1" not in set(novel.obs.loc[ref, "train_label"])
    assert (novel.obs.loc[~ref, "true_label"] == "T1").sum() == 30  # still in the query
    few = unit_data(Unit("label_efficiency", "synthetic", 1, "0.1"), adata, {}, quick=False)
    kept = few.obs["train_label"].value_counts().drop("Unknown")
    assert kept.to_dict() == {"T0": 3, "T1": 3, "T2": 3, "T3": 3}
    again = unit_data(Unit("label_efficiency", "synthetic", 1, "0.1"), adata, {}, quick=False)
    assert (again.obs["train_label"] == few.obs["train_label"]).all()  # seeded
    assert few.n_obs == adata.n_obs


def test_plan_units_counts(synthetic_spec):
    adata = prepare(synthetic_spec, synthetic_spec.path.parent)
    units = plan_units([synthetic_spec], {"synthetic": adata}, ["transfer", "novelty",
                       "label_efficiency"], [0, 1], quick=False)  # fmt: skip
    tasks = [u.task for u in units]
    assert tasks.count("transfer") == 2
    assert tasks.count("novelty") == 2  # one listed type x 2 seeds
    assert tasks.count("label_efficiency") == 4  # 2 fractions x 2 seeds
    assert tasks[0] == "transfer"


class _Perfect:
    """A fitted method that knows the answer, with a novelty score that marks T1."""

    def __init__(self, adata):
        self.adata = adata

    def annotate(self, indices):
        import pandas as pd

        truth = self.adata.obs["true_label"].to_numpy()[indices]
        return pd.DataFrame(
            {
                "prediction": truth,
                "confidence": np.full(len(indices), 0.75),
                "novelty": (truth == "T1").astype(float),
                "novel": (truth == "T1").astype(float),
            }
        )


def test_evaluate_scores_by_hand(synthetic_spec):
    adata = prepare(synthetic_spec, synthetic_spec.path.parent)
    row, latent = evaluate(Unit("transfer", "synthetic", 0), _Perfect(adata), adata)
    assert latent is None
    assert row["accuracy"] == 1.0 and row["macro_f1"] == 1.0
    assert row["ece"] == pytest.approx(0.25)  # confidence 0.75, always right
    assert row["n_scored"] == 120
    row, _ = evaluate(Unit("novelty", "synthetic", 0, "T1"), _Perfect(adata), adata)
    assert row["novelty_auroc"] == 1.0
    assert row["flagged_novel"] == 1.0 and row["flagged_known"] == 0.0
    assert row["n_novel"] == 30


def test_ovr_shim_matches_binary_fits():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 5))
    y = np.repeat(["a", "b", "c"], 30)
    x[y == "b", 0] += 2
    model = OneVsRestLogisticRegression(max_iter=500).fit(x, y)
    assert model.coef_.shape == (3, 5)
    binary = LogisticRegression(max_iter=500).fit(x, y == "b")
    np.testing.assert_allclose(model.coef_[1], binary.coef_[0], rtol=1e-5)
    np.testing.assert_allclose(model.decision_function(x)[:, 1], binary.decision_function(x))


def test_celltypist_trains_through_the_shim():
    import importlib

    import anndata as ad

    ct_train = importlib.import_module("celltypist.train")
    original = ct_train.LogisticRegression
    rng = np.random.default_rng(1)
    x = rng.poisson(2.0, size=(60, 20)).astype(np.float32)
    x[:30, :5] += 10
    x = np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)
    data = ad.AnnData(x)
    data.obs["label"] = np.repeat(["A", "B"], 30)
    data.var_names = [f"g{i}" for i in range(20)]
    model = celltypist_train(data, labels="label", check_expression=False, n_jobs=1)
    assert list(model.cell_types) == ["A", "B"]
    assert isinstance(model.classifier, OneVsRestLogisticRegression)
    assert ct_train.LogisticRegression is original  # patched only during the call


def test_summary_mean_spread_and_best_vs_peer():
    rows = [
        {"method": "M", "family": "celltyper", "task": "transfer", "dataset": "d", "seed": s,
         "variant": "", "status": "ok", "accuracy": a, "ece": 0.1}
        for s, a in [(0, 0.8), (1, 0.9)]
    ] + [
        {"method": "P", "family": "peer", "task": "transfer", "dataset": "d", "seed": 0,
         "variant": "", "status": "ok", "accuracy": 0.7, "ece": 0.05},
        {"method": "P", "family": "peer", "task": "transfer", "dataset": "d", "seed": 1,
         "variant": "", "status": "error", "error": "boom"},
    ]  # fmt: skip
    summary = {s["method"]: s for s in summarise(rows)}
    assert summary["M"]["accuracy"] == pytest.approx(0.85)
    assert summary["M"]["accuracy_sd"] == pytest.approx(0.05)
    assert summary["P"]["n_runs"] == 1 and summary["P"]["n_failed"] == 1
    best = {b["metric"]: b for b in best_vs_peer(list(summary.values()))}
    assert best["accuracy"]["gap"] == pytest.approx(0.15)
    assert best["ece"]["best_peer"] == "P" and best["ece"]["gap"] == pytest.approx(0.05)


def _failing_fit(inp: FitInput):
    raise RuntimeError("deliberate failure")


def test_run_records_failures_and_writes_every_output(synthetic_spec, tmp_path):
    from benchmarks.__main__ import main

    methods = [m for m in PEERS if m.name in ("LR", "kNN")]
    methods.append(Method("BROKEN", "celltyper", _failing_fit, embeds=False))
    rows = run_benchmark(
        [synthetic_spec], methods, ["transfer", "novelty"], [0], synthetic_spec.path.parent,
        tmp_path / "run", quick=False, isolate=False, log=lambda _: None,
    )  # fmt: skip
    broken = [r for r in rows if r["method"] == "BROKEN"]
    assert len(broken) == 2 and all(r["status"] == "error" for r in broken)
    assert "deliberate failure" in broken[0]["error"]
    ok = [r for r in rows if r["method"] == "LR"]
    assert all(r["status"] == "ok" for r in ok) and ok[0]["accuracy"] > 0.9

    # The command line, on the user's spec, in a subprocess per method.
    out = tmp_path / "cli"
    result = main(["run", "--specs", str(synthetic_spec.path), "--data-dir",
                   str(synthetic_spec.path.parent), "--methods", "LR", "--tasks", "transfer",
                   "--seeds", "0", "1", "--isolate", "--out", str(out)])  # fmt: skip
    assert result["settings"]["isolate"]
    written = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in written["rows"]] == ["ok", "ok"]
    assert all(r["peak_rss_mb"] > 50 for r in written["rows"])
    assert "| LR |" in (out / "results.md").read_text()
    assert (out / "scatter_accuracy_vs_train_time.png").exists()
    assert (out / "bar_transfer_accuracy.png").exists()
    assert not (out / "_work").exists()


def _sharing_fit(inp: FitInput):
    """Trains the unit's LR once (the first method of the process), then reuses it."""
    from benchmarks._methods import fit_logistic_regression

    if "lr" in inp.shared:
        fitted, seconds = inp.shared["lr"]
        fitted = type(fitted)(fitted.classifier, fitted.features)
        fitted.reused_seconds = (seconds, seconds)
        return fitted
    fitted = fit_logistic_regression(inp)
    inp.shared["lr"] = (fitted, 7.0)
    return fitted


def test_methods_of_one_process_share_a_unit_s_work(synthetic_spec, tmp_path):
    from benchmarks._runner import process_groups

    first = Method("FIRST", "peer", _sharing_fit, embeds=False, process="shared")
    alone = Method("ALONE", "peer", _sharing_fit, embeds=False)
    second = Method("SECOND", "peer", _sharing_fit, embeds=False, process="shared")
    assert process_groups([first, alone, second]) == [[first, second], [alone]]
    rows = run_benchmark(
        [synthetic_spec], [first, alone, second], ["transfer"], [0, 1],
        synthetic_spec.path.parent, tmp_path / "run", quick=False, isolate=False,
        log=lambda _: None,
    )  # fmt: skip
    # Rows keep the order the methods were given, whatever process ran them.
    assert [r["method"] for r in rows] == ["FIRST"] * 2 + ["ALONE"] * 2 + ["SECOND"] * 2
    by = {(r["method"], r["seed"]): r for r in rows}
    for seed in (0, 1):
        assert by["FIRST", seed]["reused_train_seconds"] == 0.0
        assert by["ALONE", seed]["reused_train_seconds"] == 0.0
        # SECOND reused FIRST's model of the same unit, and pays for its training.
        assert by["SECOND", seed]["reused_train_seconds"] == 7.0
        assert by["SECOND", seed]["train_seconds"] >= 7.0
        assert by["SECOND", seed]["accuracy"] == by["FIRST", seed]["accuracy"]


def test_every_celltyper_model_is_a_method():
    import celltyper.model

    methods = all_methods()
    for name in celltyper.model.__all__:
        assert methods[name].family == "celltyper"
    assert {"scANVI", "scVI", "CellTypist", "scPoli", "LR", "kNN", "PCA"} <= set(methods)


# -- real data ---------------------------------------------------------------------------
def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


@pytest.mark.realdata
def test_quick_run_computes_every_metric(shared_data_dir, tmp_path):
    """``python -m benchmarks run --quick``: every method, task and metric is present."""
    from benchmarks.__main__ import main

    out = tmp_path / "quick"
    result = main(["run", "--quick", "--data-dir", str(shared_data_dir), "--out", str(out)])
    rows = result["rows"]
    methods = all_methods()
    for row in rows:
        if row["method"] == "scPoli" and row["status"] == "not available":
            continue  # scArches is optional; the reason is in the report
        assert row["status"] == "ok", row
        keys = [k for k, _, _ in METRICS[row["task"]]]
        if row["task"] == "transfer":
            keys.remove("novel_type_auroc")  # the quick specs' queries lack no type
        is_peer = methods[row["method"]].family == "peer"
        if row["task"] in ("novelty", "transfer") and is_peer and row["method"] != "CellTypist":
            # Peers without a default threshold flag nothing.
            keys = [k for k in keys if k not in ("flagged_novel", "flagged_known")]
        missing = [k for k in keys if not _finite(row.get(k))]
        assert not missing, (row["method"], row["task"], missing)
    expected = {
        (m.name, t)
        for m in methods.values()
        for t in ("transfer", "novelty", "label_efficiency", "integration")
        if m.runs(t)
    }
    assert {(r["method"], r["task"]) for r in rows} == expected
    # scANVI starts from the scVI model the scVI row trained on the same unit.
    assert all(r["reused_train_seconds"] > 0 for r in rows if r["method"] == "scANVI")
    transfer_datasets = {r["dataset"] for r in rows if r["task"] == "transfer"}
    assert transfer_datasets == {"kang_ctrl_to_stim", "cellbench_10x_to_celseq_dropseq"}
    report = (out / "results.md").read_text()
    assert "Best celltyper model against the best peer" in report
    assert "Novelty AUROC per withheld type" in report and "## How the methods ran" in report
    assert len(list(out.glob("bar_*.png"))) >= 10
    assert markdown_report(result) == report
    assert isinstance(Path(result["settings"]["data_dir"]), Path)


@pytest.mark.realdata
def test_builtin_kang_specs_match_the_task_loaders(shared_data_dir):
    """The specs give the same cells, genes and scored cells as ``benchmarks._tasks``."""
    from benchmarks._tasks import kang_control_to_stimulated, kang_integration

    specs = builtin_specs()
    task = kang_control_to_stimulated(shared_data_dir)
    adata = prepare(specs["kang_ctrl_to_stim"], shared_data_dir)
    assert adata.obs_names.equals(task.adata.obs_names)
    assert adata.var_names.equals(task.adata.var_names)
    np.testing.assert_array_equal(adata.obs["scored"].to_numpy(), task.scored)
    np.testing.assert_array_equal(adata.obs["train_label"], task.adata.obs["train_label"])
    integration = kang_integration(shared_data_dir)
    adata = prepare(specs["kang_integration"], shared_data_dir)
    assert adata.obs_names.equals(integration.adata.obs_names)
    assert adata.var_names.equals(integration.adata.var_names)
    np.testing.assert_array_equal(adata.obs["scored"].to_numpy(), integration.mask)


def test_report_finishes_an_interrupted_run(tmp_path):
    from benchmarks.__main__ import main

    work = tmp_path / "run" / "_work"
    (work / "rows").mkdir(parents=True)
    (work / "run.json").write_text(
        json.dumps(
            {
                "name": "run",
                "command": "python -m benchmarks run",
                "started": "2026-01-01T00:00:00+00:00",
                "elapsed_s": None,
                "settings": {"quick": False, "threads": 1, "isolate": True, "cpu_count": 2},
            }
        )
    )
    row = {"method": "LR", "family": "peer", "task": "transfer", "dataset": "d", "seed": 0,
           "variant": "", "status": "ok", "accuracy": 0.5, "train_seconds": 1.0}  # fmt: skip
    (work / "rows" / "LR.jsonl").write_text(json.dumps(row) + "\n")
    result = main(["report", str(tmp_path / "run")])
    assert result["summary"][0]["accuracy"] == 0.5
    report = (tmp_path / "run" / "results.md").read_text()
    assert "interrupted" in report and "| LR |" in report


@pytest.mark.realdata
def test_kang_ceiling_hides_each_fold_and_the_withheld_type(shared_data_dir):
    """In-domain cross-validation: a fit never sees the labels it is scored on."""
    from benchmarks import kang_ceiling

    domain = kang_ceiling.load_domain(shared_data_dir, "stimulated", 200, seed=0)
    assert int(domain.labelled.sum()) == 879 and domain.adata.n_obs == 879 + 200
    splits = kang_ceiling.folds(domain, 3, seed=0)
    assert sorted(np.concatenate(splits)) == list(np.flatnonzero(domain.labelled))

    seen: list[FitInput] = []
    spy = Method("spy", "peer", lambda inp: seen.append(inp))
    kang_ceiling.fit_without(spy, domain, splits[0], 0, True, withheld="B")
    train_label = seen[0].adata.obs["train_label"].astype(str).to_numpy()
    hidden = np.zeros(domain.adata.n_obs, dtype=bool)
    hidden[splits[0]] = True
    hidden |= domain.y == "B"
    hidden |= ~domain.labelled
    assert (train_label[hidden] == "Unknown").all()
    np.testing.assert_array_equal(train_label[~hidden], domain.y[~hidden])

    result = kang_ceiling.main(
        ["--data-dir", str(shared_data_dir), "--folds", "2", "--max-unlabelled", "200",
         "--methods", "LR", "--novelty-methods", "LR", "--parts", "accuracy", "novelty"]
    )  # fmt: skip
    (row,) = result["accuracy"]
    assert 0.6 < row["balanced_accuracy"] < 0.95
    aurocs = result["novelty"]["LR"]
    assert len(aurocs) == 7 and all(0.0 <= v <= 1.0 for v in aurocs.values())
