"""ClusCa: cluster-driven feature caching (Zheng et al., arXiv 2509.10312).

TaylorSeer's schedule (full steps every ``interval`` steps, forecasts in between), with one token per cluster kept
fresh. On every full step the image tokens of one deep MLP sub-layer's output (the last one by default) are
clustered per sample row by k-means under the L1 distance, warm-started from the previous full step's centroids;
the same clusters serve every layer until the next full step. On the steps in between:

- attention sub-layers, text-stream MLPs and merged single-stream blocks (FLUX/HunyuanVideo) are forecast;
- every image (or joint) MLP computes only one representative token per cluster (the member closest to its
  centroid) from this step's input, writes it into the forecast's 0th factor ``C0`` and pulls the rest of the
  cluster toward it: ``C0[i] <- gamma * m_c + (1 - gamma) * C0[i]``, ``C0[rep] <- m_c``; the output is the
  Taylor forecast with that ``C0`` (``C0`` persists until the next full step, so the pulls accumulate).

``reanchor=True`` (default) stores a fresh value as ``m_c - e_rep`` (``e`` the forecast's change since the full
step) so the forecast at this step reproduces ``m_c`` at the representative exactly; the reference code stores
``m_c`` itself and then adds the change on top, counting the elapsed change twice at refreshed tokens (``False``
restores that). At ``order=0`` the two agree. Clusters need no token grid: they are over the MLP input's own
tokens (the image part of a joint sequence), so every family with an image or joint MLP sub-layer is served.

Under sequence parallelism (``ulysses``/``ring``/``patch``) each rank clusters the image tokens of its own shard
into ``clusters`` clusters and refreshes their representatives: an MLP acts on each token alone, so a rank needs
nothing from the others, and its work per cheap step stays ``clusters`` tokens. The cheap steps are the fixed
schedule's, the same on every rank; the clusters (and so the output) differ from one process's clusters of the
whole grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dit_accel.caching.forecasters import taylor_forecast, update_differences
from dit_accel.caching.sublayer import IntervalSubLayerPlugin, _merged_key, flatten_output
from dit_accel.core.context import CallContext
from dit_accel.core.parallel import parallel_setting, shard_positions
from dit_accel.core.plugin import register_plugin
from dit_accel.recipe import PluginConfig, check_bool, check_choice, check_range, register_config


# ------------------------------------------------------------------------------------------------ pure functions
def spaced_indices(length: int, k: int, device: torch.device | None = None) -> torch.Tensor:
    """``k`` token indices spread evenly over ``length`` tokens (the deterministic k-means initialisation)."""
    return torch.arange(k, device=device) * length // k


def cluster_means(x: torch.Tensor, labels: torch.Tensor, k: int, fallback: torch.Tensor) -> torch.Tensor:
    """Per row, the mean of the tokens ``x`` (B, N, D) in each of ``k`` clusters; an empty cluster keeps its
    ``fallback`` (B, k, D) centroid."""
    batch, _, dim = x.shape
    sums = x.new_zeros(batch, k, dim).scatter_add_(1, labels[..., None].expand(-1, -1, dim), x)
    counts = x.new_zeros(batch, k).scatter_add_(1, labels, torch.ones_like(labels, dtype=x.dtype))
    return torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], fallback)


def reseed_empty(x: torch.Tensor, labels: torch.Tensor, spread: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Move the centroids of empty clusters onto the tokens farthest from their own centroid (``spread``, (B, N)):
    the j-th empty cluster of a row takes its j-th farthest token. Keeps every cluster's representative distinct,
    which is what each cheap step pays for (warm starts empty clusters easily)."""
    batch, k, dim = centroids.shape
    counts = torch.zeros(batch, k, device=x.device).scatter_add_(1, labels, torch.ones_like(spread))
    empty = counts == 0
    farthest = spread.topk(k, dim=1).indices  # (B, k); k <= N
    rank = (empty.cumsum(1) - 1).clamp_min(0)
    seeds = x.gather(1, farthest.gather(1, rank)[..., None].expand(-1, -1, dim))
    return torch.where(empty[..., None], seeds, centroids)


