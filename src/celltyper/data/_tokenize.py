"""Rank-value tokenisation of expression profiles (Geneformer, with scGPT-style value bins).

A cell becomes the list of its most highly expressed genes, ranked after each gene is
divided by its typical expression in the reference (the median of its non-zero,
total-normalised values), so that ubiquitous housekeeping genes rank lower than genes that
are high *for them*. Token ids are ``N_SPECIAL_TOKENS + gene index``; ``CLS_TOKEN`` opens
every cell and ``PAD_TOKEN`` fills the rows of cells with fewer expressed genes than the
sequence length. Genes with zero counts never become tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse
from torch import Tensor

from celltyper._utils import is_in_memory, iter_row_chunks, n_columns

PAD_TOKEN = 0
CLS_TOKEN = 1
MASK_TOKEN = 2
#: Ids below this are special tokens; gene ``g`` has id ``N_SPECIAL_TOKENS + g``.
N_SPECIAL_TOKENS = 3
#: Total each cell is scaled to before the per-gene scaling (``normalize_total``).
TOKENIZE_TARGET_SUM = 1e4
#: Segment of CLS and the current profile's genes, and of SEP and the context's genes.
CURRENT_SEGMENT, CONTEXT_SEGMENT = 0, 1


def sep_token(n_genes: int) -> int:
    """Id of the SEP token of paired tokens over ``n_genes`` genes: the id after the last gene.

    Placing SEP after the genes keeps every gene's id the same in both modes, so base-mode
    vocabularies (and saved base-mode models) are unchanged.
    """
    return N_SPECIAL_TOKENS + n_genes


@dataclass
class RankTokens:
    """A tokenised minibatch.

    Attributes
    ----------
    tokens
        ``(n_cells, 1 + length)`` token ids: ``CLS_TOKEN``, then gene tokens by decreasing
        scaled expression, then ``PAD_TOKEN``.
    padding_mask
        ``(n_cells, 1 + length)``, ``True`` at padding positions (attention ignores them).
    bins
        ``(n_cells, 1 + length)`` value bins ``1 .. n_bins`` of the gene tokens (0 at CLS
        and padding), or ``None`` without value bins.
    segments
        Paired tokens only: ``CURRENT_SEGMENT`` (0) for CLS and the current profile's
        positions, ``CONTEXT_SEGMENT`` (1) for SEP and the context's; ``None`` in the base
        mode.
    """

    tokens: Tensor
    padding_mask: Tensor
    bins: Tensor | None = None
    segments: Tensor | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, rows) -> RankTokens:
        """The tokens of ``rows`` (a slice or positions), without the trailing columns
        that are padding in every one of them (attention never reads them)."""
        padding = self.padding_mask[rows]
        used = (~padding).any(dim=0)
        width = int(used.nonzero().max()) + 1 if bool(used.any()) else 1

        def part(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[rows][:, :width]

        return RankTokens(
            part(self.tokens), padding[:, :width], part(self.bins), part(self.segments)
        )

    def to(self, device) -> RankTokens:
        """The tokens on ``device``."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return RankTokens(
            move(self.tokens), move(self.padding_mask), move(self.bins), move(self.segments)
        )


def _row_normalize(x: Tensor, target_sum: float) -> Tensor:
    totals = x.sum(dim=1, keepdim=True)
    # Cells without a count stay zero instead of turning into NaN.
    totals = torch.where(totals > 0, totals, torch.ones_like(totals))
    return x / totals * target_sum


