"""Data splitting for models that train on every cell equally often (VAEs)."""

from __future__ import annotations

from ._blocks import cell_loader
from ._distributed import replica
from ._splitting import LabelledUnlabelledSplitter


class AllCellsSplitter(LabelledUnlabelledSplitter):
    """Every training cell once per epoch in one shuffled loader; labelled validation.

    The validation cells are a per-class share of the labelled cells, as in
    :class:`~celltyper.data.LabelledUnlabelledSplitter`, but a VAE's reconstruction must
    see labelled and unlabelled cells equally often, so no set is cycled or oversampled.
    """

    def train_dataloader(self):
        rank, world_size = replica(self)
        if world_size > 1:
            return self._shard(self.train_idx, rank, world_size)
        return cell_loader(
            self.adata_manager,
            self.train_idx,
            shuffle=True,
            batch_size=self.batch_size,
            drop_last=self._drop_last(len(self.train_idx)),
            **self.loader_kwargs,
        )
