"""Annotation tables written to disk as they are computed (``annotation_table(write_to=)``).

Three formats, chosen by the file's suffix:

- ``.h5`` / ``.hdf5`` (h5py) and ``.zarr`` (a zarr group): arrays ``obs_names``,
  ``prediction`` (cell-type names), ``confidence`` (float32), ``novelty`` (float64),
  ``novel`` (bool) and ``latent`` (cells x latent dimensions, float32), one row per cell;
  the attribute ``cell_types`` lists the model's cell types. Every array but ``novel`` is
  written chunk by chunk.
- ``.csv``: the table's columns (``prediction``, ``confidence``, ``novelty``, ``novel``)
  indexed by obs name, no latent. The rows are written after the last chunk, in blocks,
  from one prediction code, confidence and novelty per cell.

:func:`read_annotation` reads any of them back.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

#: Suffixes of each format.
FORMATS = {".csv": "csv", ".h5": "h5", ".hdf5": "h5", ".zarr": "zarr"}
#: Rows per block written to a CSV file.
_CSV_ROWS = 100_000


def output_format(path: str | Path, argument: str = "write_to") -> str:
    """The format of ``path`` by its suffix; a clear error for any other."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(
            f"{argument}={str(path)!r} has the suffix {suffix or '(none)'!r}; use one of "
            f"{sorted(FORMATS)} (.csv: the table; .h5/.hdf5/.zarr: the table and the latent)."
        )
    return FORMATS[suffix]


class _ArrayWriter:
    """h5 or zarr arrays filled chunk by chunk."""

    def __init__(self, path: Path, kind: str, names: pd.Index, cell_types: Sequence[str]):
        self.kind = kind
        self.n = len(names)
        self.cell_types = np.asarray([str(c) for c in cell_types], dtype=object)
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if kind == "h5":
            import h5py

            self.file = h5py.File(path, "w")
            self.group = self.file
            self.strings = h5py.string_dtype()
        else:
            import zarr

            self.file = None
            # Format 2: fixed-width text arrays are stable there (zarr 3 warns on them).
            self.group = zarr.open_group(str(path), mode="w", zarr_format=2)
        self.group.attrs["cell_types"] = [str(c) for c in cell_types]
        self.group.attrs["format"] = "celltyper annotation"
        self._create("obs_names", (self.n,), self._string_dtype(names))
        self._fill_strings("obs_names", np.asarray(names.astype(str), dtype=object))
        width = max((len(c) for c in self.cell_types), default=1)
        self._create("prediction", (self.n,), self._string_dtype(self.cell_types, width))
        self._create("confidence", (self.n,), np.float32)
        self._create("novelty", (self.n,), np.float64)
        self.latent = None

    def _string_dtype(self, values, width: int | None = None):
        if self.kind == "h5":
            return self.strings
        if width is None:
            width = max((len(str(v)) for v in values), default=1)
        return np.dtype(f"<U{max(width, 1)}")

    def _create(self, name: str, shape: tuple[int, ...], dtype) -> None:
        rows = min(max(self.n, 1), 65_536)
        chunks = (rows, *shape[1:])
        if self.kind == "h5":
            self.group.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks)
        else:
            self.group.create_array(name, shape=shape, dtype=dtype, chunks=chunks)

    def _fill_strings(self, name: str, values: np.ndarray, start: int = 0) -> None:
        if self.kind == "zarr":
            values = values.astype(self.group[name].dtype)
        for first in range(0, len(values), 65_536):
            block = values[first : first + 65_536]
            self.group[name][start + first : start + first + len(block)] = block

    def write(self, start: int, stop: int, scored: dict[str, np.ndarray]) -> None:
        latent = np.asarray(scored["latent"], dtype=np.float32)
        if self.latent is None:
            self._create("latent", (self.n, latent.shape[1]), np.float32)
            self.latent = self.group["latent"]
        self._fill_strings("prediction", self.cell_types[scored["code"]], start)
        self.group["confidence"][start:stop] = np.asarray(scored["confidence"], np.float32)
        self.group["novelty"][start:stop] = np.asarray(scored["novelty"], np.float64)
        self.latent[start:stop] = latent

    def finish(self, novel: np.ndarray) -> None:
        self._create("novel", (self.n,), bool)
        self.group["novel"][:] = np.asarray(novel, dtype=bool)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class _CSVWriter:
    """The table's per-cell values kept as scalars, written in blocks at the end."""

    def __init__(self, path: Path, names: pd.Index, cell_types: Sequence[str]):
        self.path = path
        self.names = names
        self.cell_types = list(cell_types)
        n = len(names)
        self.code = np.zeros(n, dtype=np.int32)
        self.confidence = np.zeros(n, dtype=np.float32)
        self.novelty = np.zeros(n, dtype=np.float64)

    def write(self, start: int, stop: int, scored: dict[str, np.ndarray]) -> None:
        self.code[start:stop] = scored["code"]
        self.confidence[start:stop] = scored["confidence"]
        self.novelty[start:stop] = scored["novelty"]

    def finish(self, novel: np.ndarray) -> None:
        for first in range(0, max(len(self.names), 1), _CSV_ROWS):
            rows = slice(first, first + _CSV_ROWS)
            block = pd.DataFrame(
                {
                    "prediction": pd.Categorical.from_codes(self.code[rows], self.cell_types),
                    "confidence": self.confidence[rows],
                    "novelty": self.novelty[rows],
                    "novel": novel[rows],
                },
                index=pd.Index(self.names[rows], name="cell"),
            )
            block.to_csv(self.path, mode="w" if first == 0 else "a", header=first == 0)

    def close(self) -> None:
        return None


