"""Batched Euclidean k-means over the tokens of every (batch, head), and the cluster-contiguous permutation.

The clustering half of Sparse VideoGen2's semantic-aware permutation (``svg2.py``): queries and keys of each head
are clustered separately, tokens are sorted by cluster label so that every cluster is one contiguous run, and the
attention is then decided cluster by cluster. Everything here works on (G, N, D) tensors, G = batch x heads, in
FP32 at least (half-precision distances would mislabel near-ties from one run to the next).

Determinism: initial centroids are evenly spaced tokens, ties in the assignment go to the lowest cluster index
(``argmin``), and an empty cluster keeps its previous centroid (it stays empty until a token comes closer to it
than to any other centroid). On the CPU the cluster sums are a sequential ``scatter_add``; on CUDA, where that uses
atomics (run-to-run rounding noise), they are a one-hot matrix product instead.
"""

from __future__ import annotations

import torch

# Distance entries (G x tokens x clusters) per assignment chunk: bounds the temporary at large grids.
_CHUNK_DISTANCES = 1 << 24


def _working(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def initial_centroids(x: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """(G, C, D) starting centroids: ``num_clusters`` tokens evenly spaced in ``x``'s token order (the grid's
    raster order, so the seeds spread over the whole image). ``x`` is (G, N, D); ``1 <= num_clusters <= N``."""
    length = x.shape[1]
    if not 1 <= num_clusters <= length:
        raise ValueError(f"num_clusters = {num_clusters} is out of range; allowed: 1 to the {length} tokens")
    index = (torch.arange(num_clusters, device=x.device) * length + length // 2) // num_clusters
    return _working(x.index_select(1, index)).clone()


def assign_clusters(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(G, N) int64 label of the nearest centroid (Euclidean) of every token of ``x`` (G, N, D); ties go to the
    lower cluster index."""
    x = _working(x)
    centroids = centroids.to(x.dtype)
    groups, length, _ = x.shape
    clusters = centroids.shape[1]
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; the first term is the same for every cluster of a token.
    half_norm = 0.5 * centroids.pow(2).sum(-1)  # (G, C)
    chunk = max(1, _CHUNK_DISTANCES // max(1, groups * clusters))
    labels = torch.empty(groups, length, dtype=torch.long, device=x.device)
    for first in range(0, length, chunk):
        part = x[:, first:first + chunk]
        distance = torch.baddbmm(half_norm[:, None, :], part, centroids.transpose(1, 2), alpha=-1.0)
        labels[:, first:first + chunk] = distance.argmin(-1)
    return labels


def cluster_counts(labels: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """(..., C) int64 number of tokens per cluster from (..., N) labels."""
    counts = torch.zeros(*labels.shape[:-1], num_clusters, dtype=torch.long, device=labels.device)
    return counts.scatter_add_(-1, labels, torch.ones_like(labels))


def cluster_sums(x: torch.Tensor, labels: torch.Tensor, num_clusters: int, *, matmul: bool | None = None
                 ) -> torch.Tensor:
    """(G, C, D) sum of each cluster's tokens. ``matmul`` (default: on CUDA) sums by one-hot matrix products,
    which are deterministic where ``scatter_add`` uses atomics; otherwise a sequential ``scatter_add``."""
    groups, length, dim = x.shape
    sums = torch.zeros(groups, num_clusters, dim, dtype=x.dtype, device=x.device)
    if matmul if matmul is not None else x.is_cuda:
        chunk = max(1, _CHUNK_DISTANCES // max(1, groups * num_clusters))
        for first in range(0, length, chunk):
            one_hot = torch.nn.functional.one_hot(labels[:, first:first + chunk], num_clusters).to(x.dtype)
            sums += one_hot.transpose(1, 2) @ x[:, first:first + chunk]
        return sums
    return sums.scatter_add_(1, labels[..., None].expand(-1, -1, dim), x)


def update_centroids(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """``(centroids, counts)``: the mean of each cluster's tokens, the previous centroid for an empty cluster."""
    x = _working(x)
    clusters = centroids.shape[1]
    counts = cluster_counts(labels, clusters)
    means = cluster_sums(x, labels, clusters) / counts.clamp(min=1)[..., None].to(x.dtype)
    return torch.where((counts > 0)[..., None], means, centroids.to(x.dtype)), counts


def batched_kmeans(x: torch.Tensor, centroids: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    """Lloyd's k-means of every group of ``x`` (G, N, D), warm-started from ``centroids`` (G, C, D).

    Each of the ``iters`` (>= 1) iterations assigns every token to its nearest centroid, then moves each centroid
    to the mean of its tokens. Returns ``(labels (G, N), centroids (G, C, D), counts (G, C))`` where the labels are
    the last assignment and each non-empty cluster's centroid is exactly the mean of the tokens so labelled, so
    that cluster-level scores describe the clusters that are used. Centroids come back in FP32 (FP64 for FP64
    input). Given centroids that are already the means of their own assignment come back unchanged.
    """
    if iters < 1:
        raise ValueError(f"iters = {iters} is out of range; allowed: an integer >= 1")
    if centroids.shape[0] != x.shape[0] or centroids.shape[2] != x.shape[2]:
        raise ValueError(f"centroids {tuple(centroids.shape)} do not match tokens {tuple(x.shape)}: expected "
                         f"({x.shape[0]}, C, {x.shape[2]})")
    labels = counts = None
    for _ in range(iters):
        labels = assign_clusters(x, centroids)
        centroids, counts = update_centroids(x, labels, centroids)
    return labels, centroids, counts


def cluster_permutation(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, inverse)`` of (..., N) labels: ``x[..., order, :]`` lists the tokens cluster by cluster (cluster
    0 first; tokens of one cluster keep their relative order: a stable sort), and ``inverse`` undoes it
    (``order[..., inverse] == arange(N)``)."""
    order = torch.argsort(labels, dim=-1, stable=True)
    return order, invert_permutation(order)


def invert_permutation(order: torch.Tensor) -> torch.Tensor:
    """The inverse of permutations along the last dim: ``inverse[..., order[..., i]] = i``."""
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)
