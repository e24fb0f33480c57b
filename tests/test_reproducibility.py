"""Same seed, same answer, in a fresh Python process; another seed, another model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import celltyper.model

_SCRIPT = """
import json, sys, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, {tests!r})
from conftest import make_counts_adata, tiny_kwargs, train_kwargs
import celltyper.model
seed = int(sys.argv[1])
out = {{}}
for name in celltyper.model.__all__:
    cls = getattr(celltyper.model, name)
    adata = make_counts_adata()
    cls.setup_anndata(adata, labels_key="train_label", batch_key="batch")
    model = cls(adata, **{{**tiny_kwargs(cls), "seed": seed}})
    model.train(**train_kwargs(cls, max_epochs=2))
    out[name] = model.predict(soft=True).to_numpy().tolist()
print("RESULT " + json.dumps(out))
"""


def _train_in_a_new_process(seed: int) -> dict[str, np.ndarray]:
    script = _SCRIPT.format(tests=str(Path(__file__).parent))
    done = subprocess.run(
        [sys.executable, "-c", script, str(seed)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return {name: np.asarray(p) for name, p in json.loads(line[len("RESULT ") :]).items()}


@pytest.fixture(scope="module")
def runs():
    return _train_in_a_new_process(0), _train_in_a_new_process(0), _train_in_a_new_process(1)


@pytest.mark.parametrize("name", celltyper.model.__all__)
def test_same_seed_same_predictions_in_new_processes(runs, name):
    first, second, other = runs
    np.testing.assert_array_equal(first[name], second[name])
    assert not np.array_equal(first[name], other[name]), "another seed must change the model"
