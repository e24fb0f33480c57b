"""Seeded, batched K-means in torch (Lloyd's algorithm with k-means++ seeding).

The data may be a dense array, a torch tensor, a scipy sparse matrix or a matrix on disk
(read in blocks of consecutive rows); rows are
densified (and optionally transformed, e.g. log-normalised) one block at a time, so a
100,000-cell sparse matrix is never turned into one dense array unless it fits in
``max_cached_elements``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse
from scvi.utils import track
from torch import Tensor

from celltyper._utils import default_chunk_size, is_in_memory, iter_row_chunks, n_columns, n_rows

RowTransform = Callable[[Tensor], Tensor]


@dataclass
class KMeansResult:
    """Outcome of :func:`kmeans`.

    Attributes
    ----------
    labels
        Cluster of each row, ``(n,)`` int64 in ``[0, n_clusters)``.
    centers
        Cluster centres, ``(n_clusters, n_features)`` float32.
    inertia
        Sum of squared distances of the rows to their centre.
    n_iter
        Lloyd iterations run.
    seconds
        Wall-clock time of the whole call.
    """

    labels: np.ndarray
    centers: Tensor
    inertia: float
    n_iter: int
    seconds: float


class _Rows:
    """Row blocks of ``data`` as dense float32 tensors on ``device``, transformed.

    ``data`` on disk (a backed AnnData's matrix, an ``AnnCollection`` layer) is read in
    blocks of consecutive rows, only its rows ``selection`` (all when ``None``).
    """

    def __init__(self, data, transform, batch_size, device, max_cached_elements, selection=None):
        self.on_disk = not isinstance(data, Tensor) and not is_in_memory(data)
        if self.on_disk:
            self.data = data
        elif selection is not None:
            raise ValueError("rows= selects rows of a matrix on disk; subset others first.")
        elif isinstance(data, Tensor):
            self.data = data.detach()
        elif sparse.issparse(data):
            self.data = sparse.csr_matrix(data)
        else:
            self.data = np.asarray(data)
        self.selection = None
        if self.on_disk:
            total = n_rows(data)
            self.selection = np.arange(total) if selection is None else np.asarray(selection)
        self.transform = transform
        self.batch_size = batch_size
        self.device = device
        self.n = len(self.selection) if self.on_disk else int(self.data.shape[0])
        self._cache: list[tuple[int, int, Tensor]] | None = None
        first = self.take(np.arange(min(self.n, 1)))
        self.n_features = int(first.shape[1])
        # Small enough data are transformed once and reused by every iteration.
        if self.n * self.n_features <= max_cached_elements:
            self._cache = list(self.blocks())

    def bounds(self) -> Iterator[tuple[int, int]]:
        for start in range(0, self.n, self.batch_size):
            yield start, min(start + self.batch_size, self.n)

    def _to_tensor(self, rows) -> Tensor:
        if isinstance(rows, Tensor):
            x = rows.to(self.device, torch.float32)
        elif sparse.issparse(rows):
            x = torch.as_tensor(rows.toarray(), dtype=torch.float32, device=self.device)
        else:
            x = torch.as_tensor(np.asarray(rows), dtype=torch.float32, device=self.device)
        return self.transform(x) if self.transform is not None else x

    def _block(self, start: int, stop: int) -> Tensor:
        return self._to_tensor(self.data[start:stop])

    def _read(self, positions: np.ndarray) -> Tensor:
        """Rows ``positions`` (increasing) of the selection, from disk in contiguous reads."""
        wanted = self.selection[positions]
        blocks = [
            block
            for _, _, block in iter_row_chunks(
                self.data, self._disk_chunk(), rows=wanted, dense=False
            )
        ]
        if not blocks:
            return self._to_tensor(np.zeros((0, n_columns(self.data)), dtype=np.float32))
        joined = sparse.vstack(blocks) if sparse.issparse(blocks[0]) else np.vstack(blocks)
        return self._to_tensor(joined)

    def take(self, indices: np.ndarray) -> Tensor:
        """The transformed rows at ``indices`` (increasing for data on disk)."""
        if self.on_disk:
            return self._read(np.asarray(indices))
        if isinstance(self.data, Tensor):
            return self._to_tensor(self.data[torch.as_tensor(indices, dtype=torch.long)])
        return self._to_tensor(self.data[np.asarray(indices)])

    def _disk_chunk(self) -> int:
        return min(self.batch_size, default_chunk_size(self.data))

    def blocks(self) -> Iterator[tuple[int, int, Tensor]]:
        if self._cache is not None:
            yield from self._cache
        elif self.on_disk:
            rows = None if len(self.selection) == n_rows(self.data) else self.selection
            chunks = iter_row_chunks(self.data, self._disk_chunk(), rows=rows, dense=False)
            for start, stop, block in chunks:
                yield start, stop, self._to_tensor(block)
        else:
            for start, stop in self.bounds():
                yield start, stop, self._block(start, stop)


def _squared_distances(x: Tensor, centers: Tensor, center_norms: Tensor) -> Tensor:
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, clamped against rounding below zero.
    d2 = (x * x).sum(dim=1, keepdim=True) - 2.0 * x @ centers.T + center_norms[None, :]
    return d2.clamp_min_(0.0)


def kmeans_plus_plus(
    x: Tensor, n_clusters: int, generator: torch.Generator, max_dims: int = 64
) -> np.ndarray:
    """Positions of the rows of ``x`` picked by k-means++ (Arthur & Vassilvitskii 2007).

    The first centre is a uniformly drawn row; every next one is drawn with probability
    proportional to the squared distance to the nearest centre chosen so far. Rows wider
    than ``max_dims`` are first mapped by a seeded Gaussian random projection to
    ``max_dims`` dimensions (Johnson-Lindenstrauss), which keeps the distances the
    seeding needs while making each of its ``n_clusters`` steps cheap.
    """
    n, d = x.shape
    if d > max_dims:
        projection = torch.randn(d, max_dims, generator=generator) / max_dims**0.5
        x = x @ projection.to(x.device, x.dtype)
    picks = [int(torch.randint(n, (1,), generator=generator))]
    closest = ((x - x[picks[0]]) ** 2).sum(dim=1)
    for _ in range(1, n_clusters):
        total = float(closest.sum())
        if total <= 0.0:
            # Fewer distinct rows than clusters: duplicates are unavoidable.
            pick = int(torch.randint(n, (1,), generator=generator))
        else:
            weights = (closest / total).double().cpu()
            pick = int(torch.multinomial(weights, 1, generator=generator))
        picks.append(pick)
        closest = torch.minimum(closest, ((x - x[pick]) ** 2).sum(dim=1))
    return np.asarray(picks)


@torch.no_grad()
def kmeans(
    data: np.ndarray | Tensor | sparse.spmatrix,
    n_clusters: int,
    *,
    rows: np.ndarray | None = None,
    transform: RowTransform | None = None,
    max_iter: int = 50,
    tol: float = 1e-4,
    seed: int = 0,
    batch_size: int = 4096,
    init_size: int | None = None,
    device: str | torch.device = "cpu",
    max_cached_elements: int = 2**27,
    progress_bar: bool = False,
    description: str = "K-means",
) -> KMeansResult:
    """Cluster the rows of ``data`` into ``n_clusters`` groups (seeded, batched).

    k-means++ picks the initial centres from a seeded random subsample of
    ``init_size`` rows; Lloyd iterations then alternate assignment and centre update,
    processing ``batch_size`` rows at a time, until at most a fraction ``tol`` of the
    rows change cluster or ``max_iter`` iterations have run. A cluster left empty is
    re-seeded with the row farthest from its centre.

    Parameters
    ----------
    data
        ``(n, d)`` rows to cluster: numpy array, torch tensor, scipy sparse matrix, or a
        matrix on disk (a backed AnnData's matrix, an ``AnnCollection`` layer), which is
        read in blocks of consecutive rows (every Lloyd iteration reads it again unless
        it fits in ``max_cached_elements``).
    rows
        Data on disk only: increasing positions of the rows to cluster (``None``: all);
        labels follow their order.
    n_clusters
        Number of clusters, ``1 <= n_clusters <= n``.
    transform
        Applied to every dense row block before clustering (e.g. log-normalisation).
    max_iter
        Largest number of Lloyd iterations.
    tol
        Stop when at most this fraction of rows changed cluster in an iteration.
    seed
        Seed of the subsample and of the k-means++ draws; same seed, same result.
    batch_size
        Rows processed at a time.
    init_size
        Rows in the k-means++ subsample; defaults to ``max(20 * n_clusters, 5000)``.
    device
        Where to compute (``"cuda"`` makes 100,000-cell runs take seconds).
    max_cached_elements
        Data with at most this many values (after densifying) are transformed once and
        kept in memory; larger data are re-read block by block in every iteration.
    progress_bar
        Show a progress bar over the iterations.
    description
        Label of the progress bar.

    Returns
    -------
    :class:`KMeansResult` with the labels, centres, inertia, iterations and seconds.
    """
    start_time = time.perf_counter()
    n = n_rows(data) if rows is None else len(rows)
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters must be in [1, n_rows={n}], got {n_clusters}.")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    device = torch.device(device)
    rows = _Rows(data, transform, batch_size, device, max_cached_elements, selection=rows)
    generator = torch.Generator().manual_seed(int(seed))

    init_size = max(20 * n_clusters, 5000) if init_size is None else init_size
    init_size = min(n, max(init_size, n_clusters))
    sample = torch.randperm(n, generator=generator)[:init_size].sort().values.numpy()
    subsample = rows.take(sample)
    centers = subsample[kmeans_plus_plus(subsample, n_clusters, generator)].float()

    labels = torch.full((n,), -1, dtype=torch.long, device=device)
    distances = torch.zeros(n, device=device)
    n_iter = 0
    iterations = range(max_iter)
    if progress_bar:
        iterations = track(iterations, description=description)
    for _ in iterations:
        n_iter += 1
        center_norms = (centers * centers).sum(dim=1)
        sums = torch.zeros(n_clusters, rows.n_features, dtype=torch.float64, device=device)
        counts = torch.zeros(n_clusters, dtype=torch.float64, device=device)
        changed = 0
        for start, stop, block in rows.blocks():
            d2 = _squared_distances(block, centers, center_norms)
            best, assigned = d2.min(dim=1)
            changed += int((assigned != labels[start:stop]).sum())
            labels[start:stop] = assigned
            distances[start:stop] = best
            sums.index_add_(0, assigned, block.double())
            counts.index_add_(0, assigned, torch.ones_like(best, dtype=torch.float64))
        empty = torch.nonzero(counts == 0).view(-1)
        new_centers = (sums / counts.clamp_min(1.0)[:, None]).float()
        if len(empty):
            far = torch.topk(distances, len(empty)).indices.cpu().numpy()
            new_centers[empty] = rows.take(np.sort(far))
            changed = max(changed, 1)  # the re-seeded centres need another assignment
        centers = new_centers
        if changed <= tol * n:
            break

    # Final assignment to the final centres, so labels, centres and inertia agree.
    center_norms = (centers * centers).sum(dim=1)
    inertia = 0.0
    for start, stop, block in rows.blocks():
        best, assigned = _squared_distances(block, centers, center_norms).min(dim=1)
        labels[start:stop] = assigned
        inertia += float(best.double().sum())
    return KMeansResult(
        labels=labels.cpu().numpy().astype(np.int64),
        centers=centers.cpu(),
        inertia=inertia,
        n_iter=n_iter,
        seconds=time.perf_counter() - start_time,
    )
