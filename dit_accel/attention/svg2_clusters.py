"""SVG2's math, pure functions: centroid scores, top-p selection of key clusters, the clustering plan of a call,
and exact attention restricted to the selected clusters (the CPU path; ``kernels/cluster_lut.py`` is the CUDA one).
The plugin, its config and the patching are :mod:`dit_accel.attention.svg2`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dit_accel.attention.kmeans import batched_kmeans, cluster_counts, initial_centroids

# Gathered key rows (and key-mask entries) per chunk of query clusters: bounds the (clusters, keys, D) copies.
_CHUNK_KEYS = 1 << 18
DEFAULT_PIECE = 16


def cluster_scores(q_centroids: torch.Tensor, k_centroids: torch.Tensor, k_counts: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """(..., Cq, Ck) block scores ``c_q . c_k * scale + log|C_k|`` (``-inf`` for an empty key cluster)."""
    log_mass = k_counts.to(q_centroids.dtype).log()
    return (q_centroids @ k_centroids.transpose(-1, -2)) * scale + log_mass[..., None, :]


def top_p_selection(scores: torch.Tensor, top_p: float, min_kc_ratio: float = 0.0) -> torch.Tensor:
    """(..., Cq, Ck) bool: the key clusters each query cluster keeps.

    Key clusters are taken in descending score order (ties: lower index first) while the softmax mass taken before
    them is below ``top_p``, so the cluster that crosses ``top_p`` is kept; at least ``ceil(min_kc_ratio * Ck)``
    (and at least one) are kept. ``top_p >= 1`` keeps every cluster. A smaller ``top_p`` keeps a subset.
    """
    clusters = scores.shape[-1]
    if top_p >= 1.0:
        return torch.ones_like(scores, dtype=torch.bool)
    ranked, order = torch.sort(scores.float(), dim=-1, descending=True, stable=True)
    mass = torch.softmax(ranked, dim=-1)
    before = torch.cumsum(mass, -1) - mass
    keep = before < top_p
    minimum = min(clusters, max(1, math.ceil(min_kc_ratio * clusters - 1e-9)))
    keep[..., :minimum] = True
    return torch.zeros_like(keep).scatter_(-1, order, keep)


@dataclass(frozen=True)
class ClusterPlan:
    """One clustering of a call's image tokens: labels (B, H, N), centroids (B, H, C, D) and the selection
    (B, H, Cq, Ck) of key clusters per query cluster."""

    q_labels: torch.Tensor
    k_labels: torch.Tensor
    q_centroids: torch.Tensor
    k_centroids: torch.Tensor
    selection: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.q_labels, self.k_labels, self.q_centroids, self.k_centroids, self.selection

    def key_density(self) -> float:
        """Mean fraction of the image keys a query attends to."""
        return cluster_density(self.q_labels, self.k_labels, self.selection)


def cluster_density(q_labels: torch.Tensor, k_labels: torch.Tensor, selection: torch.Tensor) -> float:
    """Mean over queries of the fraction of the N image keys in its cluster's selected key clusters."""
    q_counts = cluster_counts(q_labels, selection.shape[-2])
    k_counts = cluster_counts(k_labels, selection.shape[-1])
    kept = (selection.long() * k_counts[..., None, :]).sum(-1)
    length = q_labels.shape[-1]
    return float((q_counts * kept).sum()) / float(q_labels[..., 0].numel() * length * length)


def plan_clusters(query: torch.Tensor, key: torch.Tensor, *, num_q_clusters: int, num_k_clusters: int, top_p: float,
                  min_kc_ratio: float, iters: int, scale: float | None = None,
                  q_centroids: torch.Tensor | None = None, k_centroids: torch.Tensor | None = None) -> ClusterPlan:
    """Cluster the image queries and keys (B, H, N, D) of every head (``iters`` k-means iterations from the given
    (B, H, C, D) centroids, evenly spaced tokens when ``None``) and select key clusters by top-p."""
    batch, heads, length, dim = query.shape
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    found = []
    for x, clusters, start in ((query, num_q_clusters, q_centroids), (key, num_k_clusters, k_centroids)):
        flat = x.reshape(batch * heads, length, dim)
        start = initial_centroids(flat, clusters) if start is None else start.reshape(batch * heads, clusters, dim)
        found.append(batched_kmeans(flat, start, iters))
    (q_labels, q_cent, _), (k_labels, k_cent, k_counts) = found
    selection = top_p_selection(cluster_scores(q_cent, k_cent, k_counts, scale), top_p, min_kc_ratio)
    shape = (batch, heads)
    return ClusterPlan(q_labels.view(*shape, length), k_labels.view(*shape, length),
                       q_cent.view(*shape, num_q_clusters, dim), k_cent.view(*shape, num_k_clusters, dim),
                       selection.view(*shape, num_q_clusters, num_k_clusters))


def cluster_mask(q_labels: torch.Tensor, k_labels: torch.Tensor, selection: torch.Tensor) -> torch.Tensor:
    """(B, H, N, N) bool: query i may attend to key j (the masked-dense reference of a selection; O(N^2))."""
    rows = selection.gather(-2, q_labels[..., None].expand(*q_labels.shape, selection.shape[-1]))
    return rows.gather(-1, k_labels[..., None, :].expand(*rows.shape[:-1], k_labels.shape[-1]))