def nonzero_gene_medians(
    matrix,
    target_sum: float = TOKENIZE_TARGET_SUM,
    chunk_size: int | None = None,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Median of each gene's non-zero values after ``normalize_total``.

    Parameters
    ----------
    matrix
        Cells x genes raw counts, usually the reference cells: dense or sparse in memory,
        or on disk (a backed AnnData's matrix, an ``AnnCollection`` layer), which is read
        in blocks of consecutive rows and never held whole.
    target_sum
        Total each cell is scaled to first.
    chunk_size
        Cells normalised at a time (bounds the memory of dense inputs); ``None``: 8,192
        in memory, :func:`~celltyper._utils.default_chunk_size` on disk.
    rows
        Increasing positions of the cells to use; ``None`` uses every cell.

    Returns
    -------
    ``(n_genes,)`` float64 medians; 1.0 for a gene never expressed (it can only become a
    token in new data, and then ranks by its plain normalised value).

    Notes
    -----
    In memory, every non-zero value is kept and sorted once. On disk, the same medians
    (exactly) come from three reads of the matrix: two narrow, per gene, the range of
    values holding the middle ones with histograms, the last collects the distinct
    values of that range.
    """
    if not is_in_memory(matrix):
        return _streamed_nonzero_gene_medians(matrix, target_sum, chunk_size, rows)
    if rows is not None:
        matrix = matrix[np.asarray(rows)]
    chunk_size = 8192 if chunk_size is None else chunk_size
    rows, cols, vals = [], [], []
    for start in range(0, matrix.shape[0], chunk_size):
        block = _normalized_block(matrix[start : start + chunk_size], target_sum).tocoo()
        rows.append(block.row + start)
        cols.append(block.col)
        vals.append(block.data)
    n_genes = matrix.shape[1]
    cols_all = np.concatenate(cols) if cols else np.array([], dtype=np.int64)
    vals_all = np.concatenate(vals) if vals else np.array([], dtype=np.float64)
    medians = np.ones(n_genes, dtype=np.float64)
    if len(vals_all) == 0:
        return medians
    # Sort the non-zero values by (gene, value) once; the median of gene g is then read at
    # the middle of its run -- no loop over genes or cells.
    order = np.lexsort((vals_all, cols_all))
    cols_sorted, vals_sorted = cols_all[order], vals_all[order]
    counts = np.bincount(cols_sorted, minlength=n_genes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    present = counts > 0
    low = starts[present] + (counts[present] - 1) // 2
    high = starts[present] + counts[present] // 2
    medians[present] = 0.5 * (vals_sorted[low] + vals_sorted[high])
    return medians


def _normalized_block(block, target_sum: float) -> sparse.csr_matrix:
    """Rows scaled to ``target_sum`` (float64 CSR, explicit zeros dropped)."""
    block = sparse.csr_matrix(block, dtype=np.float64)
    totals = np.asarray(block.sum(axis=1)).reshape(-1)
    totals[totals == 0] = 1.0
    block = (sparse.diags(target_sum / totals) @ block).tocsr()
    block.eliminate_zeros()
    return block


#: Histogram bins of each narrowing read of :func:`_streamed_nonzero_gene_medians`.
_MEDIAN_BINS = 1024
#: Narrowing reads before the distinct values of the remaining ranges are collected.
_MEDIAN_LEVELS = 2


class _ValueRanges:
    """Per gene, nested ranges of log2 values known to hold the middle values.

    Level ``i`` splits ``[low_i, high_i)`` of each gene into ``_MEDIAN_BINS`` bins and keeps
    bins ``first_i .. last_i``; a value is inside when it falls in the kept bins of every
    level. Bins are always recomputed with the same arithmetic, so a value's membership
    never depends on how edges round.
    """

    def __init__(self, n_genes: int, low: float, high: float):
        self.levels: list[tuple[np.ndarray, ...]] = []
        self.low = np.full(n_genes, low)
        self.high = np.full(n_genes, high)
        self.below = np.zeros(n_genes, dtype=np.int64)

    @staticmethod
    def bins(x: np.ndarray, genes: np.ndarray, low: np.ndarray, high: np.ndarray):
        width = high[genes] - low[genes]
        position = np.floor((x - low[genes]) / np.where(width > 0, width, 1.0) * _MEDIAN_BINS)
        return np.clip(position, 0, _MEDIAN_BINS - 1).astype(np.int64)

    def inside(self, x: np.ndarray, genes: np.ndarray) -> np.ndarray:
        keep = np.ones(len(x), dtype=bool)
        for low, high, first, last in self.levels:
            b = self.bins(x, genes, low, high)
            keep &= (b >= first[genes]) & (b <= last[genes])
        return keep

    def narrow(self, histogram: np.ndarray, ranks: tuple[np.ndarray, np.ndarray]) -> None:
        """Keep, per gene, the bins holding the values of rank ``ranks`` (overall)."""
        cumulative = histogram.cumsum(axis=1)
        first = (cumulative > (ranks[0] - self.below)[:, None]).argmax(axis=1)
        last = (cumulative > (ranks[1] - self.below)[:, None]).argmax(axis=1)
        genes = np.arange(len(first))
        self.below = self.below + np.where(first > 0, cumulative[genes, first - 1], 0)
        width = self.high - self.low
        self.levels.append((self.low, self.high, first, last))
        self.low, self.high = (
            self.low + width * first / _MEDIAN_BINS,
            self.low + width * (last + 1) / _MEDIAN_BINS,
        )


def _streamed_nonzero_gene_medians(matrix, target_sum, chunk_size, rows) -> np.ndarray:
    """Exact :func:`nonzero_gene_medians` of a matrix on disk, in three reads."""
    n_genes = n_columns(matrix)

    def nonzeros():
        for _, _, block in iter_row_chunks(matrix, chunk_size, rows=rows, dense=False):
            block = _normalized_block(block, target_sum)
            yield block.indices.astype(np.int64), block.data

    counts = np.zeros(n_genes, dtype=np.int64)
    # Counts never exceed their cell's total: every value is at most target_sum.
    ranges = _ValueRanges(n_genes, np.log2(target_sum) - 64.0, np.log2(target_sum) + 1.0)
    for level in range(_MEDIAN_LEVELS):
        histogram = np.zeros(n_genes * _MEDIAN_BINS, dtype=np.int64)
        for genes, values in nonzeros():
            if level == 0:
                counts += np.bincount(genes, minlength=n_genes)
            x = np.log2(values)
            keep = ranges.inside(x, genes)
            genes, x = genes[keep], x[keep]
            flat = genes * _MEDIAN_BINS + ranges.bins(x, genes, ranges.low, ranges.high)
            histogram += np.bincount(flat, minlength=histogram.size)
        ranks = ((counts - 1) // 2, counts // 2)
        ranges.narrow(histogram.reshape(n_genes, _MEDIAN_BINS), ranks)
    # The distinct values left in each gene's range, with their multiplicity.
    parts = []
    for genes, values in nonzeros():
        keep = ranges.inside(np.log2(values), genes)
        pairs = np.stack([genes[keep].astype(np.float64), values[keep]])
        parts.append(np.unique(pairs, axis=1, return_counts=True))
    medians = np.ones(n_genes, dtype=np.float64)
    present = counts > 0
    if not present.any():
        return medians
    pairs = np.concatenate([p[0] for p in parts], axis=1)
    multiplicity = np.concatenate([p[1] for p in parts])
    pairs, inverse = np.unique(pairs, axis=1, return_inverse=True)
    multiplicity = np.bincount(inverse.reshape(-1), weights=multiplicity).astype(np.int64)
    genes, values = pairs[0].astype(np.int64), pairs[1]  # sorted by gene, then value
    start_of_gene = np.searchsorted(genes, np.arange(n_genes))
    cumulative = np.cumsum(multiplicity)
    before_gene = np.where(start_of_gene > 0, cumulative[start_of_gene - 1], 0)

    def value_at(rank: np.ndarray) -> np.ndarray:
        # Position of the first pair whose running count passes the rank, within its gene.
        target = before_gene[present] + (rank[present] - ranges.below[present])
        return values[np.searchsorted(cumulative, target, side="right")]

    low, high = ranks
    medians[present] = 0.5 * (value_at(low) + value_at(high))
    return medians


def rank_value_tokenize(
    x: Tensor,
    gene_medians: Tensor,
    n_tokens: int,
    n_bins: int = 0,
    target_sum: float = TOKENIZE_TARGET_SUM,
    trim: bool = True,
) -> RankTokens:
    """Tokenise a dense minibatch of counts by rank-value encoding.

    Parameters
    ----------
    x
        ``(n_cells, n_genes)`` non-negative counts.
    gene_medians
        ``(n_genes,)`` positive scale of each gene (:func:`nonzero_gene_medians` of the
        reference).
    n_tokens
        Most genes kept per cell (the top ``n_tokens`` by scaled expression).
    n_bins
        Number of per-cell value bins (0: no bins). A gene's bin is
        ``1 + floor(n_bins * q)`` (capped at ``n_bins``), ``q`` the share of the cell's
        expressed genes with a strictly lower normalised value: equal-frequency bins of
        ``log1p`` expression, as in scGPT.
    target_sum
        Total each cell is scaled to before the per-gene scaling.
    trim
        Shorten the sequence to the largest number of tokens a cell of the minibatch has
        (saves attention over columns that are padding in every cell).

    Returns
    -------
    :class:`RankTokens` of length ``1 + min(n_tokens, n_genes)`` (or less when trimmed).
    Ties in scaled expression are broken by the lower gene index.
    """
    if x.ndim != 2 or x.shape[1] != gene_medians.shape[0]:
        raise ValueError(f"x must be (n_cells, {gene_medians.shape[0]}), got {tuple(x.shape)}.")
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}.")
    length = min(n_tokens, x.shape[1])
    if trim:
        length = min(length, int((x > 0).sum(dim=1).max()) if len(x) else 0)
    genes = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    return _tokenize_compressed(x.float(), genes, gene_medians, length, n_bins, target_sum)


def _tokenize_compressed(
    values: Tensor,
    genes: Tensor,
    gene_medians: Tensor,
    length: int,
    n_bins: int,
    target_sum: float,
) -> RankTokens:
    """Tokenise cells given as rows of (count, gene index) pairs into ``1 + length`` tokens.

    Zero counts are never tokens. The expressed genes of a row must be in increasing gene
    order, so that a stable sort breaks ties by gene index. A dense matrix is the case
    where row ``i`` holds every gene; a sparse matrix gives rows of its non-zeros only,
    which is much faster to sort.
    """
    normalized = _row_normalize(values, target_sum)
    medians = gene_medians.to(values.device, torch.float32)
    scores = normalized / medians[genes]
    n_expressed = (values > 0).sum(dim=1)
    # A stable descending sort breaks ties by gene index, so a cell always gives the same
    # tokens whatever the kernel (topk gives no such guarantee).
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :length]
    padding = torch.gather(scores, 1, order) <= 0
    kept_genes = torch.gather(genes, 1, order)
    gene_tokens = torch.where(padding, PAD_TOKEN, kept_genes + N_SPECIAL_TOKENS)
    if gene_tokens.shape[1] < length:
        # Fewer stored entries than tokens asked for (sparse rows): pad to the length.
        extra = length - gene_tokens.shape[1]
        gene_tokens = F.pad(gene_tokens, (0, extra), value=PAD_TOKEN)
        padding = F.pad(padding, (0, extra), value=True)
    n_cells = values.shape[0]
    cls = torch.full((n_cells, 1), CLS_TOKEN, dtype=torch.long, device=values.device)
    tokens = torch.cat([cls, gene_tokens.long()], dim=1)
    padding_mask = torch.cat([torch.zeros_like(cls, dtype=torch.bool), padding], dim=1)
    bins = None
    if n_bins > 0:
        bins = _value_bins(normalized, order, padding[:, : order.shape[1]], n_expressed, n_bins)
        bins = F.pad(bins, (1, tokens.shape[1] - 1 - bins.shape[1]), value=0)
    return RankTokens(tokens, padding_mask, bins)


def _value_bins(
    normalized: Tensor, order: Tensor, padding: Tensor, n_expressed: Tensor, n_bins: int
) -> Tensor:
    """Equal-frequency bins of each kept gene's value among the cell's expressed genes."""
    values = torch.gather(normalized, 1, order)
    ascending = torch.sort(normalized, dim=1).values
    # Values strictly below, minus the zeros, gives the rank among expressed genes (ties
    # share a bin). log1p is monotone, so ranking normalised values ranks log1p values.
    below = torch.searchsorted(ascending, values.contiguous(), side="left")
    n_zero = (normalized.shape[1] - n_expressed).unsqueeze(1)
    rank = (below - n_zero).clamp_min(0)
    n_expr = n_expressed.clamp_min(1).unsqueeze(1)
    bins = 1 + torch.div(rank * n_bins, n_expr, rounding_mode="floor")
    bins = bins.clamp_max(n_bins)
    return torch.where(padding, 0, bins).long()


def _compress_rows(block: sparse.csr_matrix) -> tuple[Tensor, Tensor]:
    """Rows of a CSR block as (values, gene index) matrices padded with zero values."""
    block = block.copy() if not block.has_sorted_indices else block
    block.sort_indices()
    counts = np.diff(block.indptr)
    width = max(int(counts.max()) if len(counts) else 0, 1)
    rows = np.repeat(np.arange(block.shape[0]), counts)
    positions = np.arange(block.nnz) - np.repeat(block.indptr[:-1], counts)
    values = np.zeros((block.shape[0], width), dtype=np.float32)
    # Padding entries have value 0, so they never become tokens whatever their gene.
    genes = np.zeros((block.shape[0], width), dtype=np.int64)
    values[rows, positions] = block.data
    genes[rows, positions] = block.indices
    return torch.from_numpy(values), torch.from_numpy(genes)


def tokenize_matrix(
    matrix,
    gene_medians: np.ndarray | Tensor,
    n_tokens: int,
    n_bins: int = 0,
    target_sum: float = TOKENIZE_TARGET_SUM,
    chunk_size: int = 4096,
    progress: bool = False,
) -> RankTokens:
    """Tokenise a whole cells x genes matrix (dense or sparse) chunk by chunk.

    A sparse matrix is processed in chunks of cells with similar numbers of expressed
    genes, each reduced to its non-zero entries per row before sorting (a cell has far
    fewer expressed genes than genes); a dense chunk is sorted whole. Both give the tokens
    of :func:`rank_value_tokenize`, in the rows' original order. Every cell gets the same length
    ``1 + min(n_tokens, m)``, ``m`` the largest number of genes a cell of ``matrix``
    expresses.

    Parameters
    ----------
    matrix
        Raw counts, cells x genes.
    gene_medians
        Per-gene scale, as in :func:`rank_value_tokenize`.
    n_tokens, n_bins, target_sum
        As in :func:`rank_value_tokenize`.
    chunk_size
        Cells tokenised at a time.
    progress
        Show a progress bar over the chunks.
    """
    from scvi.utils import track

    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}.")
    medians = torch.as_tensor(np.asarray(gene_medians), dtype=torch.float32)
    n_cells, n_genes = matrix.shape
    # The longest cell sets the length: columns of padding in every cell cost memory and
    # attention for nothing.
    n_expressed = (
        np.diff(sparse.csr_matrix(matrix).indptr)
        if sparse.issparse(matrix)
        else (np.asarray(matrix) > 0).sum(axis=1)
    )
    length = min(n_tokens, n_genes, int(n_expressed.max()) if n_cells else 0)
    out = RankTokens(
        torch.zeros((n_cells, 1 + length), dtype=torch.long),
        torch.zeros((n_cells, 1 + length), dtype=torch.bool),
        torch.zeros((n_cells, 1 + length), dtype=torch.long) if n_bins else None,
    )
    is_sparse = sparse.issparse(matrix)
    if is_sparse:
        matrix = sparse.csr_matrix(matrix, dtype=np.float32)
        # Cells of similar length share a chunk, so each chunk sorts little padding.
        order = np.argsort(n_expressed, kind="stable")
    else:
        order = np.arange(n_cells)
    starts = range(0, n_cells, chunk_size)
    if progress:
        starts = track(starts, description="Tokenising")
    for start in starts:
        rows = order[start : start + chunk_size]
        if is_sparse:
            values, genes = _compress_rows(matrix[rows])
        else:
            block = np.asarray(matrix[start : start + chunk_size])
            values = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))
            genes = torch.arange(values.shape[1]).expand(values.shape[0], -1)
        part = _tokenize_compressed(values, genes, medians, length, n_bins, target_sum)
        index = torch.from_numpy(rows)
        out.tokens[index] = part.tokens
        out.padding_mask[index] = part.padding_mask
        if n_bins:
            out.bins[index] = part.bins
    return out


# -- paired tokens ----------------------------------------------------------------------------
def join_paired_tokens(current: RankTokens, context: RankTokens, sep_id: int) -> RankTokens:
    """One sequence from the tokens of the current and of the context profile.

    The context's CLS becomes SEP; a cell whose context has no expressed gene (a missing
    pair) gets padding there instead, so its unmasked tokens are those of the base mode:
    CLS and its current profile's genes.
    """
    # all() over no gene position is True: a context half trimmed to nothing is missing.
    has_context = ~context.padding_mask[:, 1:].all(dim=1, keepdim=True)
    sep = torch.where(has_context, sep_id, PAD_TOKEN).to(context.tokens.dtype)
    # One concatenation per field, the context's CLS column replaced on the way: whole
    # matrices of cells make every extra copy count.
    tokens = torch.cat([current.tokens, sep, context.tokens[:, 1:]], dim=1)
    padding = torch.cat([current.padding_mask, ~has_context, context.padding_mask[:, 1:]], dim=1)
    segments = torch.full_like(tokens, CONTEXT_SEGMENT)
    segments[:, : current.tokens.shape[1]] = CURRENT_SEGMENT
    bins = None
    if current.bins is not None and context.bins is not None:
        bins = torch.cat([current.bins, context.bins], dim=1)
    return RankTokens(tokens, padding, bins, segments)


def paired_rank_value_tokenize(
    x: Tensor,
    context: Tensor,
    gene_medians: Tensor,
    n_tokens_current: int,
    n_tokens_context: int,
    n_bins: int = 0,
    target_sum: float = TOKENIZE_TARGET_SUM,
    trim: bool = True,
) -> RankTokens:
    """Paired tokens of a dense minibatch: CLS, current genes, SEP, context genes.

    Parameters
    ----------
    x
        ``(n_cells, n_genes)`` counts of the current profiles.
    context
        ``(n_cells, n_genes)`` counts of the paired (e.g. previous time point) profiles; a
        row without counts is a missing pair (its SEP and context half are padding).
    gene_medians
        Per-gene scale shared by both halves (:func:`nonzero_gene_medians` of the
        reference), so a gene's rank means the same in both.
    n_tokens_current, n_tokens_context
        Most genes kept from each profile.
    n_bins, target_sum, trim
        As in :func:`rank_value_tokenize`, applied to each half on its own (value bins
        are per profile).

    Returns
    -------
    :class:`RankTokens` with ``segments``: position 0 is CLS, positions
    ``1 .. L`` the current genes (``L = min(n_tokens_current, n_genes)``, or less when
    trimmed), position ``1 + L`` SEP, then the context genes.
    """
    if context.shape != x.shape:
        raise ValueError(
            f"context must have the shape of x {tuple(x.shape)}, got {tuple(context.shape)}."
        )
    if n_tokens_context < 1:
        raise ValueError(f"n_tokens_context must be >= 1, got {n_tokens_context}.")
    current = rank_value_tokenize(x, gene_medians, n_tokens_current, n_bins, target_sum, trim)
    previous = rank_value_tokenize(
        context, gene_medians, n_tokens_context, n_bins, target_sum, trim
    )
    return join_paired_tokens(current, previous, sep_token(gene_medians.shape[0]))


def tokenize_paired_matrices(
    matrix,
    context,
    gene_medians: np.ndarray | Tensor,
    n_tokens_current: int,
    n_tokens_context: int,
    n_bins: int = 0,
    target_sum: float = TOKENIZE_TARGET_SUM,
    chunk_size: int = 4096,
    progress: bool = False,
) -> RankTokens:
    """Paired tokens of whole current and context matrices (dense or sparse).

    Each half is tokenised by :func:`tokenize_matrix` and the two are joined as in
    :func:`paired_rank_value_tokenize`; each half is as long as its longest cell needs.

    Parameters
    ----------
    matrix, context
        Cells x genes raw counts of the current and of the paired profiles, row by row.
    gene_medians, n_tokens_current, n_tokens_context, n_bins, target_sum
        As in :func:`paired_rank_value_tokenize`.
    chunk_size, progress
        As in :func:`tokenize_matrix`.
    """
    if tuple(context.shape) != tuple(matrix.shape):
        raise ValueError(
            f"context must have the shape of matrix {tuple(matrix.shape)}, got "
            f"{tuple(context.shape)}."
        )
    if n_tokens_context < 1:
        raise ValueError(f"n_tokens_context must be >= 1, got {n_tokens_context}.")
    options = {"target_sum": target_sum, "chunk_size": chunk_size, "progress": progress}
    current = tokenize_matrix(matrix, gene_medians, n_tokens_current, n_bins, **options)
    previous = tokenize_matrix(context, gene_medians, n_tokens_context, n_bins, **options)
    return join_paired_tokens(current, previous, sep_token(matrix.shape[1]))
