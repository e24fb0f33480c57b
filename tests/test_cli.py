"""The ``celltyper annotate`` command on tiny files (the bundled demo is not run here)."""

from __future__ import annotations

import inspect

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import celltyper
from celltyper import cli
from celltyper.cli import main


def _write_pair(tmp_path, n_genes: int = 60, cells_per: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    profiles = rng.gamma(0.6, 3.0, size=(3, n_genes))
    parts = {}
    for role, shift in (("reference", 1.0), ("query", 1.4)):
        counts = np.vstack([rng.poisson(p * shift, size=(cells_per, n_genes)) for p in profiles])
        obs = pd.DataFrame(
            {
                "cell_type": np.repeat(["A", "B", "C"], cells_per),
                "tech": np.repeat(f"{role}_tech", 3 * cells_per),
            },
            index=[f"{role}_{i}" for i in range(3 * cells_per)],
        )
        adata = ad.AnnData(
            X=sp.csr_matrix(counts.astype(np.float32)),
            obs=obs,
            var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]),
        )
        path = tmp_path / f"{role}.h5ad"
        adata.write_h5ad(path)
        parts[role] = (path, adata)
    return parts


#: Every model the command offers, by its ``--model`` name.
MODEL_NAMES = [name.lower() for name in celltyper.model.__all__]


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_annotate_runs_every_model_with_its_defaults(tmp_path, monkeypatch, model):
    # No --max-epochs, --batch-size or --early-stopping: `celltyper annotate --model M`
    # must work with the model's own training defaults.
    monkeypatch.chdir(tmp_path)
    parts = _write_pair(tmp_path, n_genes=100)
    ref_path, query_path = parts["reference"][0], parts["query"][0]
    query = parts["query"][1]
    code = main(
        [
            "annotate",
            "--reference", str(ref_path),
            "--query", str(query_path),
            "--labels-key", "cell_type",
            "--batch-key", "tech",
            "--model", model,
            "--output", "out",
        ]
    )  # fmt: skip
    assert code == 0
    out = tmp_path / "out"
    table = pd.read_csv(out / "predictions.csv", index_col=0)
    assert list(table.index) == list(query.obs_names)
    assert {"prediction", "confidence", "novelty", "novel"} <= set(table.columns)
    assert table["prediction"].isin(["A", "B", "C"]).all()
    assert table["confidence"].between(0, 1).all()
    annotated = ad.read_h5ad(out / "annotated.h5ad")
    assert annotated.n_obs == query.n_obs
    for column in (model, f"{model}_confidence", f"{model}_novelty", f"{model}_novel"):
        assert column in annotated.obs.columns
    assert annotated.obsm[f"X_{model}"].shape[0] == query.n_obs
    assert annotated.uns["celltyper"]["model"].lower() == model
    png = (out / "umap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    # The input files are left as they were.
    assert ad.read_h5ad(query_path).obs.columns.tolist() == ["cell_type", "tech"]


class _StopBeforeTraining(Exception):
    """Raised by the stand-in ``train`` so that the test needs no training."""


@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ([], {"max_epochs": None, "batch_size": None, "early_stopping": None}),
        (
            ["--max-epochs", "3", "--batch-size", "7", "--no-early-stopping"],
            {"max_epochs": 3, "batch_size": 7, "early_stopping": False},
        ),
        (["--batch-size", "64", "--early-stopping"], {"batch_size": 64, "early_stopping": True}),
    ],
)
def test_training_options_reach_train(tmp_path, monkeypatch, model, extra, expected):
    monkeypatch.chdir(tmp_path)
    parts = _write_pair(tmp_path)
    cls = cli.resolve_model(model)
    signature = inspect.signature(cls.train)
    calls = []

    def recording_train(self, *args, **kwargs):
        # Bound to the real signature, positional or keyword both count.
        calls.append(signature.bind(self, *args, **kwargs).arguments)
        raise _StopBeforeTraining

    monkeypatch.setattr(cls, "train", recording_train)
    argv = ["annotate", "--reference", str(parts["reference"][0])]
    argv += ["--query", str(parts["query"][0]), "--model", model, "--seed", "5", *extra]
    with pytest.raises(_StopBeforeTraining):
        main(argv)
    assert len(calls) == 1
    received = calls[0]
    assert {name: received.get(name, "missing") for name in expected} == expected
    assert received["seed"] == 5


