"""Training on several devices: DDP over 2 CPU processes on the gloo backend.

Every model of ``celltyper.model.__all__`` trains for 2 epochs with
``strategy="ddp_fork_find_unused_parameters_true"``; each process records a digest of
its parameters at every epoch end and of its whole state at the end of every fit, and
the two processes must agree. A ``torchrun`` run checks what every process does after
``train()`` (calibration, history, saving); unit tests check the sharding of the
splitters without processes.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import UNKNOWN, make_counts_adata, tiny_kwargs, train_kwargs
from scvi import REGISTRY_KEYS

import celltyper.model
from celltyper.data import AllCellsSplitter, LabelledUnlabelledSplitter
from celltyper.model.base._training import check_distributed_strategy

FORK = "ddp_fork_find_unused_parameters_true"
TESTS = Path(__file__).resolve().parent

needs_gloo = pytest.mark.skipif(
    sys.platform == "win32"
    or not torch.distributed.is_available()
    or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo and fork()",
)


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class RecordWeights(pl.Callback):
    """Each process appends to ``rank<r>.jsonl``: at every epoch end, a digest of the
    parameters (DDP keeps them equal); at the end of a fit, of the module's whole state
    (BatchNorm statistics and restored best weights included)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def _write(self, trainer: pl.Trainer, record: dict) -> None:
        path = self.folder / f"rank{trainer.global_rank}.jsonl"
        with open(path, "a") as file:
            file.write(json.dumps({"world_size": trainer.world_size, **record}) + "\n")

    def on_train_epoch_end(self, trainer, pl_module):
        self._write(
            trainer,
            {
                "epoch": trainer.current_epoch,
                "batches": trainer.num_training_batches,
                "parameters": _digest(dict(pl_module.named_parameters())),
            },
        )

    def on_fit_end(self, trainer, pl_module):
        self._write(trainer, {"state": _digest(pl_module.module.state_dict())})


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _new_model(model_cls, adata=None):
    adata = make_counts_adata() if adata is None else adata
    model_cls.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    return model_cls(adata, **tiny_kwargs(model_cls))


# -- the clear error --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("devices", "extra", "named"),
    [
        (2, {}, "devices=2"),
        ([0, 1], {}, "devices=[0, 1]"),
        ("2", {}, "devices='2'"),
        (2, {"strategy": "auto"}, "devices=2"),
        (1, {"num_nodes": 2}, "num_nodes=2"),
    ],
)
def test_several_devices_without_a_strategy_raise(devices, extra, named):
    model = _new_model(celltyper.model.SCNYM)
    with pytest.raises(ValueError, match="strategy") as error:
        model.train(max_epochs=1, accelerator="cpu", devices=devices, **extra)
    message = str(error.value)
    assert named in message
    assert 'strategy="ddp_find_unused_parameters_true"' in message
    assert '"ddp_fork_find_unused_parameters_true"' in message
    assert not model.is_trained_


def test_device_count_of_strings_and_lists():
    # No GPU here: the count comes from the string itself, before Lightning is asked.
    with pytest.raises(ValueError, match=r"devices='0,1' trains on 2 devices"):
        check_distributed_strategy("gpu", "0,1")
    check_distributed_strategy("cpu", 1)
    check_distributed_strategy("cpu", [0])
    check_distributed_strategy("cpu", 2, strategy=FORK)
    with pytest.raises(ValueError, match="num_nodes must be a whole number"):
        check_distributed_strategy("cpu", 1, num_nodes="two")


# -- sharding, without processes --------------------------------------------------------------
@pytest.fixture(scope="module")
def id_model():
    """SCNYM over data whose first gene holds each cell's index; class T0 has half as
    many labelled cells as the others, so class balancing repeats its cells."""
    adata = make_counts_adata()
    x = adata.X.toarray()
    x[:, 0] = np.arange(adata.n_obs)
    adata.X = sp.csr_matrix(x)
    t0 = np.flatnonzero(adata.obs["train_label"].to_numpy() == "T0")
    adata.obs.loc[adata.obs_names[t0[::2]], "train_label"] = UNKNOWN
    return _new_model(celltyper.model.SCNYM, adata)


def _ids(batch) -> list[int]:
    return batch[REGISTRY_KEYS.X_KEY][:, 0].long().tolist()


