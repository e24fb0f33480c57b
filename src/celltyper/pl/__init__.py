"""Plotting functions for annotation results."""

from ._embedding import latent_umap

__all__ = ["latent_umap"]
