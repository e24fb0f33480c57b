"""The README's Python quickstart runs as written (training shortened) and prints scores."""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
#: The score line the quickstart prints for its held-back query.
SCORE_LINE = re.compile(
    r"^held-back query, (\d+) labelled cells: accuracy ([\d.]+) \| balanced accuracy "
    r"([\d.]+) \| macro F1 ([\d.]+) \| Cohen's kappa (-?[\d.]+)$",
    flags=re.M,
)
NOVEL_LINE = re.compile(r"^flagged novel: (\d+) of (\d+) cells$", flags=re.M)


def _quickstart() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python block"
    return blocks[0]


def test_readme_quickstart_runs_and_prints_the_held_back_query_s_scores():
    code = _quickstart()
    assert "model.train()" in code
    code = code.replace("model.train()", "model.train(max_epochs=2, enable_progress_bar=False)")
    namespace: dict = {}
    printed = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
        warnings.simplefilter("ignore")
        exec(compile(code, str(README), "exec"), namespace)
    adata, later = namespace["adata"], namespace["later"]
    assert namespace["probabilities"].shape == (adata.n_obs, 7)
    for column in ("scnym", "scnym_confidence", "scnym_novelty", "scnym_novel"):
        assert column in adata.obs.columns
        assert column in later.obs.columns
    assert "X_scnym" in later.obsm
    # The held-back query is a real one: none of its cells trained.
    assert later.n_obs == 1000 and not later.obs_names.isin(adata.obs_names).any()

    output = printed.getvalue()
    scores = SCORE_LINE.search(output)
    assert scores, f"no score line in the quickstart's output:\n{output}"
    n_labelled = int(scores.group(1))
    assert n_labelled == int((later.obs["cell_type"] != "Unknown").sum()) > 200
    accuracy, balanced, macro_f1, kappa = map(float, scores.groups()[1:])
    # Chance is 1/7 balanced accuracy; two epochs already transfer most types.
    assert 0.5 < balanced <= 1.0, output
    assert 0.5 < accuracy <= 1.0 and 0.3 < macro_f1 <= 1.0 and 0.3 < kappa <= 1.0, output
    novel = NOVEL_LINE.search(output)
    assert novel, f"no novelty line in the quickstart's output:\n{output}"
    assert int(novel.group(2)) == 1000 and int(novel.group(1)) < 500


def test_readme_numbers_of_the_demo_are_true():
    import celltyper

    demo = celltyper.datasets.kang_pbmc()
    reference = demo.obs[demo.obs["split"] == "reference"]
    query = demo.obs[demo.obs["split"] == "query"]
    unlabelled = int((reference["cell_type"] == "Unknown").sum())
    labelled = reference[reference["cell_type"] != "Unknown"]
    text = " ".join(README.read_text().split())
    assert f"{len(reference):,} control cells" in text
    n_types = labelled["cell_type"].nunique()
    assert f"{len(labelled):,} carry a published cell type ({n_types} types)" in text
    assert f"{unlabelled:,} are" in text
    assert f"{len(query):,} stimulated" in text
    n_scored = int((query["cell_type"] != "Unknown").sum())
    assert f"{n_scored} query cells with a published label" in text
