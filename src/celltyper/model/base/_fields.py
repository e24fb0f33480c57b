"""One list of registry fields serves ``setup_anndata`` and ``setup_mudata``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scvi.data import fields


@dataclass(frozen=True)
class FieldFactory:
    """Builds scvi-tools registry fields for an AnnData, or for the RNA modality of a
    MuData (obs columns are read from the MuData's own ``obs``).

    A model lists its fields once, in ``_setup_fields(make, ...)``, calling these
    methods; ``setup_anndata`` passes ``FieldFactory()`` and ``setup_mudata``
    ``FieldFactory(rna_modality)``.

    Parameters
    ----------
    rna_modality
        Name of the RNA modality of a MuData; ``None`` for an AnnData.
    """

    rna_modality: str | None = None

    @property
    def is_mudata(self) -> bool:
        return self.rna_modality is not None

    def layer(self, registry_key: str, layer: str | None):
        """The expression matrix (``X`` or a layer), never required to hold counts."""
        if self.is_mudata:
            return fields.MuDataLayerField(
                registry_key,
                layer,
                mod_key=self.rna_modality,
                is_count_data=False,
                mod_required=True,
            )
        return fields.LayerField(registry_key, layer, is_count_data=False)

    def categorical(self, registry_key: str, obs_key: str | None):
        """One categorical ``obs`` column (batch)."""
        if self.is_mudata:
            return fields.MuDataCategoricalObsField(registry_key, obs_key, mod_key=None)
        return fields.CategoricalObsField(registry_key, obs_key)

    def labels(self, registry_key: str, obs_key: str | None, unlabeled_category: str):
        """A label column with an unlabelled category."""
        if self.is_mudata:
            return fields.MuDataLabelsWithUnlabeledObsField(
                registry_key, obs_key, unlabeled_category, mod_key=None
            )
        return fields.LabelsWithUnlabeledObsField(registry_key, obs_key, unlabeled_category)

    def categorical_joint(self, registry_key: str, obs_keys: Sequence[str] | None):
        """Several categorical ``obs`` columns registered together (covariates)."""
        keys = None if not obs_keys else list(obs_keys)
        if self.is_mudata:
            return fields.MuDataCategoricalJointObsField(registry_key, keys, mod_key=None)
        return fields.CategoricalJointObsField(registry_key, keys)