def test_diverged_training_exits_1_with_the_model_s_advice(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    parts = _write_pair(tmp_path)
    cls = cli.resolve_model("scnym")

    def diverging_train(self, *args, **kwargs):
        raise FloatingPointError("SCNYMModule's training loss became nan; lower lr")

    monkeypatch.setattr(cls, "train", diverging_train)
    code = main(["annotate", "--reference", str(parts["reference"][0]),
                 "--query", str(parts["query"][0]), "--model", "scnym"])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "training failed" in err and "lower lr" in err and "Traceback" not in err


def test_model_setup_error_is_a_usage_error_with_the_model_s_message(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    parts = _write_pair(tmp_path)
    reference = parts["reference"][1]
    reference.obs["cell_type"] = "A"  # one cell type: the model refuses to classify
    reference.write_h5ad(parts["reference"][0])
    with pytest.raises(SystemExit) as exit_info:
        main(["annotate", "--reference", str(parts["reference"][0]),
              "--query", str(parts["query"][0]), "--model", "scnym"])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "SCNYM cannot train on these data" in err
    assert "at least two" in err and "--labels-key 'cell_type'" in err


def test_missing_labels_key_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    parts = _write_pair(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "annotate",
                "--reference", str(parts["reference"][0]),
                "--query", str(parts["query"][0]),
                "--labels-key", "no_such_column",
            ]
        )  # fmt: skip
    assert exit_info.value.code == 2
    assert "no_such_column" in capsys.readouterr().err


def test_missing_file_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["annotate", "--reference", "absent.h5ad", "--query", "absent_too.h5ad"])
    assert exit_info.value.code == 2
    assert "absent.h5ad" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "not_h5ad", "empty"])
def test_unreadable_file_is_a_one_line_usage_error(tmp_path, monkeypatch, capsys, damage):
    monkeypatch.chdir(tmp_path)
    parts = _write_pair(tmp_path)
    reference = parts["reference"][0]
    if damage == "truncated":
        reference.write_bytes(reference.read_bytes()[:2000])
    elif damage == "not_h5ad":
        reference.write_text("cell,gene\nc1,3\n")
    else:
        reference.write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        main(["annotate", "--reference", str(reference), "--query", str(parts["query"][0])])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "reference.h5ad" in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1


