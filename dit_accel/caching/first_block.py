"""Adaptive first-block caching (First-Block-Cache / TeaCache / cache-dit DBCache family).

The first ``compute_blocks`` blocks always run. Their residual (output minus input) is compared with the one seen
at the last step that computed everything, by relative L1 per sample row; rows whose change is below
``threshold`` skip the remaining blocks and add the residual those blocks produced when last computed. Warm-up and
final steps always compute and a row never skips more than ``max_consecutive`` steps in a row -- the safety rails
users converged on. Decisions are per branch (slot) and per sample, except that in a batched-CFG call a sample's
conditional and unconditional rows skip together: guidance amplifies the difference of the two predictions, and a
stale residual in one of them only (the other fresh) is worse than both stale together (seen on zoo:dit in an
uncommitted comparison; with the pairing, the bench's fbcache rows match diffusers' FirstBlockCache in PSNR).
Rows that compute are the only ones the cached blocks run on (see ``blockrange``). Under diffusers' context
parallelism the statistic is all-reduced so every rank takes the same decision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.hooks import ModelHook

from dit_accel.caching.blockrange import BlockRange, block_streams
from dit_accel.caching.forecasters import check_forecaster, config_forecaster
from dit_accel.core.context import CallContext
from dit_accel.core.parallel import all_reduce_sum, parallel_setting
from dit_accel.core.rows import put_rows, take_rows
from dit_accel.core.hooks import attach, detach
from dit_accel.core.plugin import Plugin, register_plugin
from dit_accel.recipe import PluginConfig, check_range, register_config


def relative_l1_per_row(current: torch.Tensor, previous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Numerator and denominator of ``mean|current - previous| / mean|previous|`` per row, in float32 (kept apart
    so that ranks holding different shards of a sequence can sum them before dividing)."""
    dims = tuple(range(1, current.ndim))
    numerator = (current.float() - previous.float()).abs().sum(dims)
    denominator = previous.float().abs().sum(dims)
    return numerator, denominator


def cfg_partners(roles: tuple[str | None, ...]) -> list[int] | None:
    """For each row of a batched call, the row holding the same sample's other CFG branch (the k-th ``cond`` row
    pairs with the k-th ``uncond`` row); ``None`` when the rows are not such pairs (no CFG, or roles unknown)."""
    cond = [i for i, role in enumerate(roles) if role == "cond"]
    uncond = [i for i, role in enumerate(roles) if role == "uncond"]
    if not cond or len(cond) != len(uncond) or len(cond) + len(uncond) != len(roles):
        return None
    partners = [0] * len(roles)
    for c, u in zip(cond, uncond):
        partners[c], partners[u] = u, c
    return partners


def skip_rows(numerator: torch.Tensor, denominator: torch.Tensor, threshold: float) -> torch.Tensor:
    """Rows whose relative change is below ``threshold``; a NaN or a zero denominator never skips."""
    ratio = numerator / denominator.clamp_min(1e-12)
    return (ratio < threshold) & torch.isfinite(ratio) & (denominator > 0)


@register_config("fbcache")
@dataclass(frozen=True)
class FirstBlockCacheConfig(PluginConfig):
    """Adaptive first-block caching: skip the remaining blocks while the first blocks' residual barely changes.

    Args:
        threshold (`float`, defaults to `0.1`): relative L1 change of the first blocks' residual below which a row
            reuses the rest; 0 never skips. Typical 0.05-0.2 (ParaAttention FLUX: 0.08). Allowed: 0-10.
        compute_blocks (`int`, defaults to `1`): blocks that always compute (cache-dit's Fn). Allowed: 1-64.
        warmup_steps (`int`, defaults to `2`): first steps that always compute. Allowed: 0-1000.
        last_steps (`int`, defaults to `1`): final steps that always compute. Allowed: 0-1000.
        max_consecutive (`int`, defaults to `3`): at most this many skipped steps in a row per row; 0 for no
            cap. Allowed: 0-1000.
        forecast_order (`int`, defaults to `0`): 0 reuses the cached residual; 1-2 forecasts it with a polynomial
            through the last computed steps' residuals (over timesteps), TaylorSeer-style. Allowed: 0-4.
        forecaster, sigma, horizon: the forecast's kind (``"taylor"``, ``"hermite"``, ``"foca"``) and its settings,
            as in ``magcache`` (see :mod:`dit_accel.caching.forecasters`).
    """

    kind = "schedule"
    threshold: float = 0.1
    compute_blocks: int = 1
    warmup_steps: int = 2
    last_steps: int = 1
    max_consecutive: int = 3
    forecast_order: int = 0
    forecaster: str = "taylor"
    sigma: float = 0.5
    horizon: float = 1.0

    def validate(self) -> None:
        check_range(self, "threshold", 0.0, 10.0)
        check_range(self, "compute_blocks", 1, 64, integer=True)
        check_range(self, "warmup_steps", 0, 1000, integer=True)
        check_range(self, "last_steps", 0, 1000, integer=True)
        check_range(self, "max_consecutive", 0, 1000, integer=True)
        check_range(self, "forecast_order", 0, 4, integer=True)
        check_forecaster(self, "forecast_order")