def _chunks(parts: list[int], kept: list[int], text: int, length: int, piece: int):
    """``(first, last)`` runs of the sorted query clusters: equal piece counts, at most ``_CHUNK_KEYS`` gathered
    key rows (and key-mask entries), and a widest kept count at most a quarter (plus a piece) above the first."""
    first = 0
    for index in range(1, len(parts) + 1):
        if index == len(parts) or parts[index] != parts[first] or kept[index] > kept[first] * 1.25 + piece or \
                (index - first + 1) * max(kept[index] + text, length) > _CHUNK_KEYS:
            yield first, index
            first = index


def cluster_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, q_labels: torch.Tensor,
                      k_labels: torch.Tensor, selection: torch.Tensor, *, text_key: torch.Tensor | None = None,
                      text_value: torch.Tensor | None = None, scale: float | None = None,
                      piece: int = DEFAULT_PIECE) -> torch.Tensor:
    """Image queries (B, H, N, D) against the image keys of their cluster's selected key clusters plus every text
    key (B, H, L, D), in natural token order; ``selection`` (B, H, Cq, Ck) bool, labels (B, H, N)."""
    batch, heads, length, dim = query.shape
    dim_v = value.shape[-1]
    groups = batch * heads
    num_q, num_k = selection.shape[-2:]
    q_labels, k_labels = q_labels.reshape(groups, length), k_labels.reshape(groups, length)
    selection = selection.reshape(groups, num_q, num_k)
    q_flat, k_flat, v_flat = query.reshape(-1, dim), key.reshape(-1, dim), value.reshape(-1, dim_v)
    text = 0 if text_key is None else text_key.shape[2]
    if text:
        text_key, text_value = text_key.reshape(groups, text, dim), text_value.reshape(groups, text, dim_v)
    device = query.device

    q_order = torch.argsort(q_labels, dim=1, stable=True)
    k_order = torch.argsort(k_labels, dim=1, stable=True)
    q_counts, k_counts = cluster_counts(q_labels, num_q), cluster_counts(k_labels, num_k)
    q_start = torch.cumsum(q_counts, 1) - q_counts
    # Keys and values sorted by cluster once per call: a key cluster is then one contiguous run of ``k_sorted``.
    k_flat_order = (k_order + (torch.arange(groups, device=device) * length)[:, None]).reshape(-1)
    k_sorted, v_sorted = k_flat.index_select(0, k_flat_order), v_flat.index_select(0, k_flat_order)
    k_run = (torch.cumsum(k_counts, 1) - k_counts).reshape(-1)  # start of every (group, cluster) run, flat
    k_run = k_run + (torch.arange(groups, device=device) * length).repeat_interleave(num_k)
    kept = (selection.long() * k_counts[:, None, :]).sum(-1)  # (G, Cq) keys per query cluster

    # One batch row per query cluster, its queries padded to whole pieces (repeats of its last query, not written
    # back). Clusters are ordered by (pieces, kept keys) and cut into chunks of equal pieces and similar kept
    # counts, so each chunk pads its keys little; each cluster's keys are gathered once.
    parts = (-(-q_counts // piece)).reshape(-1)
    owners = torch.nonzero(parts > 0).flatten()
    sort_key = parts[owners] * (length + 1) + kept.reshape(-1)[owners]
    owners = owners[torch.argsort(sort_key, stable=True)]
    out = query.new_empty(groups * length, dim_v)
    for first, last in _chunks(parts[owners].tolist(), kept.reshape(-1)[owners].tolist(), text, length, piece):
        own = owners[first:last]
        group, cluster = own // num_q, own % num_q
        n_kept = kept[group, cluster]
        width = int(n_kept.max())
        # The runs of the selected key clusters, back to back; padding: position 0, masked.
        rows, chosen = torch.nonzero(selection[group, cluster], as_tuple=True)
        runs = group[rows] * num_k + chosen
        size = k_counts.reshape(-1)[runs]
        before = torch.cumsum(size, 0) - size
        total = int(size.sum())
        flat = torch.repeat_interleave(k_run[runs] - before, size, output_size=total)
        flat += torch.arange(total, device=device)
        row_start = torch.cumsum(n_kept, 0) - n_kept
        position = torch.arange(width, device=device)
        k_tokens = flat[(row_start[:, None] + position).clamp(max=max(total - 1, 0))] if total else \
            torch.zeros(own.numel(), width, dtype=torch.long, device=device)
        k_tokens = k_tokens.masked_fill_(position[None, :] >= n_kept[:, None], 0)
        rows_per = int(parts[own[0]]) * piece
        count = q_counts[group, cluster]
        offset = torch.arange(rows_per, device=device)
        valid = offset[None, :] < count[:, None]
        rows = q_start[group, cluster][:, None] + torch.minimum(offset[None, :], count[:, None] - 1)
        q_tokens = q_order[group[:, None], rows] + (group * length)[:, None]
        n = own.numel()
        q = q_flat.index_select(0, q_tokens.reshape(-1)).view(n, rows_per, dim)
        k = k_sorted.index_select(0, k_tokens.reshape(-1)).view(n, width, dim)
        v = v_sorted.index_select(0, k_tokens.reshape(-1)).view(n, width, dim_v)
        if text:
            k, v = torch.cat([k, text_key[group]], 1), torch.cat([v, text_value[group]], 1)
        mask = None
        if bool((n_kept < width).any()):
            index = torch.arange(width + text, device=device)
            mask = ((index[None, :] < n_kept[:, None]) | (index >= width)[None, :])[None, :, None, :]
        part_out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=scale)[0]
        out.index_copy_(0, q_tokens[valid], part_out[valid])
    return out.view(batch, heads, length, dim_v)


# ------------------------------------------------------------------------------------------------ the plugin