def test_unknown_model_lists_the_choices(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    parts = _write_pair(tmp_path)
    with pytest.raises(SystemExit):
        main(
            [
                "annotate",
                "--reference", str(parts["reference"][0]),
                "--query", str(parts["query"][0]),
                "--labels-key", "cell_type",
                "--model", "nonexistent",
            ]
        )  # fmt: skip
    assert "scnym" in capsys.readouterr().err.lower()


def test_default_batch_is_the_role_and_query_labels_only_score(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    parts = _write_pair(tmp_path)
    query = parts["query"][1]
    code = main(
        [
            "annotate",
            "--reference", str(parts["reference"][0]),
            "--query", str(parts["query"][0]),
            "--max-epochs", "2",
        ]
    )  # fmt: skip
    assert code == 0
    out = tmp_path / cli.DEFAULT_OUTPUT
    table = pd.read_csv(out / "predictions.csv")
    assert list(table.columns) == [
        "cell",
        "prediction",
        "confidence",
        "novelty",
        "novel",
        "true_label",
    ]
    assert len(table) == query.n_obs
    assert (table["true_label"] == query.obs["cell_type"].to_numpy()).all()
    annotated = ad.read_h5ad(out / "annotated.h5ad")
    assert (annotated.obs["scnym"].astype(str).to_numpy() == table["prediction"]).all()
    # Without --batch-key the model's batches are the roles; the query is marked as such.
    assert (annotated.obs[cli.ROLE_KEY] == "query").all()
    assert annotated.uns["celltyper"]["batch_key"] == cli.ROLE_KEY
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "macro F1" in printed
    assert f"on {query.n_obs} labelled query cells" in printed
    assert (out / "umap.png").stat().st_size > 1000


def test_build_training_data_joins_genes_and_hides_query_labels(tmp_path, capsys):
    parts = _write_pair(tmp_path, n_genes=60)
    reference, query = parts["reference"][1], parts["query"][1]
    labels = reference.obs["cell_type"].astype(str).to_numpy()
    labels[:5] = "Unknown"
    reference.obs["cell_type"] = labels
    reference.write_h5ad(parts["reference"][0])
    # The query lacks the first 10 genes and has one of its own.
    query = query[:, 10:].copy()
    extra = ad.AnnData(
        sp.csr_matrix(np.ones((query.n_obs, 1), dtype=np.float32)),
        obs=query.obs[[]],
        var=pd.DataFrame(index=["query_only"]),
    )
    ad.concat([query, extra], axis=1, merge="first").write_h5ad(parts["query"][0])

    inputs = cli.load_inputs(parts["reference"][0], parts["query"][0])
    assert inputs.batch_key is None and inputs.training_batch_key == cli.ROLE_KEY
    assert inputs.query_labels is not None and inputs.query_labels.notna().all()
    training = cli.build_training_data(inputs)
    assert training.n_obs == reference.n_obs + query.n_obs
    assert training.var_names.tolist() == [f"g{i}" for i in range(10, 60)]
    roles = training.obs[cli.ROLE_KEY].astype(str)
    labels = training.obs[cli.TRAIN_LABELS_KEY].astype(str)
    assert (roles == "query").sum() == query.n_obs
    assert (labels[roles == "query"] == "Unknown").all()
    assert (labels[roles == "reference"] == "Unknown").sum() == 5
    assert set(labels[roles == "reference"]) == {"A", "B", "C", "Unknown"}
    assert "50 shared" in capsys.readouterr().out

    with_batch = cli.build_training_data(
        cli.load_inputs(parts["reference"][0], parts["query"][0], batch_key="tech")
    )
    assert set(with_batch.obs["tech"].astype(str)) == {"reference_tech", "query_tech"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--batch-key", "nope"], "--batch-key 'nope'"),
        (["--max-epochs", "0"], "positive integer"),
    ],
)
def test_bad_options_exit_with_code_2(tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    parts = _write_pair(tmp_path)
    argv = ["annotate", "--reference", str(parts["reference"][0])]
    argv += ["--query", str(parts["query"][0]), *extra]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_reference_without_query_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    parts = _write_pair(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["annotate", "--reference", str(parts["reference"][0])])
    assert exit_info.value.code == 2
    assert "both --reference and --query" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"celltyper {celltyper.__version__}"


def test_model_names_are_case_insensitive():
    assert cli.resolve_model("SCNYM") is cli.resolve_model("scnym") is celltyper.model.SCNYM


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT"])
def test_a_signal_mid_training_exits_non_zero_with_one_line_and_no_files(tmp_path, how):
    import signal
    import subprocess
    import sys
    import time

    parts = _write_pair(tmp_path)
    out = tmp_path / "out"
    command = [
        sys.executable, "-u", "-c", "import sys; from celltyper.cli import main; sys.exit(main())",
        "annotate", "--reference", str(parts["reference"][0]), "--query",
        str(parts["query"][0]), "--model", "scatlasvae", "--max-epochs", "3000",
        "--output", str(out),
    ]  # fmt: skip
    # Ctrl+C's default disposition in the child, whatever an earlier test left in this
    # process (a Lightning fit that handled a KeyboardInterrupt ignores SIGINT after it).
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    for line in process.stdout:
        if line.startswith("Training"):
            break
    time.sleep(3)  # inside the epochs
    process.send_signal(signal.SIGTERM if how == "SIGTERM" else signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == (143 if how == "SIGTERM" else 130), err
    name = "SIGTERM" if how == "SIGTERM" else "Ctrl+C"
    assert err.strip().splitlines()[-1].endswith(f"stopped by {name}; the run did not finish.")
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir()), "an unfinished run wrote files"


def test_a_signal_inside_a_gc_callback_is_raised_again_after_it(monkeypatch):
    # An exception raised in a gc callback (JAX registers one) is printed and dropped, so
    # the handler defers it instead; anywhere else it raises at once.
    import gc
    import inspect
    import os
    import signal

    from celltyper.cli import _parser

    sent = []
    monkeypatch.setattr(os, "kill", lambda pid, signum: sent.append((pid, signum)))

    handler = _parser._raise_when_safe(KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        handler(signal.SIGINT, inspect.currentframe())
    outcomes = []

    def callback(phase, info):
        if phase == "start" and not outcomes:
            outcomes.append(handler(signal.SIGINT, inspect.currentframe()))

    gc.callbacks.append(callback)
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(callback)
    assert outcomes == [None]
    _parser._RESENDS[-1].join(timeout=5)
    assert sent == [(os.getpid(), signal.SIGINT)]  # sent again, after the callback
    _parser._cancel_resends()


def test_help_and_version_do_not_import_the_stack():
    import subprocess
    import sys

    script = (
        "import sys\nfrom celltyper.cli import main\n"
        "for argv in (['--help'], ['--version'], ['annotate', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print('LOADED', [m for m in ('torch', 'scvi', 'lightning', 'anndata') "
        "if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert "LOADED []" in done.stdout, done.stdout + done.stderr


def test_model_names_match_the_models():
    assert list(cli.MODEL_NAMES) == [name.lower() for name in celltyper.model.__all__]


def test_a_run_prints_no_third_party_noise(tmp_path):
    import subprocess
    import sys

    parts = _write_pair(tmp_path)
    command = [
        sys.executable, "-c", "import sys; from celltyper.cli import main; sys.exit(main())",
        "annotate", "--reference", str(parts["reference"][0]), "--query",
        str(parts["query"][0]), "--model", "scnym", "--max-epochs", "2",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    for noise in ("GPU available", "litlogger", "LeafSpec", "attempting to transfer AnnData"):
        assert noise not in output, noise
    assert "Signaling Trainer to stop" not in output
    assert "\x1b[" not in output, "raw ANSI codes in output that is not a terminal"


def test_early_stopping_print_becomes_our_note_and_the_rest_passes_live(capsys):
    import io

    from celltyper.cli._run import _third_party_prints

    with _third_party_prints() as printed:
        print("Epoch 3/100: 3%|", end="\r")
        assert "Epoch 3/100" in capsys.readouterr().out  # passed on at once, not held
        print(
            "Monitored metric validation_loss did not improve in the last 20 records. "
            "Best score: 0.283. Signaling Trainer to stop."
        )
        print("a line of someone else's")
        assert isinstance(printed.encoding, str) and not isinstance(printed, io.StringIO)
    out = capsys.readouterr().out
    assert printed.early_stopped
    assert out == "a line of someone else's\n"


# -- --context-layer: RANKFORMER's paired mode ---------------------------------------------------
def _write_pair_with_context(tmp_path, layer: str = "previous", in_query: bool = True):
    """The tiny pair, each cell given the counts of another cell of its file as context."""
    parts = _write_pair(tmp_path)
    for role, (path, adata) in parts.items():
        if role == "reference" or in_query:
            adata.layers[layer] = adata.X[::-1].copy()
        adata.write_h5ad(path)
    return parts


def test_context_layer_trains_rankformer_in_its_paired_mode(tmp_path, monkeypatch):
    from celltyper.model import RANKFORMER

    monkeypatch.chdir(tmp_path)
    parts = _write_pair_with_context(tmp_path)
    built = []
    original = RANKFORMER.__init__

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(RANKFORMER, "__init__", record)
    code = main(
        [
            "annotate",
            "--reference", str(parts["reference"][0]),
            "--query", str(parts["query"][0]),
            "--model", "rankformer",
            "--context-layer", "previous",
            "--max-epochs", "1",
            "--output", "out",
        ]
    )  # fmt: skip
    assert code == 0
    (model,) = built
    assert model.is_paired and model.context_setup.context_layer == "previous"
    annotated = ad.read_h5ad(tmp_path / "out" / "annotated.h5ad")
    assert annotated.uns["celltyper"]["context_layer"] == "previous"
    assert annotated.obs["rankformer"].isin(["A", "B", "C"]).all()


@pytest.mark.parametrize(
    ("model", "in_query", "message"),
    [
        ("scnym", True, "SCNYM reads no context profile"),
        ("rankformer", False, "--context-layer 'previous' is not a layer of the query"),
    ],
)
def test_context_layer_errors_are_usage_errors(
    tmp_path, monkeypatch, capsys, model, in_query, message
):
    monkeypatch.chdir(tmp_path)
    parts = _write_pair_with_context(tmp_path, in_query=in_query)
    argv = ["annotate", "--reference", str(parts["reference"][0])]
    argv += ["--query", str(parts["query"][0]), "--model", model, "--context-layer", "previous"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("3", 3),
        ("1e-3", 1e-3),
        ("True", True),
        ("false", False),
        ("None", None),
        ("none", None),
        ("[1, 2]", [1, 2]),
        ("'quoted'", "quoted"),
        ("no_new_identity", "no_new_identity"),
    ],
)
def test_option_values_are_python_literals_or_text(text, value):
    from celltyper.cli._parser import option_value

    assert option_value(text) == value
    assert type(option_value(text)) is type(value)


def test_train_and_model_options_reach_the_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parts = _write_pair(tmp_path)
    cls = cli.resolve_model("scatlasvae")
    seen = {}

    def recording_train(self, *args, **kwargs):
        seen.update(kwargs, n_latent=self.init_params_["non_kwargs"]["n_latent"])
        raise _StopBeforeTraining

    monkeypatch.setattr(cls, "train", recording_train)
    argv = ["annotate", "--reference", str(parts["reference"][0])]
    argv += ["--query", str(parts["query"][0]), "--model", "scatlasvae"]
    argv += ["--train-option", "n_epochs_prediction=None", "--train-option", "lr=0.01"]
    argv += ["--model-option", "n_latent=4"]
    with pytest.raises(_StopBeforeTraining):
        main(argv)
    assert seen["n_epochs_prediction"] is None
    assert seen["lr"] == 0.01
    assert seen["n_latent"] == 4


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--train-option", "lrr=1"], "lrr: not a keyword of SCNYM.train() (did you mean lr?)"),
        (["--train-option", "max_epochs=3"], "use --max-epochs instead"),
        (["--train-option", "lr=1", "--train-option", "lr=2"], "lr is given twice"),
        (["--train-option", "lr"], "expected KEY=VALUE"),
        (["--model-option", "n_hiden=8"], "not a parameter of SCNYM() (did you mean n_hidden?)"),
        (["--model-option", "seed=1"], "use --seed instead"),
    ],
)  # fmt: skip
def test_bad_model_and_train_options_stop_before_the_data_are_joined(
    tmp_path, monkeypatch, capsys, extra, message
):
    monkeypatch.chdir(tmp_path)
    parts = _write_pair(tmp_path)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the data were joined before the options were checked")

    monkeypatch.setattr("celltyper.cli._run.build_training_data", must_not_run)
    argv = ["annotate", "--reference", str(parts["reference"][0])]
    argv += ["--query", str(parts["query"][0]), *extra]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    if "not a keyword" in message:
        # The valid keys are listed, by kind.
        assert "Valid keys: training options: config; hyperparameters:" in err
        assert "weight_decay" in err and "balance_classes" in err


def test_a_train_option_value_the_model_rejects_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    parts = _write_pair(tmp_path)
    argv = ["annotate", "--reference", str(parts["reference"][0])]
    argv += ["--query", str(parts["query"][0]), "--model", "scatlasvae"]
    argv += ["--train-option", "n_epochs_prediction=0"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "rejected the --train-option values" in err
    assert "n_epochs_prediction must be >= 1" in err and "Traceback" not in err


def test_train_keywords_match_what_train_routes():
    for name in celltyper.model.__all__:
        cls = getattr(celltyper.model, name)
        keywords = cls.train_keywords()
        assert set(keywords["options"]) == set(cls._train_options)
        assert "lr" in keywords["hyperparameters"]
        assert "max_epochs" in keywords["train"] and "gradient_clip_val" in keywords["trainer"]
    assert "n_epochs_prediction" in celltyper.model.SCATLASVAE.train_keywords()["hyperparameters"]


# -- gene names from a var column -----------------------------------------------------------
def _with_ensembl_names(path):
    """Rewrite the file at ``path`` indexed by Ensembl-like IDs, its names in var['symbol']."""
    adata = ad.read_h5ad(path)
    adata.var["symbol"] = adata.var_names.astype(str)
    adata.var_names = [f"ENSG{i:011d}" for i in range(adata.n_vars)]
    adata.write_h5ad(path)
    return adata


def test_query_gene_column_matches_ensembl_ids_to_symbols(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    parts = _write_pair(tmp_path)
    query_path = parts["query"][0]
    _with_ensembl_names(query_path)
    argv = ["annotate", "--reference", str(parts["reference"][0]), "--query", str(query_path)]
    argv += ["--model", "scnym", "--max-epochs", "1", "--output", "out"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "the reference uses symbol names, the query ensembl names" in err
    assert "var['symbol'] holds gene symbols: pass --query-gene-column symbol" in err

    assert main([*argv, "--query-gene-column", "symbol"]) == 0
    assert "60 shared: 100.0%" in capsys.readouterr().out
    annotated = ad.read_h5ad(tmp_path / "out" / "annotated.h5ad")
    # The query keeps its own gene names, in the output as in its file.
    assert annotated.var_names[0] == "ENSG00000000000"
    assert ad.read_h5ad(query_path).var_names[0] == "ENSG00000000000"
    assert "scnym" in annotated.obs


def test_reference_gene_column_joins_on_that_column(tmp_path, capsys):
    parts = _write_pair(tmp_path)
    reference = _with_ensembl_names(parts["reference"][0])
    inputs = cli.load_inputs(parts["reference"][0], parts["query"][0])
    with pytest.raises(cli.CliError, match="pass --reference-gene-column symbol"):
        cli.build_training_data(inputs)
    inputs = cli.load_inputs(
        parts["reference"][0], parts["query"][0], reference_gene_column="symbol"
    )
    training = cli.build_training_data(inputs)
    assert list(training.var_names) == list(reference.var["symbol"])
    is_ref = (training.obs[cli.ROLE_KEY] == "reference").to_numpy()
    np.testing.assert_array_equal(training.X[is_ref].toarray(), reference.X.toarray())
    assert inputs.reference.var_names[0] == "ENSG00000000000"


@pytest.mark.parametrize("flag", ["--query-gene-column", "--reference-gene-column"])
def test_unknown_gene_column_lists_the_var_columns(tmp_path, monkeypatch, capsys, flag):
    monkeypatch.chdir(tmp_path)
    parts = _write_pair(tmp_path)
    for role in ("reference", "query"):
        _with_ensembl_names(parts[role][0])
    argv = ["annotate", "--reference", str(parts["reference"][0])]
    argv += ["--query", str(parts["query"][0]), flag, "gene_ids"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    role = "query" if flag.startswith("--query") else "reference"
    expected = f"{flag} 'gene_ids' is not a column of the {role}'s var; available columns: "
    assert expected + "['symbol']" in capsys.readouterr().err


def test_umap_has_a_novelty_panel(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    rng = np.random.default_rng(0)
    n = 30
    names = [f"cell{i}" for i in range(n)]
    query = ad.AnnData(
        X=sp.csr_matrix((n, 3), dtype=np.float32),
        obs=pd.DataFrame(index=names),
        obsm={"X_scnym": rng.normal(size=(n, 4)).astype(np.float32)},
    )
    novel = np.zeros(n, dtype=bool)
    novel[:4] = True
    table = pd.DataFrame(
        {
            "prediction": pd.Categorical(rng.choice(["A", "B"], n), categories=["A", "B"]),
            "confidence": rng.uniform(size=n),
            "novelty": rng.uniform(size=n),
            "novel": novel,
        },
        index=names,
    )
    truth = pd.Series(rng.choice(["A", "B", "C"], n), index=names)
    inputs = cli.Inputs(query, query, "cell_type", None, query_labels=truth)
    drawn = []
    original = Figure.savefig

    def keep_figure(self, *args, **kwargs):
        drawn.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep_figure)
    paths = cli.write_outputs(inputs, table, tmp_path, "scnym")
    assert paths["umap"].is_file()
    (figure,) = drawn
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    novelty = f"scnym_novel: 4 of {n} flagged"
    assert titles == ["scnym", "scnym_confidence", novelty, "cell_type (true)"]
    panel = next(ax for ax in figure.axes if ax.get_title() == novelty)
    legend = [text.get_text() for text in panel.get_legend().get_texts()]
    assert legend == ["known (26)", "novel (4)"]
    # The flagged cells are drawn last, in red, on top of the others.
    last = panel.collections[-1]
    assert len(last.get_offsets()) == 4
    assert tuple(last.get_facecolors()[0][:3]) == pytest.approx((0.839, 0.153, 0.157), abs=1e-3)
