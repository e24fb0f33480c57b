"""The context profile of each cell for RANKFORMER's paired mode, and its registry field.

A paired model reads, beside each cell's counts, a context profile: the matched earlier
profile of the cell (e.g. a pseudo-bulk of its lineage at the previous time point). It is
given either as a layer, row by row, or as an obs column naming the paired cell of the same
object. Either way the registry reads it from a layer: with an obs column, registration
stores the paired cells' counts in ``layers[CONTEXT_PAIRS_LAYER]`` of the registered object,
as scvi-tools stores its ``_scvi_labels`` column.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from mudata import MuData
from scipy import sparse
from scvi.data._utils import _verify_and_correct_data_format
from scvi.data.fields import BaseAnnDataField
from scvi.data.fields._mudata import BaseMuDataWrapperClass

from celltyper._utils import check_matrix_values, check_obs_key, get_matrix, row_totals
from celltyper.module import CONTEXT_KEY

from .base import FieldFactory

#: Layer of the registered object holding the paired cells' counts (``context_key``).
CONTEXT_PAIRS_LAYER = "_scvi_context"
MissingContext = Literal["raise", "none"]
MISSING_CONTEXT_CHOICES = ("raise", "none")


@dataclass(frozen=True)
class ContextSetup:
    """How a paired model finds the context profile of each cell.

    Attributes
    ----------
    layer
        Layer of the cells' own counts (``None``: ``X``); ``context_key`` pairs read it.
    context_layer
        Layer holding each cell's context profile, row by row.
    context_key
        obs column naming the ``obs_name`` of each cell's paired cell.
    missing_context
        ``"raise"``: a cell without a context profile is an error; ``"none"``: such cells
        are read in the base mode (CLS and their own genes only).
    """

    layer: str | None = None
    context_layer: str | None = None
    context_key: str | None = None
    missing_context: MissingContext = "raise"

    @classmethod
    def from_setup_args(cls, args: dict) -> ContextSetup:
        """The context settings of a registry's ``setup_args`` (base mode when absent)."""
        layer = args.get("rna_layer") if "rna_layer" in args else args.get("layer")
        return cls(
            layer=layer,
            context_layer=args.get("context_layer"),
            context_key=args.get("context_key"),
            missing_context=args.get("missing_context", "raise"),
        )

    @property
    def paired(self) -> bool:
        return self.context_layer is not None or self.context_key is not None

    @property
    def source(self) -> str:
        """Where the context comes from, for messages."""
        if self.context_layer is not None:
            return f"context_layer={self.context_layer!r}"
        return f"context_key={self.context_key!r}"

    def check_arguments(self) -> None:
        """Reject settings that cannot work together."""
        if self.context_layer is not None and self.context_key is not None:
            raise ValueError(
                f"Give context_layer or context_key, not both (got context_layer="
                f"{self.context_layer!r}, context_key={self.context_key!r})."
            )
        if self.missing_context not in MISSING_CONTEXT_CHOICES:
            raise ValueError(
                f"missing_context must be one of {MISSING_CONTEXT_CHOICES}, got "
                f"{self.missing_context!r}."
            )
        if self.context_layer is not None and self.context_layer == self.layer:
            raise ValueError(
                f"context_layer={self.context_layer!r} is the layer of the cells' own counts; "
                "the context must be another profile (e.g. the previous time point)."
            )


@dataclass(frozen=True)
class ContextProfiles:
    """The context profile of every cell and which cells have none."""

    matrix: Any
    missing: np.ndarray

    @property
    def n_missing(self) -> int:
        return int(self.missing.sum())


def _row_totals(matrix) -> np.ndarray:
    return row_totals(matrix)  # a layer on disk is summed block by block


def _context_layer_matrix(rna: AnnData, setup: ContextSetup, what: str):
    if setup.context_layer not in rna.layers:
        raise KeyError(
            f"context_layer={setup.context_layer!r} is not in {what}.layers (available: "
            f"{list(rna.layers)})."
        )
    matrix = rna.layers[setup.context_layer]
    where = f"{what}.layers[{setup.context_layer!r}]"
    if check_matrix_values(matrix, where) != "counts":
        raise ValueError(
            f"{where} (the context_layer) holds non-integer values; the context profiles "
            "must be raw counts, like the cells' own."
        )
    return matrix


def _partner_positions(rna: AnnData, obs: pd.DataFrame, key: str, what: str) -> np.ndarray:
    """Row of each cell's paired cell (-1 where the name is missing or unknown)."""
    if not rna.obs_names.is_unique:
        raise ValueError(
            f"context_key={key!r} pairs cells by obs_name, but {what}.obs_names has "
            "duplicates; make them unique first (adata.obs_names_make_unique())."
        )
    names = obs[key].astype(object).to_numpy()
    known = ~pd.isna(names)
    positions = np.full(len(names), -1, dtype=np.int64)
    positions[known] = rna.obs_names.get_indexer(names[known].astype(str))
    return positions


def _paired_rows(rna: AnnData, setup: ContextSetup, positions: np.ndarray, what: str):
    """The counts of each cell's paired cell, as a CSR matrix (empty rows: no pair)."""
    counts = sparse.csr_matrix(get_matrix(rna, setup.layer, what), dtype=np.float32)
    found = positions >= 0
    rows = counts[np.where(found, positions, 0)]
    # Zeroing the rows of cells without a pair keeps one matrix of the right shape.
    return (sparse.diags(found.astype(np.float32)) @ rows).tocsr()


