"""Scoring the predictions and writing ``predictions.csv``, ``annotated.h5ad``, ``umap.png``."""

from __future__ import annotations

import sys
from pathlib import Path

import anndata
import numpy as np
import pandas as pd

from ._common import Inputs, say

#: The novelty panel of umap.png: known cells faint, flagged cells on top in red.
NOVELTY_COLORS = {"known": "#d3d3d3", "novel": "#d62728"}


def score_predictions(inputs: Inputs, table: pd.DataFrame, cell_types: list[str]) -> dict:
    """Scores of the predictions on query cells with a known label (printed).

    Parameters
    ----------
    inputs
        The run's inputs; ``inputs.query_labels`` holds the labels scored against.
    table
        The annotation table of the query (``prediction`` and ``novelty`` columns).
    cell_types
        The reference's cell types, which the model knows.

    Returns
    -------
    ``{}`` when the query has no labels, else accuracy, balanced accuracy, macro F1 and
    Cohen's kappa (:func:`celltyper.metrics.classification_scores`), plus
    ``novelty_auroc`` when the query holds both types of the reference and types it lacks.
    """
    from celltyper.metrics import classification_scores, format_scores, novelty_auroc

    if inputs.query_labels is None:
        return {}
    truth = inputs.query_labels.reindex(table.index)
    known = truth.notna().to_numpy()
    y_true = truth[known].astype(str).to_numpy()
    y_pred = table["prediction"].astype(str).to_numpy()[known]
    scores = classification_scores(y_true, y_pred)
    shown = {k: scores[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")}
    say("Scores", f"{format_scores(shown)} (on {int(known.sum()):,} labelled query cells)")
    unseen = ~np.isin(y_true, cell_types)
    if unseen.any():
        names = ", ".join(sorted(set(y_true[unseen])))
        say("", f"{int(unseen.sum()):,} of them are of types the reference lacks ({names})")
        # The AUROC needs both classes: cells of known and of unseen types.
        if not unseen.all():
            novelty = table["novelty"].to_numpy()[known]
            scores["novelty_auroc"] = novelty_auroc(novelty, unseen)
            say("", format_scores({"novelty_auroc": scores["novelty_auroc"]}))
    return scores


def write_outputs(
    inputs: Inputs,
    table: pd.DataFrame,
    output: str | Path,
    key: str,
    extra_uns: dict | None = None,
    annotated: bool = True,
) -> dict[str, Path]:
    """Write ``predictions.csv``, ``annotated.h5ad`` and ``umap.png`` into ``output``.

    Parameters
    ----------
    inputs
        The inputs, with ``inputs.query`` annotated by
        :func:`~celltyper.cli.run_annotation`.
    table
        The annotation table of the query.
    output
        Folder to write into (created if needed; existing files are replaced).
    key
        The annotation prefix, the model name in lower case.
    extra_uns
        Stored as ``uns["celltyper"]`` of ``annotated.h5ad`` (strings and numbers only).
    annotated
        Write ``annotated.h5ad`` and ``umap.png``; ``False`` for a streamed annotation
        (``--stream-above``), whose latent is in ``annotation.h5``.

    ``umap.png`` has one panel each for the prediction, the confidence and the novelty
    flag (flagged cells in red, with their number in the title), then the true labels when
    the query has them.

    Returns
    -------
    The paths written, by name (``"csv"``, ``"h5ad"``, ``"umap"``); ``"umap"`` is missing
    when the plot could not be drawn (a warning says why).
    """
    from celltyper.pl import latent_umap

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    query = inputs.query
    truth = inputs.query_labels.reindex(table.index) if inputs.query_labels is not None else None

    csv = pd.DataFrame(
        {
            "cell": table.index,
            "prediction": table["prediction"].astype(str).to_numpy(),
            "confidence": table["confidence"].to_numpy(),
            "novelty": table["novelty"].to_numpy(),
            "novel": table["novel"].to_numpy(),
        }
    )
    if truth is not None:
        csv["true_label"] = truth.to_numpy()
    paths = {"csv": out / "predictions.csv", "h5ad": out / "annotated.h5ad"}
    csv.to_csv(paths["csv"], index=False)
    if not annotated:
        del paths["h5ad"]
        paths["annotation"] = out / "annotation.h5"
        say("Writing", ", ".join(str(p) for p in paths.values()))
        return paths

    if extra_uns:
        query.uns["celltyper"] = dict(extra_uns)
    query.write_h5ad(paths["h5ad"])

    # Shared categories give a cell type the same colour in the predicted and true panels.
    known_types = list(table["prediction"].cat.categories)
    novel = table["novel"].to_numpy(dtype=bool)
    novelty_panel = f"{key}_novel: {int(novel.sum()):,} of {len(novel):,} flagged"
    columns = {
        key: pd.Categorical(table["prediction"].to_numpy(), categories=known_types),
        f"{key}_confidence": table["confidence"].to_numpy(),
        novelty_panel: np.where(novel, "novel", "known"),
    }
    if truth is not None:
        unseen = sorted(set(truth.dropna()) - set(known_types))
        columns[f"{inputs.labels_key} (true)"] = pd.Categorical(
            truth.to_numpy(), categories=known_types + unseen
        )
    plot_data = anndata.AnnData(
        obs=pd.DataFrame(columns, index=table.index),
        obsm={f"X_{key}": np.asarray(query.obsm[f"X_{key}"])},
    )
    try:
        paths["umap"] = latent_umap(
            plot_data,
            f"X_{key}",
            list(columns),
            out / "umap.png",
            colors={novelty_panel: NOVELTY_COLORS},
        )
    except Exception as err:  # a failed plot must not lose the predictions written above
        print(f"warning: could not draw the UMAP: {err}", file=sys.stderr, flush=True)
    say("Writing", ", ".join(str(p) for p in paths.values()))
    return paths
