"""SpeCa: forecast, then verify (after Liu et al., "Speculative Feature Caching", arXiv 2509.11628).

Steps are drafted with a forecaster (TaylorSeer's by default, any of :mod:`forecasters`); on a drafted step one
deep block (the probe, the last block by default) is computed for real and its sub-layer outputs are compared with
their forecasts by relative L1, ``mean |F - F_hat| / mean |F|`` per sample row (a ratio of means: the reference
code's element-wise ratio explodes on near-zero features, which is why its FLUX threshold is 7). A draft whose
worst row exceeds the threshold ``tau(s) = max(threshold * decay ** (s / S), floor)`` is rejected: the next step is
full (the rejected step's output already went to the sampler, as in the reference code; nothing is rolled back).
A full step also follows ``max_drafts`` drafts in a row. Decisions are per branch (CFG slot): a rejection in any
row of the branch makes the branch's next step full.

Pure decision rule: :func:`verification_threshold`, :func:`relative_l1` (from its sums, :func:`relative_l1_parts`
and :func:`ratio_of_parts`, which are all-reduced over the ranks under sequence parallelism). The patching is
TaylorSeer's sub-layer machinery; the probe block always computes on drafted steps once ``min_drafts`` drafts have run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dit_accel.caching.forecasters import check_forecaster
from dit_accel.caching.sublayer import flatten_output
from dit_accel.caching.taylorseer import TaylorSeerPlugin, _DTYPES
from dit_accel.core.context import CallContext
from dit_accel.core.parallel import all_reduce_sum, parallel_setting
from dit_accel.core.plugin import Plugin, register_plugin
from dit_accel.recipe import PluginConfig, check_bool, check_choice, check_range, register_config


def verification_threshold(step: int, num_steps: int | None, threshold: float, decay: float, floor: float) -> float:
    """``max(threshold * decay ** (step / num_steps), floor)``: stricter toward the end of the schedule, where
    details form (the reference code's schedule); ``threshold`` when the length is unknown."""
    if not num_steps:
        return max(threshold, floor)
    return max(threshold * decay ** (step / num_steps), floor)


def relative_l1_parts(forecast: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    """Per sample row (dim 0), stacked ``(3, B)``: ``sum |forecast - actual|``, ``sum |actual|`` and the element
    count, in float32; sums over sequence shards add up to the whole sequence's (:func:`ratio_of_parts`)."""
    rows = actual.shape[0] if actual.dim() > 1 else 1
    error = (forecast.float() - actual.float()).abs().reshape(rows, -1)
    scale = actual.float().abs().reshape(rows, -1)
    count = torch.full((rows,), float(error.shape[1]), device=error.device)
    return torch.stack([error.sum(1), scale.sum(1), count])


def ratio_of_parts(parts: torch.Tensor) -> torch.Tensor:
    """:func:`relative_l1` from (possibly summed) :func:`relative_l1_parts`: ``error / scale``, or the mean error
    where the scale vanishes."""
    error, scale, count = parts[0], parts[1], parts[2]
    return torch.where(scale > 0, error / scale.clamp_min(torch.finfo(torch.float32).tiny),
                       error / count.clamp_min(1.0))


def relative_l1(forecast: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    """Per sample row (dim 0): ``mean |forecast - actual| / mean |actual|`` in float32 (0 where both vanish)."""
    dims = tuple(range(1, actual.dim())) if actual.dim() > 1 else (0,)
    error = (forecast.float() - actual.float()).abs().mean(dims)
    scale = actual.float().abs().mean(dims)
    return torch.where(scale > 0, error / scale.clamp_min(torch.finfo(torch.float32).tiny), error)


@register_config("speca")
@dataclass(frozen=True)
class SpeCaConfig(PluginConfig):
    """SpeCa: draft steps with a forecast, verify each on one computed deep block, fall back to a full step when the
    forecast strays.

    Args:
        threshold (`float`, defaults to `0.3`): relative L1 error of the probe's forecast above which a draft is
            rejected, at the start of the schedule. 0 rejects every verified draft. Allowed: 0-100.
        decay (`float`, defaults to `0.5`): the threshold at the end of the schedule is ``threshold * decay``
            (geometric in between). Allowed: 0.01-1.
        floor (`float`, defaults to `0.05`): the threshold never drops below this. Allowed: 0-100.
        min_drafts (`int`, defaults to `1`): drafts after a full step before verification starts (a first draft
            only reuses: nothing to verify). Allowed: 0-50.
        max_drafts (`int`, defaults to `5`): at most this many drafts in a row. Allowed: 1-50.
        first_steps (`int`, defaults to `3`): warm-up steps that always compute. Allowed: 0-1000.
        last_steps (`int`, defaults to `1`): final steps that always compute. Allowed: 0-1000.
        order (`int`, defaults to `1`): the forecast's order (see ``taylorseer``). Allowed: 0-4.
        probe (`int`, defaults to `-1`): index of the block computed to verify a draft (negative from the end).
        distance, factor_dtype, forecaster, sigma, horizon: as in ``taylorseer``.
    """

    kind = "schedule"
    threshold: float = 0.3
    decay: float = 0.5
    floor: float = 0.05
    min_drafts: int = 1
    max_drafts: int = 5
    first_steps: int = 3
    last_steps: int = 1
    order: int = 1
    probe: int = -1
    distance: str = "timestep"
    factor_dtype: str = "float32"
    forecaster: str = "taylor"
    sigma: float = 0.5
    horizon: float = 1.0

    # What TaylorSeer's machinery reads: no fixed interval, no trust scaling (the verification replaces it).
    interval = 1
    verify = False

    def validate(self) -> None:
        check_range(self, "threshold", 0.0, 100.0)
        check_range(self, "decay", 0.01, 1.0)
        check_range(self, "floor", 0.0, 100.0)
        check_range(self, "min_drafts", 0, 50, integer=True)
        check_range(self, "max_drafts", 1, 50, integer=True)
        check_range(self, "first_steps", 0, 1000, integer=True)
        check_range(self, "last_steps", 0, 1000, integer=True)
        check_range(self, "order", 0, 4, integer=True)
        check_range(self, "probe", -1000, 1000, integer=True)
        check_choice(self, "distance", ("timestep", "step"))
        check_choice(self, "factor_dtype", tuple(_DTYPES))
        check_forecaster(self, "order")
        check_bool(self, "verify")


@dataclass
class _Branch:
    """One CFG slot's drafting state."""

    step: int = -1  # the step the decision below is for
    draft: bool = False
    drafts: int = 0  # drafts since the last full step (this one included)
    rejected: bool = False  # the last verification failed: the next step is full


@register_plugin(SpeCaConfig)
class SpeCaPlugin(TaylorSeerPlugin):
    def install(self) -> None:
        super().install()
        blocks = self.target.spec.blocks(self.target.transformer)
        if not -len(blocks) <= self.config.probe < len(blocks):
            raise ValueError(f"SpeCaConfig.probe = {self.config.probe} is outside the model's {len(blocks)} blocks; "
                             f"allowed: {-len(blocks)} to {len(blocks) - 1}")
        list_attr, index, _, _ = blocks[self.config.probe]
        self._probe_prefix = f"{list_attr}.{index}."
        if not any(name.startswith(self._probe_prefix) for name in self.sublayers):
            raise ValueError(f"speca's probe block {list_attr}.{index} has no cached sub-layer (check `layers`)")
        self.reset_counters()

    def reset_counters(self) -> None:
        self.branches: dict[int, _Branch] = {}
        self.verified = self.accepted = self.rejected = self.drafted = 0

    def reset(self) -> None:
        super().reset()
        if hasattr(self, "branches"):
            self.reset_counters()

    def _branch(self, context: CallContext) -> _Branch:
        """This slot's decision for this step, made at its first call of the step."""
        branch = self.branches.setdefault(context.slot, _Branch())
        if branch.step != context.step:
            config = self.config
            if config.last_steps:
                self.warn_unknown_length(context, f"last_steps={config.last_steps} cannot keep the final steps "
                                         "computed")
            forced = (context.step < config.first_steps or not self.target.in_scope(config, context)
                      or (context.num_steps is not None and context.step >= context.num_steps - config.last_steps))
            full = forced or branch.rejected or branch.drafts >= config.max_drafts or branch.step < 0
            branch.step = context.step
            branch.draft = not full
            branch.drafts = branch.drafts + 1 if branch.draft else 0
            branch.rejected = False
            self.drafted += branch.draft
            self._publish()
        return branch

    def _tau(self, step: int, num_steps: int | None) -> float:
        config = self.config
        return verification_threshold(step, num_steps, config.threshold, config.decay, config.floor)

    def _verifying(self, branch: _Branch) -> bool:
        return branch.draft and branch.drafts > self.config.min_drafts

    def cached_step(self, context: CallContext) -> bool:
        return self._branch(context).draft

    def computes_step(self, step: int, num_steps: int) -> bool | None:
        return None  # drafts are verified on the fly

    def serve(self, context: CallContext, name: str):
        branch = self._branch(context)
        if name.startswith(self._probe_prefix) and self._verifying(branch):
            return None  # the probe computes: update() compares it with the forecast
        return super().serve(context, name)

    def update(self, context: CallContext, name: str, output, args: tuple = (), kwargs: dict | None = None) -> None:
        branch = self._branch(context)
        if not branch.draft:
            super().update(context, name, output, args, kwargs)
            return
        served = super().serve(context, name)  # the forecast the draft would have used
        if served is None:
            return
        forecast_leaves, _ = flatten_output(served[0])
        leaves, _ = flatten_output(output)
        parts = [relative_l1_parts(f, a) for f, a in zip(forecast_leaves, leaves) if f.shape == a.shape]
        if not parts:
            return
        # Summed over the ranks under sequence parallelism: every rank accepts or rejects the draft alike (ranks
        # that disagreed would run different steps and hang in their collectives).
        parts = all_reduce_sum(torch.stack(parts), parallel_setting(self.target.transformer))
        worst = float(max(ratio_of_parts(p).max() for p in parts))
        self.verified += 1
        rejected = worst > self._tau(context.step, context.num_steps)
        self.rejected += rejected
        self.accepted += not rejected
        branch.rejected = branch.rejected or rejected
        self._publish()

    def _publish(self) -> None:
        """How often drafts held up, in ``handle.stats.notes`` (the running generation's stats)."""
        current = self.target.stats.current
        if current is not None:
            current.notes["speca.drafted"] = float(self.drafted)
            if self.verified:
                current.notes.update({"speca.verified": float(self.verified),
                                      "speca.acceptance": self.accepted / self.verified})

    def idle_reason(self, steps: int) -> str | None:
        config = self.config
        if steps <= config.first_steps + config.last_steps:
            return (f"in a {steps}-step generation every step is a warm-up or final step (first_steps="
                    f"{config.first_steps}, last_steps={config.last_steps}); lower them or run more steps")
        if self.rejected and not self.accepted:
            return (f"every draft was rejected (threshold={config.threshold}); raise the threshold")
        return Plugin.idle_reason(self, steps)
