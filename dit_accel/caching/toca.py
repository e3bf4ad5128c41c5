"""ToCa: token-wise feature caching (Zou et al., ICLR 2025, arXiv 2410.05317).

Like FORA, a full step every ``interval`` steps caches every sub-layer's output (pre-gate). On the cached steps
in between, each MLP sub-layer is recomputed for the ``mlp_ratio`` share of tokens whose cache is most stale and
scattered into its cached output (an MLP acts on each token alone, so the recomputed tokens are exact). Attention
is reused whole, or with ``attention_ratio > 0`` its core is recomputed for that share of query tokens against all
keys (the projections run for every token; the other queries keep their cached attention output). The score needs
no attention map, so SDPA / flash attention stay usable:

    score = relative change of the token's input since it was cached + staleness_weight * steps since refresh

and the chosen tokens are spread over the image: the best-scoring token of every ``spread x spread`` cell of the
token grid is taken first, the rest by score.

Under sequence parallelism (``ulysses``/``ring``/``patch``) the scores of the whole stream are gathered and the
choice is made on them, identically on every rank and as one process would; each rank recomputes the chosen tokens
of its own shard (their number varies a little between ranks; the spread keeps it close to ``k / ranks``).
``attention_ratio > 0`` is refused there (see :mod:`dit_accel.core.parallel`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dit_accel.caching.sublayer import IntervalSubLayerPlugin
from dit_accel.core.blocks import TokenGrid
from dit_accel.core.context import CallContext
from dit_accel.core.parallel import local_choice, parallel_setting, refusal, whole_stream
from dit_accel.core.plugin import register_plugin
from dit_accel.recipe import PluginConfig, check_range, register_config


def token_scores(current: torch.Tensor, cached: torch.Tensor, staleness: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-token score (B, S): relative L2 change of the input since caching plus ``weight`` x staleness."""
    change = (current.float() - cached.float()).norm(dim=-1) / cached.float().norm(dim=-1).clamp_min(1e-6)
    return change + weight * staleness.float()


