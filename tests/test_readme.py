"""The README's Python quickstart runs as written (training shortened)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python block"
    code = blocks[0]
    assert "model.train()" in code
    code = code.replace("model.train()", "model.train(max_epochs=2, enable_progress_bar=False)")
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, str(README), "exec"), namespace)
    adata, query = namespace["adata"], namespace["query"]
    assert namespace["probabilities"].shape == (adata.n_obs, 7)
    for column in ("scnym", "scnym_confidence", "scnym_novelty", "scnym_novel"):
        assert column in adata.obs.columns
        assert column in query.obs.columns
    assert "X_scnym" in query.obsm
