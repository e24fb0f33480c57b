"""Model files that never run code on load, written atomically.

scvi-tools pickles a model's attributes with ``torch.save`` and reads them back with
``torch.load(weights_only=False)``, so a crafted file runs arbitrary Python when it is
loaded. A celltyper model file holds only tensors and plain containers (dict, list,
tuple, str, numbers, None): attributes of other types (pandas frames, numpy arrays) are
encoded as tagged dicts when saved, and the file is read with ``weights_only=True``.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import anndata
import mudata
import numpy as np
import pandas as pd
import torch
from scvi.data._constants import _SETUP_METHOD_NAME
from scvi.model.base import BaseModelClass
from scvi.model.base import _archesmixin as scvi_arches
from scvi.model.base import _base_model as scvi_base_model

#: Version of the layout of a celltyper model file. A change that old files cannot be
#: read with adds a migration to :data:`MIGRATIONS` and keeps their test fixture.
SAVE_FORMAT = 1
FORMAT_KEY, VERSION_KEY = "celltyper_format", "celltyper_version"
MODEL_FILE, ADATA_FILE, MDATA_FILE = "model.pt", "adata.h5ad", "mdata.h5mu"
_TAG = "__celltyper_type__"
#: Migrations from one format to the next: ``MIGRATIONS[n]`` turns a format-``n`` file
#: content (the dict read from ``model.pt``) into format ``n + 1``.
MIGRATIONS: dict[int, Any] = {}
_PATCH_LOCK = threading.RLock()


# -- encoding -------------------------------------------------------------------------------
def encode(value: Any, where: str = "model") -> Any:
    """``value`` as tensors and plain containers that ``weights_only`` loading accepts."""
    if value is None or isinstance(value, bool | int | float | str | bytes | torch.Tensor):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "biuf":
            return {
                _TAG: "ndarray",
                "dtype": value.dtype.str,
                "data": torch.from_numpy(value.copy()),
            }
        return {_TAG: "ndarray", "dtype": value.dtype.str, "data": encode(value.tolist(), where)}
    if isinstance(value, pd.DataFrame):
        return {
            _TAG: "DataFrame",
            "index": encode(np.asarray(value.index), where),
            "index_name": value.index.name,
            "columns": [str(c) for c in value.columns],
            "data": [encode(value[c].to_numpy(), f"{where}.{c}") for c in value.columns],
        }
    if isinstance(value, dict):
        if not all(isinstance(k, str | int) for k in value):
            raise TypeError(f"{where} has keys that are not str or int; it cannot be saved.")
        return {k: encode(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, list):
        return [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {_TAG: "tuple", "items": [encode(v, where) for v in value]}
    raise TypeError(
        f"{where} is a {type(value).__name__}, which a celltyper model file cannot hold; "
        "store it as numbers, strings, arrays or containers of them."
    )


def decode(value: Any) -> Any:
    """The inverse of :func:`encode`."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    tag = value.get(_TAG)
    if tag is None:
        return {k: decode(v) for k, v in value.items()}
    if tag == "ndarray":
        data = value["data"]
        if isinstance(data, torch.Tensor):
            return data.numpy().astype(np.dtype(value["dtype"]), copy=False)
        return np.asarray(decode(data), dtype=np.dtype(value["dtype"]))
    if tag == "DataFrame":
        columns = {c: decode(d) for c, d in zip(value["columns"], value["data"], strict=True)}
        index = pd.Index(decode(value["index"]), name=value["index_name"])
        return pd.DataFrame(columns, index=index)
    if tag == "tuple":
        return tuple(decode(v) for v in value["items"])
    raise ValueError(f"Unknown entry type {tag!r} in a celltyper model file.")


