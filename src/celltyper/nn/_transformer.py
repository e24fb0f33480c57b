"""A pre-LayerNorm transformer encoder over token sets with a key padding mask.

Attention goes through :func:`torch.nn.functional.scaled_dot_product_attention`, so a GPU
uses the flash or memory-efficient kernels. There is no positional encoding: the layers
treat a cell's tokens as a set.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention with a key padding mask.

    Parameters
    ----------
    d_model
        Width of the tokens.
    n_heads
        Number of heads; must divide ``d_model``.
    dropout
        Dropout on the attention weights (training only).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"n_heads={n_heads} must divide d_model={d_model}.")
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def _split_heads(self, t: Tensor) -> Tensor:
        # (B, L, D) -> (B, L, H, Dh) -> (B, H, L, Dh): each head sees every token with its
        # own Dh features. Reshaping straight to (B, H, L, Dh) without the transpose would
        # hand each "head" a mix of tokens and features.
        batch, length, _ = t.shape
        return t.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)

    def heads(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """The heads' outputs before the output projection, ``(B, L, H, Dh)``.

        Parameters
        ----------
        x
            ``(B, L, d_model)`` tokens.
        padding_mask
            ``(B, L)``, ``True`` at padding: no token attends to those positions.
        """
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        attn_mask = None
        if padding_mask is not None:
            # SDPA's boolean masks say where attention is *allowed*; broadcast over heads
            # and queries.
            attn_mask = (~padding_mask)[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return out.transpose(1, 2)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        heads = self.heads(x, padding_mask)
        return self.out(heads.reshape(x.shape[0], x.shape[1], self.d_model))

    def first_query(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """The output at position 0 only, ``(B, 1, d_model)``: :meth:`forward`'s first
        row, with the query projected for that position alone (inference)."""
        d = self.d_model
        weight, bias = self.qkv.weight, self.qkv.bias
        q = F.linear(x[:, :1], weight[:d], None if bias is None else bias[:d])
        k, v = F.linear(x, weight[d:], None if bias is None else bias[d:]).chunk(2, dim=-1)
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        attn_mask = None if padding_mask is None else (~padding_mask)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out(out.transpose(1, 2).reshape(x.shape[0], 1, d))


class TransformerEncoderLayer(nn.Module):
    """Pre-LayerNorm encoder layer: ``x + Attn(LN(x))``, then ``x + FF(LN(x))``.

    Parameters
    ----------
    d_model
        Width of the tokens.
    n_heads
        Attention heads.
    d_ff
        Hidden width of the feed-forward block (GELU).
    dropout
        Dropout on the attention weights and after each residual branch.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.1):
        super().__init__()
        self.norm_attention = nn.LayerNorm(d_model)
        self.attention = MultiHeadSelfAttention(d_model, n_heads, dropout)
        self.norm_ff = nn.LayerNorm(d_model)
        self.feed_forward = nn.Sequential(
            nn.Linear(d_model, d_ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        x = x + self.dropout(self.attention(self.norm_attention(x), padding_mask))
        return x + self.dropout(self.feed_forward(self.norm_ff(x)))

    def forward_first(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """:meth:`forward` at position 0 only, ``(B, 1, d_model)`` (every position is
        still attended to); for the last layer when only the CLS output is needed."""
        first = x[:, :1] + self.dropout(
            self.attention.first_query(self.norm_attention(x), padding_mask)
        )
        return first + self.dropout(self.feed_forward(self.norm_ff(first)))


class TransformerEncoder(nn.Module):
    """A stack of :class:`TransformerEncoderLayer` with a final LayerNorm.

    Parameters
    ----------
    n_layers
        Number of layers.
    d_model, n_heads, d_ff, dropout
        As in :class:`TransformerEncoderLayer`.
    """

    def __init__(self, n_layers: int, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.1):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(d_model, n_heads, d_ff, dropout) for _ in range(n_layers)
        )
        # Pre-LN layers leave the residual stream unnormalised; normalise it once at the end.
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, padding_mask)
        return self.norm(x)

    def forward_first(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """The final hidden state of position 0 (e.g. CLS), ``(B, d_model)``: the last
        layer computes that position only."""
        for layer in self.layers[:-1]:
            x = layer(x, padding_mask)
        return self.norm(self.layers[-1].forward_first(x, padding_mask))[:, 0]
