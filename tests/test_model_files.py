"""Model files: loading never runs code, saving is atomic, the format is recorded."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import make_counts_adata, tiny_kwargs, train_kwargs

import celltyper
from celltyper.model import SCNYM
from celltyper.model.base import _persistence as persistence
from celltyper.model.base import convert_legacy_model


class _WritesMarker:
    """Unpickling this object opens (creates) a file: arbitrary code on load."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    adata = make_counts_adata()
    SCNYM.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    model = SCNYM(adata, **tiny_kwargs(SCNYM))
    model.train(**train_kwargs(SCNYM))
    path = tmp_path_factory.mktemp("models") / "scnym"
    model.save(path, save_anndata=True)
    return model, adata, path


def _malicious_copy(saved_path, target, marker):
    """The saved model, with an object that runs code when unpickled in its attributes."""
    target.mkdir()
    content = torch.load(saved_path / "model.pt", weights_only=True)
    content["attr_dict"]["payload_"] = _WritesMarker(marker)
    torch.save(content, target / "model.pt")
    return target


def test_loading_a_malicious_file_raises_and_runs_nothing(saved, tmp_path):
    _, adata, path = saved
    marker = tmp_path / "pwned"
    bad = _malicious_copy(path, tmp_path / "bad", marker)
    with pytest.raises(ValueError, match="not a safe celltyper model file"):
        SCNYM.load(bad, adata=adata.copy())
    with pytest.raises(ValueError, match="not a safe celltyper model file"):
        SCNYM.load_query_data(adata.copy(), bad)
    assert not marker.exists(), "loading the file ran its code"
    # The same object unpickled the unsafe way would have run (the test can fail).
    torch.load(bad / "model.pt", weights_only=False)
    assert marker.exists()


def test_a_saved_model_round_trips_with_its_format(saved):
    model, _, path = saved
    content = torch.load(path / "model.pt", weights_only=True)
    assert content[persistence.FORMAT_KEY] == persistence.SAVE_FORMAT
    assert content[persistence.VERSION_KEY] == celltyper.__version__
    loaded = SCNYM.load(path)  # with the saved AnnData
    np.testing.assert_array_equal(
        loaded.predict(soft=True).to_numpy(), model.predict(soft=True).to_numpy()
    )
    assert loaded.history["train_loss"].equals(model.history["train_loss"])
    assert loaded.temperature_ == model.temperature_
    np.testing.assert_array_equal(
        loaded.novelty_reference_["means"], model.novelty_reference_["means"]
    )
    np.testing.assert_array_equal(loaded.validation_indices, model.validation_indices)


def test_save_refuses_to_overwrite_and_an_interrupted_save_keeps_the_old_model(
    saved, tmp_path, monkeypatch
):
    model, _, _ = saved
    target = tmp_path / "model"
    model.save(target)
    before = (target / "model.pt").read_bytes()
    with pytest.raises(ValueError, match="already exists; pass overwrite=True"):
        model.save(target)

    def interrupted(content, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(persistence, "write_model_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.save(target, overwrite=True)
    assert (target / "model.pt").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["model"], "a staging folder was left behind"


def test_a_newer_format_is_refused_clearly(saved, tmp_path):
    _, adata, path = saved
    newer = tmp_path / "newer"
    newer.mkdir()
    content = torch.load(path / "model.pt", weights_only=True)
    content[persistence.FORMAT_KEY] = persistence.SAVE_FORMAT + 1
    torch.save(content, newer / "model.pt")
    with pytest.raises(ValueError, match=r"format 2 .*Upgrade celltyper"):
        SCNYM.load(newer, adata=adata.copy())


def test_legacy_pickled_files_convert_when_trusted(saved, tmp_path):
    model, adata, path = saved
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    content = persistence.decode(torch.load(path / "model.pt", weights_only=True))
    for key in (persistence.FORMAT_KEY, persistence.VERSION_KEY):
        content.pop(key)
    torch.save(content, legacy / "model.pt")  # pandas frames pickled, as scvi-tools does
    with pytest.raises(ValueError, match="convert_legacy_model"):
        SCNYM.load(legacy, adata=adata.copy())
    convert_legacy_model(str(legacy))
    loaded = SCNYM.load(legacy, adata=adata.copy())
    np.testing.assert_array_equal(loaded.predict(), model.predict())


def test_encoding_round_trips_and_refuses_objects():
    import pandas as pd

    value = {
        "a": np.arange(3, dtype=np.int64),
        "b": np.array(["x", "y"], dtype=object),
        "c": pd.DataFrame({"loss": [1.0, 0.5]}, index=pd.Index([0, 1], name="epoch")),
        "d": (1, "two", None),
        "e": [np.float32(0.5), True],
    }
    back = persistence.decode(persistence.encode(value))
    np.testing.assert_array_equal(back["a"], value["a"])
    assert back["a"].dtype == np.int64 and back["b"].dtype == object
    assert back["c"].equals(value["c"]) and back["d"] == value["d"]
    assert back["e"] == [0.5, True]
    with pytest.raises(TypeError, match=r"model\['x'\] is a _WritesMarker"):
        persistence.encode({"x": _WritesMarker("never")})
