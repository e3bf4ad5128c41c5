"""SVG2: semantic-aware permutation with top-p cluster selection (Sparse VideoGen2, Yang et al., arXiv 2505.18875).

Per (batch, head), the image queries and the image keys are clustered separately by k-means (``kmeans.py``), so
that tokens that look alike, wherever they sit in the grid, share a cluster. Each query cluster then attends to a
set of whole key clusters chosen from centroid scores: ``c_q . c_k * scale + log|C_k|`` (the log of the cluster
size makes a centroid stand for the softmax mass of all its tokens), key clusters taken in descending order until
their softmax mass reaches ``top_p`` (the crossing cluster kept), and at least ``min_kc_ratio`` of them. Within the
selection attention is exact, every text key is attended exactly, and the output comes back in natural order.
Cluster counts follow the token count with a floor (``min_*_clusters``) so small grids still select finely; a call
too small to meet the key floor runs dense through the counted, warned fallback.

The CPU path gathers, once per query cluster, the keys of its selected clusters, and runs one batched SDPA per
chunk of query clusters (queries padded to whole ``piece``-row pieces, keys padded to the chunk's largest count and
masked; chunks group clusters of equal piece counts and similar key counts so padding stays small): work
proportional to the kept keys, never an N x N mask. On CUDA the same selection runs through the LUT
block-sparse kernel (``kernels/cluster_lut.py``). Centroids are warm-started from the previous clustering of the
same layer, call and CFG branch, so after the first sparse step a couple of iterations suffice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dit_accel.attention.base import ImageAttentionConfig, ImageAttentionPlugin, dense_image_attention
from dit_accel.attention.kmeans import batched_kmeans, cluster_counts, initial_centroids
from dit_accel.core.plugin import register_plugin
from dit_accel.core.rows import put_rows, take_rows
from dit_accel.recipe import check_range, register_config

# Gathered key rows (and key-mask entries) per chunk of query clusters: bounds the (clusters, keys, D) copies.
_CHUNK_KEYS = 1 << 18
DEFAULT_PIECE = 16


# ------------------------------------------------------------------------------------------------- the math
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
@register_config("svg2")
@dataclass(frozen=True)
class SVG2Config(ImageAttentionConfig):
    """Sparse VideoGen2: k-means clusters of queries and keys, top-p key clusters per query cluster.

    Args:
        num_q_clusters (`int`, defaults to `0`): query clusters per head; 0 sizes them by ``q_cluster_tokens`` so
            one setting fits every resolution. Allowed: 0-65536 (capped at the number of image tokens).
        num_k_clusters (`int`, defaults to `0`): key clusters per head; 0 sizes them by ``k_cluster_tokens``.
            Allowed: 0-65536. A count of 1 (set, or at a 1-token call) selects nothing: such calls run dense,
            counted in the plugin's fallbacks.
        q_cluster_tokens (`int`, defaults to `128`) / k_cluster_tokens (`int`, defaults to `32`): mean tokens per
            cluster when the counts are 0. Smaller key clusters select more finely and cost more k-means work.
            Allowed: 1-65536.
        min_q_clusters (`int`, defaults to `16`) / min_k_clusters (`int`, defaults to `32`): floors of the
            automatic counts (``num_*_clusters=0``), each capped at half the image tokens (clusters of >= 2 tokens
            on average); from 2048 / 1024 image tokens up (at the default ``*_cluster_tokens``) they do not bind
            and the counts are ``ceil(tokens / *_cluster_tokens)``. Small grids otherwise get one or two clusters
            and top-p drops whole halves of the keys. A call with fewer than ``2 * min_k_clusters`` image tokens
            (64 by default, an 8x8 grid) cannot meet the key floor and runs dense, counted in the plugin's
            fallbacks and warned once; lower ``min_k_clusters`` (or set ``num_k_clusters``) to cluster it anyway.
            ``1`` turns a floor off. Allowed: 1-65536.
        top_p (`float`, defaults to `0.9`): softmax mass of the key clusters each query cluster keeps; 1 keeps
            every key (dense attention, no clustering). Recommended 0.8-0.95. Allowed: 0-1.
        min_kc_ratio (`float`, defaults to `0.1`): fraction of the key clusters always kept; 1 keeps them all
            (exact, through the sparse path). Allowed: 0-1.
        kmeans_iters_init (`int`, defaults to `20`): k-means iterations of a layer's first sparse step (centroids
            seeded with evenly spaced tokens). Allowed: 1-200.
        kmeans_iters_step (`int`, defaults to `2`): iterations of later reclusterings, warm-started from the
            layer's previous centroids (same call and CFG branch). Allowed: 1-100.
        recluster_interval (`int`, defaults to `1`): recluster every this many steps; the steps between reuse the
            last clusters and selection (no k-means work). Allowed: 1-100.
        cpu_dense_above (`float`, defaults to `0.45`): the CPU path runs dense attention (exact) on a call whose
            selection keeps more than this fraction of the image keys: there its gathers and per-cluster calls cost
            more than dense SDPA (on a 2-core x86-64 CPU, ``attention-cpu.md`` part (a): 0.64-0.74x dense at 80 %
            of the keys, 1.14-1.25x at 42 %; 0.45 errs on the dense side); counted in the plugin's fallbacks. The CUDA kernel is not affected. 1 never
            falls back. Allowed: 0-1.
        cpu_dense_hold (`int`, defaults to `4`): after such a fallback the layer (same call and CFG branch) stays
            dense for this many steps without clustering, since at small grids the k-means costs as much as the
            attention it would save; then it clusters again (warm-started) and looks at the selection anew. 1
            clusters on every step. Not tuned. Allowed: 1-100.
        start / end: fractions of the schedule to act on; ``start=0.2`` keeps the layout-forming first steps dense.
    """

    num_q_clusters: int = 0
    num_k_clusters: int = 0
    q_cluster_tokens: int = 128
    k_cluster_tokens: int = 32
    # Chosen on zoo:dit and zoo:mmdit at their 8x8 = 64-token grids, calibration seeds 100-103, 20 steps, recipe
    # svg2 (benchmarks/results/svg2-floor-cpu.md; dit / mmdit PSNR against dense attention): no floor 15.6 / 15.9 dB;
    # 8/16 20.8 / 22.9; 16/16 22.5 / 22.9; 16/32 23.7 / 24.1; 32/32 26.5 / 26.6. 16/32 rather than 32/32: 2-token
    # query clusters each fill a whole padded query piece (CPU) or block (kernel), and a query floor of 32 would bind
    # up to 4096 tokens. Checked on the evaluation-only zoo:flowdit (256 tokens, pipeline and custom loop alike):
    # svg2 22.9 against 19.0 dB without floors, svg2-fast 19.2 / 18.2, svg2-max 16.3 / 16.7 (the one loss).
    min_q_clusters: int = 16
    min_k_clusters: int = 32
    top_p: float = 0.9
    min_kc_ratio: float = 0.1
    kmeans_iters_init: int = 20
    kmeans_iters_step: int = 2
    recluster_interval: int = 1
    cpu_dense_above: float = 0.45
    cpu_dense_hold: int = 4

    def validate(self) -> None:
        super().validate()
        check_range(self, "num_q_clusters", 0, 65536, integer=True)
        check_range(self, "num_k_clusters", 0, 65536, integer=True)
        check_range(self, "q_cluster_tokens", 1, 65536, integer=True)
        check_range(self, "k_cluster_tokens", 1, 65536, integer=True)
        check_range(self, "min_q_clusters", 1, 65536, integer=True)
        check_range(self, "min_k_clusters", 1, 65536, integer=True)
        check_range(self, "top_p", 0.0, 1.0)
        check_range(self, "min_kc_ratio", 0.0, 1.0)
        check_range(self, "kmeans_iters_init", 1, 200, integer=True)
        check_range(self, "kmeans_iters_step", 1, 100, integer=True)
        check_range(self, "recluster_interval", 1, 100, integer=True)
        check_range(self, "cpu_dense_above", 0.0, 1.0)
        check_range(self, "cpu_dense_hold", 1, 100, integer=True)

    def cluster_numbers(self, num_tokens: int) -> tuple[int, int]:
        """(query clusters, key clusters) at ``num_tokens`` image tokens: a set count capped at the tokens, else
        ``ceil(num_tokens / *_cluster_tokens)`` raised to ``min_*_clusters`` capped at ``num_tokens // 2``."""
        def size(fixed: int, tokens: int, floor: int) -> int:
            # The floor only ever raises the token-sized count, so wherever it does not bind the count is unchanged.
            count = fixed or max(-(-num_tokens // tokens), min(floor, num_tokens // 2))
            return max(1, min(num_tokens, count))
        return (size(self.num_q_clusters, self.q_cluster_tokens, self.min_q_clusters),
                size(self.num_k_clusters, self.k_cluster_tokens, self.min_k_clusters))

    def min_tokens(self) -> int:
        """The fewest image tokens a call needs for svg2 to cluster it (see :meth:`dense_reason`)."""
        if self.num_k_clusters:
            return 2 if self.num_k_clusters > 1 else 0  # 0: never, one key cluster keeps every key
        if self.min_k_clusters > 1:
            return 2 * self.min_k_clusters
        return self.k_cluster_tokens + 1  # no floor: two token-sized key clusters

    def dense_reason(self, num_tokens: int) -> str | None:
        """Why a call of ``num_tokens`` image tokens is too small to select from sparsely (it then runs dense),
        ``None`` when it is not: the key floor cannot be met with clusters of >= 2 tokens, or one key cluster
        would hold every key (top-p could only keep it)."""
        needed = self.min_tokens()
        if needed == 0:
            return ("num_k_clusters=1 puts every key in one cluster, which every query keeps; set 0 (automatic) or "
                    "at least 2")
        if num_tokens >= needed:
            return None
        side = math.isqrt(needed - 1) + 1
        if not self.num_k_clusters and self.min_k_clusters > 1:
            why = (f"min_k_clusters={self.min_k_clusters} key clusters of >= 2 tokens each; lower min_k_clusters "
                   "or set num_k_clusters to cluster smaller grids anyway")
        else:
            why = "two key clusters (one would hold every key)"
        return f"svg2 needs at least {needed} image tokens (e.g. a token grid of {side}x{side}) for {why}"


def _grid_text(grid) -> str:
    sides = (grid.height, grid.width) if grid.frames == 1 else (grid.frames, grid.height, grid.width)
    return "x".join(map(str, sides))


@register_plugin(SVG2Config)
class SVG2Plugin(ImageAttentionPlugin):
    def install(self) -> None:
        super().install()
        self.states: dict[tuple, tuple[int, ClusterPlan]] = {}
        self.dense_until: dict[tuple, int] = {}  # CPU fallbacks held: state key -> first step that clusters again

    def reset(self) -> None:
        super().reset()
        self.states.clear()
        self.dense_until.clear()

    def cache_bytes(self) -> int:
        return super().cache_bytes() + sum(t.numel() * t.element_size() for _, plan in self.states.values()
                                           for t in plan.tensors())

    def idle_reason(self, steps: int) -> str | None:
        reason = super().idle_reason(steps)
        if reason is None or not reason.startswith("every query kept every key"):
            return reason  # a window, fallback or rettention reason
        config = self.config
        if config.top_p >= 1.0:
            return "top_p=1 keeps every key (dense attention); a top_p below 1 (0.8-0.95) lets it select clusters"
        return (f"every query cluster kept every key cluster (top_p={config.top_p}, min_kc_ratio="
                f"{config.min_kc_ratio}); it saves work with a smaller top_p or min_kc_ratio, or with more key "
                "clusters at larger resolutions")

    def image_attention(self, query, key, value, text_key, text_value, grid, layer, call):
        config = self.config
        if config.top_p >= 1.0:  # every key kept, as asked: no clustering (idle_reason says so)
            return dense_image_attention(query, key, value, text_key, text_value, call), 1.0
        reason = config.dense_reason(query.shape[2])
        if reason is not None:  # too few tokens to select from: dense, but never in silence
            self._fallback(f"{reason}; this call has {query.shape[2]} ({_grid_text(grid)})", call)
            return dense_image_attention(query, key, value, text_key, text_value, call), 1.0
        context = call.context
        held = None if context is None else (layer.name, call.index, context.slot)
        if not query.is_cuda and held is not None and context.step < self.dense_until.get(held, -1):
            self._fallback(self._dense_reason(), call)
            return dense_image_attention(query, key, value, text_key, text_value, call), 1.0
        plan = self._plan(query, key, layer, call)
        scale = call.options.get("scale")
        if query.is_cuda:
            from dit_accel.kernels.cluster_lut import cluster_block_attention, cluster_kernel_usable

            if cluster_kernel_usable(query, key, value, text_key, text_value):
                out = cluster_block_attention(query, key, value, plan.q_labels, plan.k_labels, plan.selection,
                                              text_key=text_key, text_value=text_value, scale=scale)
                return out, plan.key_density()
        density = plan.key_density()
        if density > config.cpu_dense_above:
            self._fallback(self._dense_reason(), call)
            if held is not None:
                self.dense_until[held] = context.step + config.cpu_dense_hold
            return dense_image_attention(query, key, value, text_key, text_value, call), 1.0
        out = cluster_attention(query, key, value, plan.q_labels, plan.k_labels, plan.selection, text_key=text_key,
                                text_value=text_value, scale=scale)
        return out, density

    def _dense_reason(self) -> str:
        return (f"the selection keeps more than cpu_dense_above={self.config.cpu_dense_above} of the keys, where "
                f"dense attention is faster on the CPU (held {self.config.cpu_dense_hold} steps)")

    def _plan(self, query, key, layer, call) -> ClusterPlan:
        """This call's clusters: reused within the recluster interval, else k-means warm-started from the last
        ones of the same layer, call and branch (a call holding some rows of its slot reads and writes those)."""
        config = self.config
        context = call.context
        batch, heads, length, dim = query.shape
        num_q, num_k = config.cluster_numbers(length)
        state_key = None if context is None else (layer.name, call.index, context.slot)
        stored = None if state_key is None else self.states.get(state_key)
        last = None
        if stored is not None:
            last = ClusterPlan(*(take_rows(t, context) for t in stored[1].tensors()))
            if (last.q_centroids.shape != (batch, heads, num_q, dim) or last.k_centroids.shape[2] != num_k
                    or last.q_labels.shape[2] != length):
                stored = last = None  # another resolution, batch or setting: start over
            elif 0 <= context.step - stored[0] < config.recluster_interval:
                return last
        plan = plan_clusters(
            query, key, num_q_clusters=num_q, num_k_clusters=num_k, top_p=config.top_p,
            min_kc_ratio=config.min_kc_ratio, scale=call.options.get("scale"),
            iters=config.kmeans_iters_init if last is None else config.kmeans_iters_step,
            q_centroids=None if last is None else last.q_centroids,
            k_centroids=None if last is None else last.k_centroids)
        if state_key is not None:
            if context.rows is None:
                self.states[state_key] = (context.step, plan)
            elif stored is not None:
                merged = (put_rows(old, context, new) for old, new in zip(stored[1].tensors(), plan.tensors()))
                self.states[state_key] = (context.step, ClusterPlan(*merged))
            self.target.stats.set_cache_bytes(self.cache_bytes())
        return plan