def _on_ranks(splitter_cls, model, world_size: int = 2, **kwargs):
    splitters = []
    for rank in range(world_size):
        splitter = splitter_cls(
            model.adata_manager, n_labels=model.n_labels, batch_size=16, seed=3, **kwargs
        )
        splitter.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)
        splitters.append(splitter)
    return splitters


def test_balanced_labelled_and_unlabelled_cells_are_sharded(id_model):
    splitters = _on_ranks(LabelledUnlabelledSplitter, id_model, balance_classes=True)
    loaders = [s.train_dataloader() for s in splitters]
    epochs = [[list(loader) for loader in loaders] for _ in range(2)]
    labelled_sampling = splitters[0].labelled_sampling_idx
    unlabelled = splitters[0].unlabelled_idx
    assert len(labelled_sampling) < len(unlabelled)  # the labelled cells cycle
    for steps in epochs:
        assert len(steps[0]) == len(steps[1]) == len(loaders[0])
        # An epoch is one pass over the unlabelled cells, split between the processes.
        seen = [[i for _, u in rank_steps for i in _ids(u)] for rank_steps in steps]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == sorted(unlabelled.tolist())
        # The first pass over the labelled cells is the balanced resampling, shared.
        n_pass = len(loaders[0].loaders[0])
        labelled = [i for rank_steps in steps for lab, _ in rank_steps[:n_pass] for i in _ids(lab)]
        assert Counter(labelled) == Counter(labelled_sampling.tolist())
    # A new order every epoch.
    assert _ids(epochs[0][0][0][1]) != _ids(epochs[1][0][0][1])


