"""ToCa: token-wise feature caching (Zou et al., ICLR 2025, arXiv 2410.05317).

Like FORA, a full step every ``interval`` steps caches every sub-layer's output (pre-gate). On the cached steps
in between, attention outputs are reused whole, and each MLP sub-layer is recomputed for the ``mlp_ratio`` share of
tokens whose cache is most stale and scattered into its cached output (an MLP acts on each token alone, so the
recomputed tokens are exact). The score needs no attention map, so SDPA / flash attention stay usable:

    score = relative change of the token's input since it was cached + staleness_weight * steps since refresh

and the chosen tokens are spread over the image: the best-scoring token of every ``spread x spread`` cell of the
token grid is taken first, the rest by score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dit_accel.caching.sublayer import IntervalSubLayerPlugin
from dit_accel.core.blocks import TokenGrid
from dit_accel.core.context import CallContext
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
        staleness_weight (`float`, defaults to `0.05`): score added per step since a token was refreshed.
            Allowed: 0-10.
        spread (`int`, defaults to `2`): cells of ``spread x spread`` tokens each contribute their best token
            first; 1 disables the spatial spread. Allowed: 1-16.
        first_steps (`int`, defaults to `1`) / last_steps (`int`, defaults to `1`): always computed.
    """

    kind = "schedule"
    interval: int = 4
    mlp_ratio: float = 0.2
    staleness_weight: float = 0.05
    spread: int = 2
    first_steps: int = 1
    last_steps: int = 1

    def validate(self) -> None:
        check_range(self, "interval", 1, 50, integer=True)
        check_range(self, "mlp_ratio", 0.0, 1.0)
        check_range(self, "staleness_weight", 0.0, 10.0)
        check_range(self, "spread", 1, 16, integer=True)
        check_range(self, "first_steps", 0, 1000, integer=True)
        check_range(self, "last_steps", 0, 1000, integer=True)


@register_plugin(ToCaConfig)
class ToCaPlugin(IntervalSubLayerPlugin):
    def install(self) -> None:
        super().install()
        self.roles = {}
        for list_attr, index, block, contract in self.target.spec.blocks(self.target.transformer):
            for sublayer in contract.sublayers:
                self.roles[f"{list_attr}.{index}.{sublayer.name}"] = sublayer

    def serve(self, context: CallContext, name: str):
        if not self.cached_step(context):
            return None
        entry = self.store.get(name, context.slot)
        if entry is None:
            return None
        if self.roles[name].role == "mlp" and self.config.mlp_ratio > 0 and isinstance(entry["output"], torch.Tensor):
            return None  # the hook computes a token subset in `partial`
        return entry["output"], "reused"

    def partial(self, context: CallContext, name: str, forward, args, kwargs):
        """Recompute the chosen tokens of an MLP sub-layer; ``None`` if it must compute in full."""
        if not self.cached_step(context) or self.roles[name].role != "mlp":
            return None
        entry = self.store.get(name, context.slot)
        if entry is None or not args or not isinstance(args[0], torch.Tensor) or args[0].ndim != 3:
            return None
        current, cached_input, output = args[0], entry["input"], entry["output"]
        if current.shape != cached_input.shape:
            return None
        scores = token_scores(current, cached_input, entry["staleness"], self.config.staleness_weight)
        offset = context.num_text_tokens if (self.roles[name].stream == "joint"
                                             and self.target.spec.text_position == "first") else 0
        k = max(1, round(self.config.mlp_ratio * current.shape[1]))
        index = spread_top_k(scores, k, context.grid, offset, self.config.spread)
        gather = index[..., None].expand(-1, -1, current.shape[-1])
        fresh = forward(current.gather(1, gather), *args[1:], **kwargs)
        out_index = index[..., None].expand(-1, -1, fresh.shape[-1])
        output = output.scatter(1, out_index, fresh)
        entry["input"] = cached_input.scatter(1, gather, current.gather(1, gather))
        entry["staleness"] = (entry["staleness"] + 1).scatter(1, index, 0)
        entry["output"] = output
        self.target.stats.record(context, name, "partial", computed_fraction=k / current.shape[1])
        return output

    def update(self, context: CallContext, name: str, output, args: tuple = ()) -> None:
        entry = {"output": output}
        if args and isinstance(args[0], torch.Tensor) and args[0].ndim == 3:
            entry["input"] = args[0].detach()
            entry["staleness"] = torch.zeros(args[0].shape[:2], device=args[0].device)
        self.store.put(name, context.slot, entry)