def spread_top_k(scores: torch.Tensor, k: int, grid: TokenGrid | None, offset: int, spread: int) -> torch.Tensor:
    """Indices (B, k) of the tokens to recompute: the top-scoring token of each ``spread x spread`` cell of the
    image grid (image tokens start at ``offset``) first, by cell score, then the remaining best tokens."""
    batch, length = scores.shape
    k = max(0, min(k, length))
    if k == 0:
        return torch.empty(batch, 0, dtype=torch.long, device=scores.device)
    boosted = scores.clone()
    if grid is not None and spread > 1 and offset + grid.num_tokens <= length:
        image = scores[:, offset:offset + grid.num_tokens].reshape(batch, grid.frames, grid.height, grid.width)
        cells_h, cells_w = -(-grid.height // spread), -(-grid.width // spread)
        padded = torch.full((batch, grid.frames, cells_h * spread, cells_w * spread), float("-inf"),
                            device=scores.device, dtype=scores.dtype)
        padded[:, :, : grid.height, : grid.width] = image
        cells = padded.reshape(batch, grid.frames, cells_h, spread, cells_w, spread).permute(0, 1, 2, 4, 3, 5)
        cells = cells.reshape(batch, grid.frames, cells_h, cells_w, spread * spread)
        best = cells.argmax(-1)  # position of each cell's best token inside the cell
        row = torch.arange(cells_h, device=scores.device)[:, None] * spread + best // spread
        col = torch.arange(cells_w, device=scores.device)[None, :] * spread + best % spread
        frame = torch.arange(grid.frames, device=scores.device)[:, None, None]
        flat = (frame * grid.height + row) * grid.width + col
        valid = (row < grid.height) & (col < grid.width)
        flat = torch.where(valid, flat + offset, torch.zeros_like(flat)).reshape(batch, -1)
        bonus = torch.where(valid.reshape(batch, -1), 1e6, 0.0).to(scores.dtype)
        boosted.scatter_reduce_(1, flat, bonus, reduce="amax", include_self=True)
    return boosted.topk(k, dim=1).indices


@register_config("toca")
@dataclass(frozen=True)
class ToCaConfig(PluginConfig):
    """ToCa: reuse attention, refresh the most stale share of tokens in every MLP between full steps.

    Args:
        interval (`int`, defaults to `4`): a full step every ``interval`` steps. Allowed: 1-50.
        mlp_ratio (`float`, defaults to `0.2`): share of tokens each MLP recomputes on cached steps (paper: 10-30 %).
            0 is FORA. Allowed: 0-1.
        attention_ratio (`float`, defaults to `0.0`): share of query tokens whose attention core is recomputed on
            cached steps; 0 reuses attention whole (the paper's choice). Worth it at long sequences. Allowed: 0-1.
        staleness_weight (`float`, defaults to `0.05`): score added per step since a token was refreshed.
            Allowed: 0-10.
        spread (`int`, defaults to `2`): cells of ``spread x spread`` tokens each contribute their best token
            first; 1 disables the spatial spread. Allowed: 1-16.
        first_steps (`int`, defaults to `1`) / last_steps (`int`, defaults to `1`): always computed.
    """

    kind = "schedule"
    interval: int = 4
    mlp_ratio: float = 0.2
    attention_ratio: float = 0.0
    staleness_weight: float = 0.05
    spread: int = 2
    first_steps: int = 1
    last_steps: int = 1

    def validate(self) -> None:
        check_range(self, "interval", 1, 50, integer=True)
        check_range(self, "mlp_ratio", 0.0, 1.0)
        check_range(self, "attention_ratio", 0.0, 1.0)
        check_range(self, "staleness_weight", 0.0, 10.0)
        check_range(self, "spread", 1, 16, integer=True)
        check_range(self, "first_steps", 0, 1000, integer=True)
        check_range(self, "last_steps", 0, 1000, integer=True)


def _attention_refusal(setting) -> ValueError:
    return refusal("toca", setting, "attention_ratio > 0 recomputes chosen queries inside the attention call, "
                   "which the ranks hold in another order and split (ulysses: by heads; ring and patch: by keys)",
                   "attention_ratio=0 (the MLP token refresh decides alike on every rank)")


def _module_input(args: tuple, kwargs: dict | None) -> torch.Tensor | None:
    value = (kwargs or {}).get("hidden_states", args[0] if args else None)
    return value if isinstance(value, torch.Tensor) and value.ndim == 3 else None


@register_plugin(ToCaConfig)
class ToCaPlugin(IntervalSubLayerPlugin):
    routes_attention = True  # attention over the recomputed token subset

    def install(self) -> None:
        super().install()
        self.roles = {}
        for list_attr, index, block, contract in self.target.spec.blocks(self.target.transformer):
            for sublayer in contract.sublayers:
                self.roles[f"{list_attr}.{index}.{sublayer.name}"] = sublayer
        self._queries: tuple[torch.Tensor, int] | None = None  # (token indices, module input length) while active
        self.attention_outputs: dict[tuple, torch.Tensor] = {}
        if self.config.attention_ratio > 0:
            setting = parallel_setting(self.target.transformer)
            if setting is not None:
                raise _attention_refusal(setting)
            self.target.route_attention(self, self._attend)

    def _ratio(self, name: str) -> float:
        return self.config.mlp_ratio if self.roles[name].role == "mlp" else self.config.attention_ratio

    def serve(self, context: CallContext, name: str):
        if not self.cached_step(context):
            return None
        entry = self.store.get(name, context.slot)
        if entry is None:
            return None
        if self._ratio(name) > 0 and "input" in entry:
            return None  # the hook recomputes a token subset in `partial`
        return entry["output"], "reused"

    def partial(self, context: CallContext, name: str, forward, args, kwargs):
        """Recompute the chosen tokens of a sub-layer; ``None`` if it must compute in full."""
        if not self.cached_step(context):
            return None
        entry = self.store.get(name, context.slot)
        current = _module_input(args, kwargs)
        if entry is None or current is None or "input" not in entry or current.shape != entry["input"].shape:
            return None
        scores = token_scores(current, entry["input"], entry["staleness"], self.config.staleness_weight)
        choice = self._choose(context, name, scores)
        if choice is None:
            return None
        index, valid, fraction = choice
        k = index.shape[1]
        gather = index[..., None].expand(-1, -1, current.shape[-1])
        if self.roles[name].role == "mlp":
            if not isinstance(entry["output"], torch.Tensor):
                return None
            chosen = current.gather(1, gather)
            if args:
                fresh = forward(chosen, *args[1:], **kwargs)
            else:
                fresh = forward(**{**kwargs, "hidden_states": chosen})
            if valid is not None:
                # Padding repeats a row's first pick (its own fresh value is written twice), or token 0 in a row
                # with no pick on this rank (its cached output is written back).
                cached = entry["output"].gather(1, index[..., None].expand(-1, -1, fresh.shape[-1]))
                pad = torch.where(valid[:, :1, None], fresh[:, :1], cached)
                fresh = torch.where(valid[..., None], fresh, pad.to(fresh.dtype))
            output = entry["output"].scatter(1, index[..., None].expand(-1, -1, fresh.shape[-1]), fresh)
        else:
            self._queries = (index, current.shape[1])
            try:
                output = forward(*args, **kwargs)
            finally:
                self._queries = None
            core = self.target.stats.core_fraction(context, name)
            fraction = 1.0 - core * (1.0 - fraction)
        if valid is None:
            entry["input"] = entry["input"].scatter(1, gather, current.gather(1, gather))
            entry["staleness"] = (entry["staleness"] + 1).scatter(1, index, 0)
        else:  # only the tokens a valid pick names are refreshed (padding may repeat a pick, or name token 0)
            fresh_mask = torch.zeros_like(entry["staleness"], dtype=torch.int8).scatter_reduce(
                1, index, valid.to(torch.int8), reduce="amax").bool()
            entry["input"] = torch.where(fresh_mask[..., None], current.detach(), entry["input"])
            entry["staleness"] = torch.where(fresh_mask, 0, entry["staleness"] + 1)
        entry["output"] = output
        self.target.stats.record(context, name, "partial", computed_fraction=fraction)
        return output

    def _choose(self, context: CallContext, name: str, scores: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None, float] | None:
        """The tokens to recompute, as ``(index (B, k), valid (B, k) or None, fraction of the stream)``; ``None``:
        compute the sub-layer in full. Under sequence parallelism the top-k is taken over the whole stream's scores
        (gathered, in the model's order), the same choice on every rank and the single-process one; each rank
        recomputes the chosen tokens it holds (``valid`` marks the padding of rows with fewer of them)."""
        offset = context.num_text_tokens if (self.roles[name].stream == "joint"
                                             and self.target.spec.text_position == "first") else 0
        setting = parallel_setting(self.target.transformer)
        if setting is None:
            k = max(1, round(self._ratio(name) * scores.shape[1]))
            return spread_top_k(scores, k, context.grid, offset, self.config.spread), None, k / scores.shape[1]
        if self.config.attention_ratio > 0:
            raise _attention_refusal(setting)
        image = context.grid.num_tokens if context.grid is not None else 0
        whole = whole_stream(scores, setting, context.num_text_tokens, image,
                             self.target.spec.text_position != "last")
        if whole is None:  # alike on every rank: the layout is read from shapes all ranks share
            return None
        scores, layout = whole
        k = max(1, round(self._ratio(name) * layout.total))
        chosen = spread_top_k(scores, k, context.grid, offset, self.config.spread)
        index, valid = local_choice(chosen, layout.positions, layout.total)
        return index, valid, k / layout.total

    def _attend(self, query, key, value, call):
        """SDPA of a routed attention layer: full on full steps (and remembered), chosen queries on cached steps."""
        slot = call.context.slot if call.context is not None else 0
        cache_key = (call.layer.name, call.index, slot)
        cached = self.attention_outputs.get(cache_key)
        expected = (*query.shape[:-1], value.shape[-1])
        rows = self._query_rows(query, call) if self._queries is not None else None
        if rows is None or cached is None or tuple(cached.shape) != expected or call.options.get("attn_mask") is not None:
            out = call.dense(query, key, value)
        else:
            heads, dim = query.shape[1], query.shape[-1]
            picked = query.gather(2, rows[:, None, :, None].expand(-1, heads, -1, dim))
            fresh = call.dense(picked, key, value)
            out = cached.scatter(2, rows[:, None, :, None].expand(-1, heads, -1, fresh.shape[-1]), fresh)
        self.attention_outputs[cache_key] = out
        return out

    def _query_rows(self, query: torch.Tensor, call) -> torch.Tensor | None:
        """Positions of the chosen module-input tokens in the attention's query sequence. When joint attention
        adds the text stream to an image-only input (dual-stream blocks), every text query is recomputed too: there
        are few, and the text stream's output depends on them."""
        index, input_length = self._queries
        extra = query.shape[2] - input_length
        if extra == 0:
            return index
        layout = call.layout
        if layout.kind != "joint" or extra != layout.num_text_tokens:
            return None
        text_first = layout.text_position == "first"
        text = torch.arange(extra, device=index.device) + (0 if text_first else input_length)
        image = index + (extra if text_first else 0)
        return torch.cat([text.expand(index.shape[0], -1), image], dim=1)

    def update(self, context: CallContext, name: str, output, args: tuple = (), kwargs: dict | None = None) -> None:
        entry = {"output": output}
        current = _module_input(args, kwargs)
        if current is not None:
            entry["input"] = current.detach()
            entry["staleness"] = torch.zeros(current.shape[:2], device=current.device)
        self.store.put(name, context.slot, entry)

    def reset(self) -> None:
        super().reset()
        self.attention_outputs.clear()

    def remove(self) -> None:
        super().remove()
        self.target.attention.unroute(self)
        self.attention_outputs.clear()

    def cache_bytes(self) -> int:
        return super().cache_bytes() + sum(t.numel() * t.element_size() for t in self.attention_outputs.values())