# -- files ----------------------------------------------------------------------------------
def read_model_file(path: str, map_location: Any = None) -> dict:
    """The content of a celltyper ``model.pt``, read without unpickling any code."""
    try:
        content = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as err:
        raise ValueError(
            f"{path} is not a safe celltyper model file: loading it would unpickle Python "
            "objects, which can run code. Files saved by celltyper before model files "
            "became safe can be rewritten with "
            "celltyper.model.base.convert_legacy_model(dir_path), only if you trust "
            f"where the file came from. ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from None
    if not isinstance(content, dict) or FORMAT_KEY not in content:
        raise ValueError(f"{path} is not a celltyper model file (no {FORMAT_KEY!r} entry).")
    return migrate(content, path)


def migrate(content: dict, path: str) -> dict:
    """Bring a file's content up to :data:`SAVE_FORMAT`, one migration at a time."""
    version = int(content[FORMAT_KEY])
    if version > SAVE_FORMAT:
        raise ValueError(
            f"{path} was saved in model-file format {version} (celltyper "
            f"{content.get(VERSION_KEY)}); this celltyper reads up to format {SAVE_FORMAT}. "
            "Upgrade celltyper to load it."
        )
    while version < SAVE_FORMAT:
        content = MIGRATIONS[version](content)
        version += 1
        content[FORMAT_KEY] = version
    return content


def write_model_file(content: dict, path: str) -> None:
    """Write the content of ``model.pt`` (scvi-tools' keys) in the safe format."""
    from celltyper import __version__

    safe = {key: encode(value, key) for key, value in content.items()}
    safe[FORMAT_KEY], safe[VERSION_KEY] = SAVE_FORMAT, __version__
    torch.save(safe, path)


def safe_load_saved_files(
    dir_path: str,
    load_adata: bool,
    prefix: str | None = None,
    map_location: Any = None,
    backup_url: str | None = None,
) -> tuple[dict, np.ndarray, dict, Any]:
    """scvi-tools' ``_load_saved_files``, reading ``model.pt`` safely (no download)."""
    if backup_url is not None:
        raise ValueError("celltyper models load from disk only; backup_url is not supported.")
    prefix = prefix or ""
    path = os.path.join(dir_path, f"{prefix}{MODEL_FILE}")
    if not os.path.exists(path):
        raise ValueError(f"No celltyper model file at {path}.")
    content = decode(read_model_file(path, map_location))
    attr_dict, var_names = content["attr_dict"], content["var_names"]
    adata = None
    if load_adata:
        is_mudata = attr_dict["registry_"].get(_SETUP_METHOD_NAME) == "setup_mudata"
        data_path = os.path.join(dir_path, f"{prefix}{MDATA_FILE if is_mudata else ADATA_FILE}")
        if os.path.exists(data_path):
            adata = mudata.read(data_path) if is_mudata else anndata.read_h5ad(data_path)
        else:
            warnings.warn(
                "Save path contains no saved anndata and no adata was passed. "
                "Model will be loaded without anndata.",
                UserWarning,
                stacklevel=3,
            )
            adata = False
    return attr_dict, var_names, content["model_state_dict"], adata


@contextmanager
def safe_scvi_loading() -> Iterator[None]:
    """Make scvi-tools' ``load`` and ``load_query_data`` read model files safely."""
    with _PATCH_LOCK:
        with (
            mock.patch.object(scvi_base_model, "_load_saved_files", safe_load_saved_files),
            mock.patch.object(scvi_arches, "_load_saved_files", safe_load_saved_files),
        ):
            yield


def convert_legacy_model(dir_path: str, prefix: str | None = None) -> None:
    """Rewrite a model file saved by an older celltyper in the safe format.

    The old file is unpickled to convert it, which runs any code it holds: call this
    only on files you trust.
    """
    path = os.path.join(dir_path, f"{prefix or ''}{MODEL_FILE}")
    content = torch.load(path, map_location="cpu", weights_only=False)
    if FORMAT_KEY in content:
        return
    write_model_file(content, path)


# -- the mixin ------------------------------------------------------------------------------
class PersistenceMixin:
    """``save`` (atomic, safe format) and ``load`` (never runs code from the file)."""

    def save(
        self,
        dir_path: str,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        save_kwargs: dict | None = None,
        legacy_mudata_format: bool = False,
        datamodule=None,
        **anndata_write_kwargs,
    ) -> None:
        """Save the model to ``dir_path``, as scvi-tools does, in a file that loads safely.

        The model is written to a temporary folder beside ``dir_path``, then moved into
        place: an interrupted save leaves the previous model (or nothing) at
        ``dir_path``, never a half-written one.

        Parameters
        ----------
        dir_path
            Folder to save to.
        prefix
            Prefix of the file names.
        overwrite
            Replace an existing ``dir_path``; otherwise an existing one raises.
        save_anndata
            Also save the model's AnnData (``adata.h5ad``) or MuData (``mdata.h5mu``).
        save_kwargs, legacy_mudata_format, datamodule, **anndata_write_kwargs
            As in :meth:`scvi.model.base.BaseModelClass.save`.

        Notes
        -----
        In a distributed run (``torchrun``, or a script trained with a ``"ddp..."``
        strategy), every process runs the script but only rank 0 writes: on the other
        processes ``save`` does nothing, so they do not race on the same folder.
        """
        if _is_secondary_process():
            return
        dir_path = os.path.abspath(os.fspath(dir_path))
        if os.path.exists(dir_path) and not overwrite:
            raise ValueError(
                f"dir_path={dir_path!r} already exists; pass overwrite=True to replace it."
            )
        parent = os.path.dirname(dir_path)
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".celltyper-save-", dir=parent)
        try:
            BaseModelClass.save(
                self,
                staging,
                prefix=prefix,
                overwrite=True,
                save_anndata=save_anndata,
                save_kwargs=save_kwargs,
                legacy_mudata_format=legacy_mudata_format,
                datamodule=datamodule,
                **anndata_write_kwargs,
            )
            model_path = os.path.join(staging, f"{prefix or ''}{MODEL_FILE}")
            # The file was written by this process a moment ago: reading it is safe.
            write_model_file(torch.load(model_path, weights_only=False), model_path)
            _move_into_place(staging, dir_path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def load(
        cls,
        dir_path: str,
        adata=None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        backup_url: str | None = None,
        datamodule=None,
        allowed_classes_names_list: list[str] | None = None,
    ):
        """Load a saved model, as scvi-tools does, without running code from the file.

        The file is read with ``torch.load(weights_only=True)``; a file that holds other
        Python objects raises a :class:`ValueError` before anything in it runs. See
        :meth:`scvi.model.base.BaseModelClass.load` for the parameters (``backup_url`` is
        not supported).
        """
        with safe_scvi_loading():
            return super().load(
                os.fspath(dir_path),
                adata=adata,
                accelerator=accelerator,
                device=device,
                prefix=prefix,
                backup_url=backup_url,
                datamodule=datamodule,
                allowed_classes_names_list=allowed_classes_names_list,
            )


def _is_secondary_process() -> bool:
    """Whether this is a process of rank > 0 of an initialised ``torch.distributed`` group."""
    distributed = torch.distributed
    return (
        distributed.is_available() and distributed.is_initialized() and distributed.get_rank() > 0
    )


def _move_into_place(staging: str, dir_path: str) -> None:
    """Put the finished ``staging`` folder at ``dir_path``, replacing an old one."""
    if not os.path.exists(dir_path):
        os.rename(staging, dir_path)
        return
    old = tempfile.mkdtemp(prefix=".celltyper-old-", dir=os.path.dirname(dir_path))
    os.rmdir(old)
    os.rename(dir_path, old)
    try:
        os.rename(staging, dir_path)
    except OSError:
        os.rename(old, dir_path)
        raise
    shutil.rmtree(old, ignore_errors=True)