def context_profiles(
    rna: AnnData, obs: pd.DataFrame, setup: ContextSetup, what: str = "adata"
) -> ContextProfiles:
    """Each cell's context profile and the cells without one (no counts, or no pair).

    Parameters
    ----------
    rna
        The expression AnnData (the RNA modality of a MuData).
    obs
        The obs table with the cell annotations (the MuData's own for a MuData).
    setup
        The paired settings.
    what
        Name of the data in messages.
    """
    if setup.context_layer is not None:
        matrix = _context_layer_matrix(rna, setup, what)
        return ContextProfiles(matrix, _row_totals(matrix) <= 0)
    check_obs_key(obs, setup.context_key, "context_key", what)
    positions = _partner_positions(rna, obs, setup.context_key, what)
    matrix = _paired_rows(rna, setup, positions, what)
    return ContextProfiles(matrix, (positions < 0) | (_row_totals(matrix) <= 0))


def report_missing_context(
    profiles: ContextProfiles, setup: ContextSetup, what: str = "adata", stacklevel: int = 3
) -> None:
    """Raise on cells without a context profile, or warn that they use the base mode."""
    n_missing, n_cells = profiles.n_missing, len(profiles.missing)
    if n_missing == 0:
        return
    reason = (
        "their context row has no counts"
        if setup.context_layer is not None
        else "the cell their obs column names is missing, unknown or has no counts"
    )
    if setup.missing_context == "raise":
        raise ValueError(
            f"{n_missing} of the {n_cells} cells of the {what} have no context profile "
            f"({setup.source}: {reason}). Give them one, or set up with "
            "missing_context='none' to read those cells in the base mode (their own genes "
            "only)."
        )
    warnings.warn(
        f"{n_missing} of the {n_cells} cells of the {what} have no context profile "
        f"({setup.source}); they are read in the base mode (CLS and their own genes only).",
        UserWarning,
        stacklevel=stacklevel,
    )


class ContextField(BaseAnnDataField):
    """Registry field of the context profiles of a paired RANKFORMER (registry key
    :data:`~celltyper.module.CONTEXT_KEY`).

    Registration and transfer check the pairs (:func:`report_missing_context` on new
    data; the setup checks them before anything is registered), and with ``context_key``
    store the paired cells' counts in ``layers[CONTEXT_PAIRS_LAYER]``.

    Parameters
    ----------
    setup
        The paired settings.
    """

    N_MISSING_KEY = "n_missing"

    def __init__(self, setup: ContextSetup):
        super().__init__()
        self.setup = setup

    @property
    def registry_key(self) -> str:
        return CONTEXT_KEY

    @property
    def attr_name(self) -> str:
        return "layers"

    @property
    def attr_key(self) -> str:
        return self.setup.context_layer or CONTEXT_PAIRS_LAYER

    @property
    def is_empty(self) -> bool:
        return False

    def validate_field(self, adata: AnnData) -> None:
        # The checks need the obs table, which a MuData keeps apart: see register_field.
        return None

    def _store(self, adata: AnnData, profiles: ContextProfiles) -> dict:
        if self.setup.context_key is not None:
            adata.layers[CONTEXT_PAIRS_LAYER] = profiles.matrix
        _verify_and_correct_data_format(adata, self.attr_name, self.attr_key)
        return {self.N_MISSING_KEY: profiles.n_missing}

    def register_field(self, adata: AnnData, obs: pd.DataFrame | None = None) -> dict:
        """Register the context of the data a model is set up with (checked already)."""
        obs = adata.obs if obs is None else obs
        return self._store(adata, context_profiles(adata, obs, self.setup))

    def transfer_field(
        self,
        state_registry: dict,
        adata_target: AnnData,
        obs: pd.DataFrame | None = None,
        **kwargs,
    ) -> dict:
        """Register the context of new data (a query, or data to predict), checking it."""
        obs = adata_target.obs if obs is None else obs
        profiles = context_profiles(adata_target, obs, self.setup, "data")
        report_missing_context(profiles, self.setup, "data", stacklevel=6)
        return self._store(adata_target, profiles)

    def get_summary_stats(self, state_registry: dict) -> dict:
        return {}

    def view_state_registry(self, state_registry: dict) -> None:
        return None


class MuDataContextField(BaseMuDataWrapperClass):
    """:class:`ContextField` on the RNA modality of a MuData, its obs column read from the
    MuData's own ``obs``."""

    def __init__(self, setup: ContextSetup, mod_key: str):
        super().__init__(mod_key=mod_key, mod_required=True)
        self._adata_field = ContextField(setup)

    def _modality_and_obs(self, mdata: MuData) -> tuple[AnnData, pd.DataFrame]:
        rna = self.get_modality(mdata)
        return rna, mdata.obs.loc[rna.obs_names]

    def register_field(self, mdata: MuData) -> dict:
        rna, obs = self._modality_and_obs(mdata)
        return self.adata_field.register_field(rna, obs)

    def transfer_field(self, state_registry: dict, mdata_target: MuData, **kwargs) -> dict:
        rna, obs = self._modality_and_obs(mdata_target)
        return self.adata_field.transfer_field(state_registry, rna, obs, **kwargs)


def context_field(make: FieldFactory, setup: ContextSetup) -> BaseAnnDataField:
    """The context field for an AnnData or for the RNA modality of a MuData."""
    if make.is_mudata:
        return MuDataContextField(setup, make.rna_modality)
    return ContextField(setup)