@contextmanager
def annotation_writer(
    path: str | Path, names: pd.Index, cell_types: Sequence[str]
) -> Iterator[_ArrayWriter | _CSVWriter]:
    """A writer of ``len(names)`` cells' annotation to ``path`` (format by suffix).

    ``write(start, stop, scored)`` stores rows ``start:stop`` (``scored``: ``code``,
    ``confidence``, ``novelty``, ``latent``); ``finish(novel)`` the flags. A failure
    removes the partial file.
    """
    kind = output_format(path)
    path = Path(path)
    if not path.parent.exists():
        raise FileNotFoundError(
            f"write_to={str(path)!r}: the folder {str(path.parent)!r} does not exist."
        )
    writer = _CSVWriter(path, names, cell_types) if kind == "csv" else None
    if writer is None:
        writer = _ArrayWriter(path, kind, pd.Index(names), cell_types)
    try:
        yield writer
    except BaseException:
        writer.close()
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        raise
    writer.close()


def read_annotation(path: str | Path) -> tuple[pd.DataFrame, np.ndarray | None]:
    """An annotation written by ``annotation_table(write_to=path)``, read into memory.

    Returns
    -------
    The table (as :meth:`~celltyper.model.base.AnnotationMixin.annotation_table`
    returns it) and the latent (``None`` for a CSV file).
    """
    kind = output_format(path, "path")
    if kind == "csv":
        table = pd.read_csv(path, index_col=0)
        table.index = table.index.astype(str)
        table.index.name = None
        # The categories are the types that occur: a CSV does not keep the others.
        table["prediction"] = pd.Categorical(table["prediction"].astype(str))
        return table, None
    if kind == "h5":
        import h5py

        with h5py.File(path, "r") as f:
            arrays = {k: f[k][...] for k in f.keys()}
            cell_types = [str(c) for c in f.attrs["cell_types"]]
    else:
        import zarr

        group = zarr.open_group(str(path), mode="r")
        arrays = {k: np.asarray(group[k][...]) for k in group.array_keys()}
        cell_types = [str(c) for c in group.attrs["cell_types"]]

    def text(values) -> np.ndarray:
        return np.asarray([v.decode() if isinstance(v, bytes) else str(v) for v in values])

    table = pd.DataFrame(
        {
            "prediction": pd.Categorical(text(arrays["prediction"]), categories=cell_types),
            "confidence": arrays["confidence"],
            "novelty": arrays["novelty"],
            "novel": arrays["novel"].astype(bool),
        },
        index=pd.Index(text(arrays["obs_names"])),
    )
    return table, arrays.get("latent")