class _HeadInput(ModelHook):
    """Records the hidden input of the first block."""

    def __init__(self, plugin: "FirstBlockCachePlugin", contract) -> None:
        super().__init__()
        self.plugin, self.contract = plugin, contract

    def new_forward(self, module, *args, **kwargs):
        self.plugin.head_input = block_streams(module, self.contract, args, kwargs)[0]
        return self.fn_ref.original_forward(*args, **kwargs)


@register_plugin(FirstBlockCacheConfig)
class FirstBlockCachePlugin(Plugin):
    kind = "schedule"
    skips_block_ranges = True  # refused where ControlNet adds residuals between blocks

    def install(self) -> None:
        if self.config.layers is not None:
            raise ValueError("fbcache decides for the whole block stack; it does not take `layers`")
        blocks = self.target.spec.blocks(self.target.transformer)
        count = self.config.compute_blocks
        if count >= len(blocks):
            raise ValueError(
                f"FirstBlockCacheConfig.compute_blocks = {count} leaves nothing to cache: "
                f"{type(self.target.transformer).__name__} has {len(blocks)} blocks; allowed: 1 to {len(blocks) - 1}"
            )
        self.head_input: torch.Tensor | None = None
        self._head_block = blocks[0][2]
        attach(self._head_block, _HeadInput(self, blocks[0][3]), "dit_accel.fbcache.head")
        self.range = BlockRange(self.target, "dit_accel.fbcache", self, count, len(blocks),
                                forecast_order=self.config.forecast_order, forecaster=config_forecaster(self.config))
        self.reset()

    def decide(self, context: CallContext, hidden: torch.Tensor, encoder) -> torch.Tensor:
        config = self.config
        batch = hidden.shape[0]
        residual = hidden - self.head_input
        self._pending = residual
        never = torch.zeros(batch, dtype=torch.bool, device=hidden.device)
        previous = take_rows(self.previous.get(context.slot), context)
        if config.last_steps:
            self.warn_unknown_length(context, f"last_steps={config.last_steps} cannot keep the final steps computed")
        late = context.num_steps is not None and context.step >= context.num_steps - config.last_steps
        if (previous is None or previous.shape != residual.shape or context.step < config.warmup_steps or late
                or not self.target.in_scope(config, context)):
            return never
        numerator, denominator = relative_l1_per_row(residual, previous)
        setting = parallel_setting(self.target.transformer)
        if setting is not None:  # every rank sees the statistic of the whole sequence, so all decide alike
            numerator, denominator = all_reduce_sum(torch.stack([numerator, denominator]), setting)
        skip = skip_rows(numerator, denominator, config.threshold)
        roles = tuple(branch.role for branch in context.branches)
        if roles not in self._partners:
            found = cfg_partners(roles)
            self._partners[roles] = None if found is None else torch.tensor(found, device=hidden.device)
        partners = self._partners[roles]
        if partners is not None:
            skip &= skip[partners]
        self.changes.append((context.step, context.slot, (numerator / denominator.clamp_min(1e-12)).tolist()))
        full_streak = self.streaks.get(context.slot)
        streak = take_rows(full_streak, context)
        if streak is None or streak.shape[0] != batch:
            streak = full_streak = torch.zeros(batch, dtype=torch.long, device=hidden.device)
        if config.max_consecutive:
            skip &= streak < config.max_consecutive
        streak = torch.where(skip, streak + 1, torch.zeros_like(streak))
        self.streaks[context.slot] = put_rows(full_streak, context, streak) if full_streak.shape[0] != batch else streak
        return skip

    def computed(self, context: CallContext, rows: torch.Tensor) -> None:
        full = self.previous.get(context.slot)
        previous = take_rows(full, context)
        if previous is None or previous.shape != self._pending.shape:
            update = self._pending
        else:
            mask = rows.view(-1, *([1] * (previous.ndim - 1)))
            update = torch.where(mask, self._pending, previous)
        merged = put_rows(full, context, update) if context.rows is not None else update
        self.previous[context.slot] = update if merged is None else merged

    def idle_reason(self, steps: int) -> str | None:
        config = self.config
        changes = [c for _, _, row in self.changes for c in row if c == c]
        if not changes:
            return (f"no step of {steps} was a candidate (warmup_steps={config.warmup_steps}, "
                    f"last_steps={config.last_steps}); lower them or run more steps")
        return (f"the first blocks' relative change never fell below threshold={config.threshold} (smallest seen: "
                f"{min(changes):.3g}); a threshold above that would let it skip")

    def reset(self) -> None:
        self.changes: list[tuple[int, int, list[float]]] = []  # (step, slot, relative change per row), for stats
        self.previous: dict[int, torch.Tensor] = {}
        self.streaks: dict[int, torch.Tensor] = {}
        self._partners: dict[tuple, torch.Tensor | None] = {}
        self._pending = None
        self.head_input = None
        self.range.clear()

    def remove(self) -> None:
        self.range.remove()
        detach(self._head_block, "dit_accel.fbcache.head")

    def cache_bytes(self) -> int:
        return self.range.nbytes() + sum(t.numel() * t.element_size() for t in self.previous.values())
