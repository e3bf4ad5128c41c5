"""SVG2: semantic-aware permutation with top-p cluster selection (Sparse VideoGen2, Yang et al., arXiv 2505.18875).

Per (batch, head), the image queries and the image keys are clustered separately by k-means (``kmeans.py``), so
that tokens that look alike, wherever they sit in the grid, share a cluster. Each query cluster then attends to a
set of whole key clusters chosen from centroid scores: ``c_q . c_k * scale + log|C_k|`` (the log of the cluster
size makes a centroid stand for the softmax mass of all its tokens), key clusters taken in descending order until
their softmax mass reaches ``top_p`` (the crossing cluster kept), and at least ``min_kc_ratio`` of them. Within the
selection attention is exact, every text key is attended exactly, and the output comes back in natural order.
Cluster counts follow the token count with a floor (``min_*_clusters``) so small grids still select finely; a call
too small to meet the key floor runs dense through the counted, warned fallback.

The math is in :mod:`dit_accel.attention.svg2_clusters`. The CPU path gathers, once per query cluster, the keys of its selected clusters, and runs one batched SDPA per
chunk of query clusters (queries padded to whole ``piece``-row pieces, keys padded to the chunk's largest count and
masked; chunks group clusters of equal piece counts and similar key counts so padding stays small): work
proportional to the kept keys, never an N x N mask. On CUDA the same selection runs through the LUT
block-sparse kernel (``kernels/cluster_lut.py``). Centroids are warm-started from the previous clustering of the
same layer, call and CFG branch, so after the first sparse step a couple of iterations suffice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dit_accel.attention.base import ImageAttentionConfig, ImageAttentionPlugin, dense_image_attention
from dit_accel.attention.svg2_clusters import ClusterPlan, cluster_attention, plan_clusters
from dit_accel.core.plugin import register_plugin
from dit_accel.core.rows import put_rows, take_rows
from dit_accel.recipe import check_range, register_config


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
