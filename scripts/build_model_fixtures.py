"""Write the saved-model fixtures that ``tests/test_model_fixtures.py`` loads.

One small trained model per class of ``celltyper.model``, saved in the current model-file
format under ``tests/fixtures/models/format<N>/<MODEL>/``, with the probabilities it
gives on ``tests/fixtures/tiny_counts.h5ad`` in ``predictions.csv``. Fixtures are never
rewritten: when the format changes, run this script to add the new format's folder and
keep the old ones, whose files the new code must still load (through a migration).

    python scripts/build_model_fixtures.py
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


def main() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_counts_adata, tiny_kwargs, train_kwargs

    import celltyper.model
    from celltyper.model.base._persistence import SAVE_FORMAT

    warnings.filterwarnings("ignore")
    data_path = FIXTURES / "tiny_counts.h5ad"
    if not data_path.exists():
        FIXTURES.mkdir(parents=True, exist_ok=True)
        make_counts_adata(cells_per=15, n_genes=60, seed=3).write_h5ad(data_path)
    import anndata as ad

    target = FIXTURES / "models" / f"format{SAVE_FORMAT}"
    for name in celltyper.model.__all__:
        out = target / name
        if out.exists():
            print(f"{out} exists; fixtures are never rewritten")
            continue
        cls = getattr(celltyper.model, name)
        adata = ad.read_h5ad(data_path)
        cls.setup_anndata(adata, labels_key="train_label", batch_key="batch")
        model = cls(adata, **tiny_kwargs(cls))
        model.train(**train_kwargs(cls, max_epochs=2))
        model.save(out)
        model.predict(adata, soft=True).to_csv(out / "predictions.csv")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