def kmeans(x: torch.Tensor, k: int, init: torch.Tensor | None = None, iterations: int = 10,
           rtol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 k-means of each row of ``x`` (B, N, D) separately: ``(labels (B, N), centroids (B, k, D))``, float32.

    Starts from ``init`` (the previous full step's centroids) when it has the shape ``(B, k, D)``, else from evenly
    spaced tokens (:func:`spaced_indices`: reproducible, unlike the reference's random tokens). Assigns by
    ``argmin cdist(p=1)`` (ties to the lowest cluster), moves centroids to cluster means (empty clusters:
    :func:`reseed_empty`), stops after ``iterations`` or once the centroids move less than ``rtol``. The returned
    labels are those of the returned centroids.
    """
    x = x.float()
    batch, length, dim = x.shape
    k = max(1, min(k, length))
    if init is not None and tuple(init.shape) == (batch, k, dim):
        centroids = init.float()
    else:
        centroids = x[:, spaced_indices(length, k, x.device)]
    for _ in range(iterations):
        distance = torch.cdist(x, centroids, p=1)
        labels = distance.argmin(-1)
        moved = reseed_empty(x, labels, distance.gather(-1, labels[..., None])[..., 0],
                             cluster_means(x, labels, k, centroids))
        done = torch.allclose(moved, centroids, rtol=rtol)  # one host sync per iteration, on full steps only
        centroids = moved
        if done:
            break
    return torch.cdist(x, centroids, p=1).argmin(-1), centroids


def representatives(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Per row and cluster, the index of the member token closest (L1) to the centroid, lowest index on ties:
    (B, k). An empty cluster takes the token nearest its centroid overall (any token's fresh value is exact)."""
    distance = torch.cdist(x.float(), centroids.float(), p=1)  # (B, N, k)
    member = labels[..., None] == torch.arange(centroids.shape[1], device=labels.device)
    chosen = distance.masked_fill(~member, float("inf")).argmin(1)
    return torch.where(member.any(1), chosen, distance.argmin(1))


def propagate(c0: torch.Tensor, labels: torch.Tensor, reps: torch.Tensor, fresh: torch.Tensor,
              gamma: float) -> torch.Tensor:
    """A new ``C0`` (B, N, D): every token ``i`` of cluster ``c`` becomes ``gamma * fresh[c] + (1 - gamma) *
    c0[i]``, then each representative ``reps[:, c]`` becomes ``fresh[c]`` (``fresh`` is (B, k, D))."""
    dim = c0.shape[-1]
    fresh = fresh.to(c0.dtype)
    if gamma > 0:
        pulled = fresh.gather(1, labels[..., None].expand(-1, -1, dim))
        out = gamma * pulled + (1.0 - gamma) * c0
    else:
        out = c0.clone()
    return out.scatter_(1, reps[..., None].expand(-1, -1, dim), fresh)


# ------------------------------------------------------------------------------------------------------- config
@register_config("clusca")
@dataclass(frozen=True)
class ClusCaConfig(PluginConfig):
    """ClusCa: Taylor forecasts between full steps, with one fresh token per k-means cluster in every image MLP.

    Args:
        clusters (`int`, defaults to `16`): clusters K per sample row; each MLP computes K tokens on cheap steps (at
            4096 FLUX tokens, 0.4 % of its work). The paper uses 16 (FLUX, DiT) and 32 (HunyuanVideo). Capped at
            the token count. Allowed: 1-4096.
        gamma (`float`, defaults to `0.005`): propagation ratio: how far each cheap step pulls a cluster's cached
            tokens toward its representative's fresh value. The paper uses 0.005 on FLUX and 0.0 on DiT; 0.005 is
            the default because it is the paper's main (FLUX) setting and too small to hurt where 0 is best (4
            cheap steps move a token 2 % of the way). 0 refreshes only the representatives. Allowed: 0-1.
        interval (`int`, defaults to `4`): a full step every ``interval`` steps (the paper's DiT setting; FLUX used
            5). On the zoo models' calibration seeds (2 samples, 50 steps) 5 lost 5.0 / 2.7 dB PSNR (zoo:dit /
            zoo:mmdit) against 4 and saved only 3.3 / 3.7 points of dense FLOPs. Allowed: 1-50.
        first_steps (`int`, defaults to `3`): warm-up steps that always compute. Allowed: 0-1000.
        last_steps (`int`, defaults to `1`): final steps that always compute. Allowed: 0-1000.
        order (`int`, defaults to `1`): Taylor order of the forecasts (see ``taylorseer``); 1 is the paper's FLUX
            and video setting. Allowed: 0-4.
        cluster_layer (`int`, defaults to `-1`): which image/joint MLP sub-layer's output (in execution order,
            negative from the end) is clustered; the paper clusters a deep layer. Allowed: -1000-999.
        iterations (`int`, defaults to `10`): k-means iterations per full step at most. Allowed: 1-100.
        reanchor (`bool`, defaults to `True`): store fresh values relative to the forecast's change so that
            refreshed tokens come out exact (see the module docstring); ``False`` is the reference code.
        distance (`str`, defaults to `"timestep"`): forecast positions in timesteps or ``"step"`` indices.

    Memory: TaylorSeer's float32 factors (``order + 1`` per sub-layer output) plus, per CFG slot, labels (B, N) and
    centroids (B, K, D); the k-means (about ``iterations * N * K * D`` operations per full step) is not counted in
    the FLOPs stats.
    """

    kind = "schedule"
    clusters: int = 16
    gamma: float = 0.005
    interval: int = 4
    first_steps: int = 3
    last_steps: int = 1
    order: int = 1
    cluster_layer: int = -1
    iterations: int = 10
    reanchor: bool = True
    distance: str = "timestep"

    def validate(self) -> None:
        check_range(self, "clusters", 1, 4096, integer=True)
        check_range(self, "gamma", 0.0, 1.0)
        check_range(self, "interval", 1, 50, integer=True)
        check_range(self, "first_steps", 0, 1000, integer=True)
        check_range(self, "last_steps", 0, 1000, integer=True)
        check_range(self, "order", 0, 4, integer=True)
        check_range(self, "cluster_layer", -1000, 999, integer=True)
        check_range(self, "iterations", 1, 100, integer=True)
        check_bool(self, "reanchor")
        check_choice(self, "distance", ("timestep", "step"))


def _module_input(args: tuple, kwargs: dict | None) -> torch.Tensor | None:
    value = (kwargs or {}).get("hidden_states", args[0] if args else None)
    return value if isinstance(value, torch.Tensor) and value.ndim == 3 else None


# ------------------------------------------------------------------------------------------------------- plugin
@register_plugin(ClusCaConfig)
class ClusCaPlugin(IntervalSubLayerPlugin):
    supports_partial_rows = False  # per-slot clusters of whole batches (cfg-cache refuses batched families)
    # Forecast sub-layers never read their inputs, so blocks whose every sub-layer is forecast (FLUX/HunyuanVideo
    # single-stream blocks, served at proj_out) are skipped whole; a clustered MLP's serve() says None, so its block
    # runs and the MLP goes through partial().
    serves_blocks = True

    def install(self) -> None:
        super().install()
        self.clustered: dict[str, str] = {}  # name -> stream, in execution order
        merged = set()
        for list_attr, index, block, contract in self.target.spec.blocks(self.target.transformer):
            prefix = f"{list_attr}.{index}"
            if _merged_key(block, contract, prefix, self.config.layers, self) is not None:
                merged.add(prefix)
            for sublayer in contract.sublayers:
                name = f"{prefix}.{sublayer.name}"
                if (name in self.sublayers and sublayer.role == "mlp" and sublayer.stream in ("image", "joint")
                        and prefix not in merged):
                    self.clustered[name] = sublayer.stream
        if not self.clustered:
            self.remove()
            raise ValueError(
                f"clusca needs an image or joint MLP sub-layer with per-token hooks, and the "
                f"{self.target.spec.family!r} transformer ({self.target.spec.transformer_class}) has none"
                + (f" among layers={list(self.config.layers)}" if self.config.layers else "")
                + "; use taylorseer there, or widen `layers`")
        order = list(self.clustered)
        if not -len(order) <= self.config.cluster_layer < len(order):
            self.remove()
            raise ValueError(f"ClusCaConfig.cluster_layer = {self.config.cluster_layer} is outside the "
                             f"{len(order)} clustered MLP sub-layers of this {self.target.spec.family!r} model; "
                             f"allowed: {-len(order)}..{len(order) - 1}")
        self.source = order[self.config.cluster_layer]
        self.clusters: dict[int, dict[str, torch.Tensor]] = {}  # per slot: labels, centroids, reps
        self._served: dict = {}  # forecasts of the block being run (see serve)

    def _position(self, context: CallContext) -> float:
        return float(context.step) if self.config.distance == "step" else context.timestep

    def _image_span(self, context: CallContext, name: str, length: int) -> tuple[int, int]:
        """Where the image tokens sit in this MLP's input: all of it, or the non-text part of a joint sequence."""
        text = context.num_text_tokens if self.clustered[name] == "joint" else 0
        setting = parallel_setting(self.target.transformer)
        if setting is not None and context.grid is not None:  # a shard: [its text chunk, its image chunk]
            layout = shard_positions(length, setting.world, setting.rank, text, context.grid.num_tokens,
                                     self.target.spec.text_position != "last", setting.text_sharded)
            if layout is not None and layout.image:
                return layout.image_slice.start, layout.image_slice.stop
        if text <= 0 or text >= length:
            return 0, length
        return (text, length) if self.target.spec.text_position == "first" else (0, length - text)

    # ---------------------------------------------------------------------------------------------- policy
    def serve(self, context: CallContext, name: str):
        if name in self.clustered or not self.cached_step(context):
            return None
        entry = self.store.get(name, context.slot)
        if entry is None:
            return None
        # A block hook asks first, then (when the block's MLP must run) each sub-layer hook asks again: keep the
        # current block's forecasts only, so the memo never holds more than one block's outputs.
        block = (name.rsplit(".", 1)[0], context.slot, context.generation, context.step)
        if self._served.get("block") != block:
            self._served = {"block": block}
        if name in self._served:
            return self._served[name]
        position = self._position(context)
        leaves = [taylor_forecast(state, position).to(dtype) for state, dtype in zip(entry["states"], entry["dtypes"])]
        event = "reused" if all(len(state[1]) == 1 for state in entry["states"]) else "forecast"
        served = (entry["rebuild"](leaves), event)
        self._served[name] = served
        return served

    def partial(self, context: CallContext, name: str, forward, args, kwargs):
        """On a cheap step, compute a clustered MLP on one token per cluster; ``None``: compute it in full."""
        if name not in self.clustered or not self.cached_step(context):
            return None
        entry, clusters = self.store.get(name, context.slot), self.clusters.get(context.slot)
        current = _module_input(args, kwargs)
        if entry is None or clusters is None or current is None or len(entry["states"]) != 1:
            return None
        start, stop = self._image_span(context, name, current.shape[1])
        labels, reps = clusters["labels"], clusters["reps"]
        state = entry["states"][0]
        if tuple(labels.shape) != (current.shape[0], stop - start) or state[1][0].shape[:2] != current.shape[:2]:
            return None  # a different token layout than the clusters were made for: compute in full
        text = torch.cat([torch.arange(0, start), torch.arange(stop, current.shape[1])]).to(current.device)
        index = torch.cat([reps + start, text.expand(reps.shape[0], -1)], dim=1)  # reps first, then any text
        chosen = current.gather(1, index[..., None].expand(-1, -1, current.shape[-1]))
        fresh = forward(chosen, *args[1:], **kwargs) if args else forward(**{**kwargs, "hidden_states": chosen})
        positions, differences = state
        position = self._position(context)
        c0 = entry["c0"] if entry["c0"] is not None else differences[0]
        fresh = fresh.to(c0.dtype)
        if self.config.reanchor and len(differences) > 1:
            # Store m - e so that c0 + e gives back m here (e: the forecast's change since the full step).
            picked = [d.gather(1, index[..., None].expand(-1, -1, d.shape[-1])) for d in differences]
            fresh = fresh - (taylor_forecast((positions, picked), position) - picked[0])
        k = reps.shape[1]
        image = propagate(c0[:, start:stop], labels, reps, fresh[:, :k], self.config.gamma)
        c0 = torch.cat([c0[:, :start], image, c0[:, stop:]], dim=1) if stop - start != c0.shape[1] else image
        if text.numel():
            c0 = c0.scatter(1, index[:, k:, None].expand(-1, -1, c0.shape[-1]), fresh[:, k:])
        self.store.put(name, context.slot, {**entry, "c0": c0})
        output = taylor_forecast((positions, [c0] + differences[1:]), position).to(entry["dtypes"][0])
        self.target.stats.record(context, name, "partial", computed_fraction=index.shape[1] / current.shape[1])
        return output

    def update(self, context: CallContext, name: str, output, args: tuple = (), kwargs: dict | None = None) -> None:
        position = self._position(context)
        leaves, rebuild = flatten_output(output)
        entry = self.store.get(name, context.slot)
        previous = [None] * len(leaves)
        if entry is not None and len(entry["states"]) == len(leaves):
            previous = entry["states"]
        states = [update_differences(old if old is None or old[1][0].shape == leaf.shape else None,
                                     leaf.detach().float(), position, self.config.order)
                  for old, leaf in zip(previous, leaves)]
        self.store.put(name, context.slot, {"states": states, "dtypes": [leaf.dtype for leaf in leaves],
                                            "rebuild": rebuild, "c0": None})
        if name == self.source and len(leaves) == 1 and leaves[0].ndim == 3:
            self._recluster(context, name, leaves[0])

    def _recluster(self, context: CallContext, name: str, output: torch.Tensor) -> None:
        """New clusters for this slot from the source's image tokens, warm-started from the last ones."""
        start, stop = self._image_span(context, name, output.shape[1])
        tokens = output.detach()[:, start:stop].float()
        previous = self.clusters.get(context.slot)
        labels, centroids = kmeans(tokens, self.config.clusters, None if previous is None else previous["centroids"],
                                   self.config.iterations)
        self.clusters[context.slot] = {"labels": labels, "centroids": centroids,
                                       "reps": representatives(tokens, labels, centroids)}

    def reset(self) -> None:
        super().reset()
        self.clusters.clear()
        self._served.clear()

    def cache_bytes(self) -> int:
        extra = sum(t.numel() * t.element_size() for c in self.clusters.values() for t in c.values())
        return super().cache_bytes() + extra