def test_unlabelled_ratio_stream_is_shared_by_the_processes(id_model):
    splitters = _on_ranks(
        LabelledUnlabelledSplitter, id_model, balance_classes=True, unlabelled_ratio=1.0
    )
    loaders = [s.train_dataloader() for s in splitters]
    unlabelled = set(splitters[0].unlabelled_idx.tolist())
    n_epochs = -(-len(unlabelled) // (32 * len(loaders[0])))  # one pass over them
    epochs = [[list(loader) for loader in loaders] for _ in range(n_epochs)]
    first = epochs[0]
    # An epoch reads as many of the balanced resample as there are labelled training
    # cells, the processes each their half of it.
    n_labelled = len(splitters[0].labelled_train_idx)
    assert len(splitters[0].labelled_sampling_idx) > n_labelled
    assert len(loaders[0]) == len(loaders[1]) == -(-n_labelled // 32)
    labelled = Counter(i for steps in first for lab, _ in steps for i in _ids(lab))
    resample = Counter(splitters[0].labelled_sampling_idx.tolist())
    assert sum(labelled.values()) >= n_labelled and labelled <= resample
    # The unlabelled stream is read in turn, each process its own share of each step.
    drawn = [[i for _, u in steps for i in _ids(u)] for steps in first]
    assert all(len(ids) == 16 * len(loaders[0]) for ids in drawn)
    # In the stream's order (each step: rank 0's share, then rank 1's), the first pass
    # holds every unlabelled cell once.
    stream = [
        i
        for steps in epochs
        for step in zip(*steps, strict=True)
        for _, u in step
        for i in _ids(u)
    ]
    first_pass = stream[: len(unlabelled)]
    assert len(set(first_pass)) == len(first_pass) and set(first_pass) == unlabelled


def test_validation_is_whole_on_every_process_and_all_cells_are_sharded(id_model):
    splitters = _on_ranks(AllCellsSplitter, id_model)
    for splitter in splitters:
        scored = [i for batch in splitter.val_dataloader() for i in _ids(batch)]
        assert scored == splitter.val_idx.tolist()
    seen = [[i for batch in s.train_dataloader() for i in _ids(batch)] for s in splitters]
    assert not set(seen[0]) & set(seen[1])
    train_idx = splitters[0].train_idx.tolist()
    assert set(seen[0] + seen[1]) <= set(train_idx)
    # 386 cells: 193 per process, the last minibatch of one cell dropped (BatchNorm).
    assert len(train_idx) == 386
    assert len(seen[0]) == len(seen[1]) == 192


# -- two processes, every model ---------------------------------------------------------------
#: Cases of the two-process test: every model; one without validation cells (no
#: validation pass re-synchronises the BatchNorm statistics after the last step); the
#: labelled epoch with its stream of unlabelled cells.
TWO_PROCESS_CASES = [(name, {}) for name in celltyper.model.__all__]
TWO_PROCESS_CASES.append(("SCNYM", {"validation_size": 0.0, "batch_size": 64}))
TWO_PROCESS_CASES.append(("SCNYM", {"unlabelled_ratio": 1.0, "batch_size": 32}))


@needs_gloo
@pytest.mark.parametrize(
    ("model_name", "options"),
    TWO_PROCESS_CASES,
    ids=[*celltyper.model.__all__, "SCNYM-no-validation", "SCNYM-unlabelled-ratio"],
)
def test_two_processes_end_with_identical_weights(model_name, options, tmp_path, monkeypatch):
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    # Lightning would leave its port in this process's environment.
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    record = tmp_path / "record"
    record.mkdir()
    model_cls = getattr(celltyper.model, model_name)
    model = _new_model(model_cls)
    options = train_kwargs(model_cls, accelerator="cpu", devices=2, strategy=FORK, **options)
    with warnings.catch_warnings():
        for expected in (
            "No held-out labelled cells",  # the case without validation cells
            "Fewer than 10 held-out labelled",
            "early_stopping was automatically disabled due to the use of DDP",
        ):
            warnings.filterwarnings("ignore", expected, UserWarning)
        model.train(callbacks=[RecordWeights(record)], checkpoint_dir=tmp_path / "ckpt", **options)

    ranks = [
        [json.loads(line) for line in (record / f"rank{r}.jsonl").read_text().splitlines()]
        for r in (0, 1)
    ]
    assert ranks[0] == ranks[1]
    assert {entry["world_size"] for entry in ranks[0]} == {2}
    assert sum("parameters" in entry for entry in ranks[0]) >= 2
    # The notebook process continues with rank 0's weights, trained and calibrated.
    assert _digest(model.module.state_dict()) == ranks[0][-1]["state"]
    assert model.is_trained_
    assert len(model.history_["train_loss"]) == 2
    assert model.predict().shape == (model.adata.n_obs,)
    assert not list(workdir.iterdir())  # no log folder left in the working directory
    # Each stage (fit) left its checkpoint.
    n_fits = sum("state" in entry for entry in ranks[0])
    assert len(list((tmp_path / "ckpt").glob("*/last.ckpt"))) == n_fits


TORCHRUN_SCRIPT = """
import json, os, sys

import torch

sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
import celltyper.model
from conftest import make_counts_adata, tiny_kwargs, train_kwargs
from test_multidevice import _digest

rank, out = int(os.environ["RANK"]), {out!r}
result = {{}}
for name in celltyper.model.__all__:
    cls = getattr(celltyper.model, name)
    adata = make_counts_adata()
    cls.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    model = cls(adata, **tiny_kwargs(cls))
    model.train(
        **train_kwargs(
            cls, accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true"
        )
    )
    result[name] = {{
        "state": _digest(model.module.state_dict()),
        "temperature": model.temperature_,
        "threshold": model.novelty_threshold_,
        "history": {{k: v.to_numpy().ravel().tolist() for k, v in model.history_.items()}},
        "predictions": model.predict().tolist(),
    }}
    writes = model.trainer.is_global_zero
    model.save(os.path.join(out, f"{{name}}-rank{{rank}}"))
with open(os.path.join(out, f"rank{{rank}}.json"), "w") as file:
    json.dump({{"models": result, "is_global_zero": writes}}, file)
"""


@needs_gloo
def test_torchrun_processes_agree_after_train_and_only_rank_0_saves(tmp_path):
    script = tmp_path / "train_all.py"
    script.write_text(TORCHRUN_SCRIPT.format(tests=str(TESTS), out=str(tmp_path)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", str(script)]
    done = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["is_global_zero"] for r in ranks] == [True, False]
    # Weights, temperature, novelty threshold, history and predictions agree.
    assert ranks[0]["models"] == ranks[1]["models"]
    for name in celltyper.model.__all__:
        assert len(ranks[1]["models"][name]["history"]["train_loss"]) == 2
        assert (tmp_path / f"{name}-rank0").is_dir()
        assert not (tmp_path / f"{name}-rank1").exists()
    assert not (tmp_path / "lightning_logs").exists()
