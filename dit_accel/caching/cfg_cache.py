"""CFG-Cache: skip the unconditional branch (after FasterCache, Lv et al., ICLR 2025, arXiv 2410.19355).

Under classifier-free guidance every step evaluates the model twice, conditional and unconditional, and the
difference of the two outputs drifts slowly over the schedule. On the steps of a window this plugin computes only
the conditional output and rebuilds the unconditional one as ``cond + (uncond - cond)``, with the difference taken
at the last step that computed both. With ``weighting = "frequency"`` the difference is split into a low and a high
spatial-frequency band that are scaled apart, FasterCache's weighting: the low band grows early in the schedule, the
high band late.

* Separate CFG calls (Flux true CFG, Wan, Qwen-Image, HunyuanVideo, zoo:mmdit): the unconditional call returns the
  rebuilt output without running the transformer.
* Batched CFG (DiT, PixArt, SD3, CogVideoX, LTX, zoo:dit): the call runs on the conditional rows alone, every per-row
  input cut as the family's block contract says (``TransformerSpec.row_args``), and the unconditional rows are put
  back in the pipeline's order. Plugins with per-slot state see a call that holds some rows of its slot
  (``CallContext.rows``) and keep the other rows' state (see :mod:`dit_accel.core.rows`).

The rebuild itself and the step rule are pure functions in :mod:`dit_accel.caching.cfg_difference`.

Under sequence parallelism (``ulysses``/``ring``/``patch``) this hook sits outside diffusers' split and gather
hooks as long as the parallelism is enabled before ``accelerate_dit``: it sees the whole latent and the gathered
output, so the frequency split runs on the whole grid, and its window is a fixed schedule (stacked on fbcache,
magcache or speca, the computing steps it counts follow their decisions, which are alike on every rank).
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import ModelHook

from dit_accel.caching.blockrange import select_rows
from dit_accel.caching.cfg_difference import (Bands, band_weights, in_window, low_band_mask, rebuild_uncond,
                                              skipped_steps, split_difference, to_grid)
from dit_accel.core.context import CallContext
from dit_accel.core.hooks import attach, detach
from dit_accel.core.outputs import output_sample as _sample, with_sample as _with_sample
from dit_accel.core.plugin import Plugin, register_plugin
from dit_accel.recipe import PluginConfig, check_choice, check_range, register_config

HOOK_NAME = "dit_accel.cfg_cache"


# ------------------------------------------------------------------------------------------------ the config
@register_config("cfg-cache")
@dataclass(frozen=True)
class CFGCacheConfig(PluginConfig):
    """Skip the unconditional branch on a window of steps, rebuilding it from the conditional output.

    Args:
        start (`float`, defaults to `0.2`): where the window opens, as a fraction of the schedule; the steps before
            shape the layout and compute both branches. Allowed: 0-1; 0.1-0.4 recommended.
        end (`float`, defaults to `1.0`): where it closes. Allowed: 0-1, greater than ``start``.
        interval (`int`, defaults to `2`): in the window, both branches compute every ``interval`` steps (refreshing
            the difference) and the steps between rebuild the unconditional output. 2 halves the unconditional work
            of the window; 3-5 is FasterCache's range. Allowed: 2-50.
        weighting (`str`, defaults to `"plain"`): ``"plain"`` adds the cached difference as it is;
            ``"frequency"`` splits it into a low and a high spatial-frequency band (2-D FFT over the output's
            spatial grid) and grows them apart, FasterCache's weighting (families whose output is a token sequence
            use their token grid).
        cutoff (`float`, defaults to `0.4`): radius of the low band as a fraction of the Nyquist radius
            (``"frequency"`` only; FasterCache's disc of min(H, W)/5 about the centre is 0.4). Allowed: 0-1.4.
        low_alpha (`float`, defaults to `1.1`): growth of the low band on each rebuilt step between 10 % and 90 % of
            the schedule (``"frequency"`` only). Allowed: 0.5-2.
        high_alpha (`float`, defaults to `1.1`): growth of the high band on each rebuilt step after 70 % of the
            schedule (``"frequency"`` only). Allowed: 0.5-2.
    """

    kind = "guidance"
    start: float = 0.2
    end: float = 1.0
    interval: int = 2
    weighting: str = "plain"
    cutoff: float = 0.4
    low_alpha: float = 1.1
    high_alpha: float = 1.1

    def validate(self) -> None:
        check_range(self, "start", 0.0, 1.0)
        check_range(self, "end", 0.0, 1.0)
        if self.end <= self.start:
            raise ValueError(f"CFGCacheConfig.end = {self.end} must be greater than start = {self.start}")
        check_range(self, "interval", 2, 50, integer=True)
        check_choice(self, "weighting", ("plain", "frequency"))
        check_range(self, "cutoff", 0.0, 1.4)
        check_range(self, "low_alpha", 0.5, 2.0)
        check_range(self, "high_alpha", 0.5, 2.0)


# ------------------------------------------------------------------------------------------------- the plugin
@dataclass
class _Difference:
    step: int
    value: Any  # a tensor, or (low, high) spectra with "frequency"
    weights: tuple[float, float] = (1.0, 1.0)


class _DenoiserHook(ModelHook):
    """On the transformer, inside the step tracker: decides per call whether the unconditional work is skipped."""

    def __init__(self, plugin: "CFGCachePlugin") -> None:
        super().__init__()
        self.plugin = plugin

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        return self.plugin.forward(self.fn_ref.original_forward, module, args, kwargs)


@register_plugin(CFGCacheConfig)
class CFGCachePlugin(Plugin):
    kind = "guidance"

    def install(self) -> None:
        self._cuts_rows = True
        self._schedules: dict[int, set[int]] = {}
        self._fixed: dict[int, list[bool] | None] = {}
        self._signature = inspect.signature(self.target.transformer.forward)
        attach(self.target.transformer, _DenoiserHook(self), HOOK_NAME)
        self.reset()

    def check_companions(self, plugins: list[Plugin]) -> None:
        refused = [p.name for p in plugins if not p.supports_partial_rows]
        self._cuts_rows = not refused
        if refused and self.target.spec.cfg_convention is not None and self.target.spec.cfg_convention.startswith(
                "batched"):
            raise ValueError(
                f"cfg-cache runs batched-CFG calls of {self.target.spec.family} on their conditional rows alone, and "
                f"{', '.join(refused)} keeps state that cannot follow such a call; stack cfg-cache with magcache, "
                "fbcache, fora, taylorseer, speca, toca, delta-dit or the attention plugins instead")

    # ------------------------------------------------------------------------------------------- decisions
    def _skipping(self, context: CallContext) -> bool:
        config = self.config
        self.warn_unknown_length(context, "its window cannot be placed: the unconditional branch always computes")
        if not self.target.in_scope(config, context) or self.target.stats.measuring:
            return False
        if any(plugin.needs_whole_calls() for plugin in self.target.plugins if plugin is not self):
            self._deferred = True
            return False  # a calibration run sees every call whole
        if not in_window(context.step, context.num_steps, config.start, config.end):
            return False
        computes = self._fixed_schedule(context.num_steps)
        if computes is not None and not computes[context.step]:
            return False  # the companion computes nothing here: no work to save
        # Counted in computing calls: a refresh (both branches computed) after every interval - 1 cut ones, so a
        # companion whose computing steps fall on a fixed parity (magcache's skips of period 4) never leaves the
        # unconditional branch to its cached difference for good.
        return self._cut_computing < self.config.interval - 1

    def _computing(self, served_before: float) -> bool:
        """Whether the call that just ran computed its blocks (fewer than half its sub-layers served)."""
        current = self.target.stats.current
        if current is None or not current.names:
            return True
        return self._served() - served_before < 0.5 * len(current.names)

    def _served(self) -> float:
        current = self.target.stats.current
        return 0.0 if current is None else float(current.served())

    def _count(self, cut: bool, computed: bool) -> None:
        if computed:
            self._cut_computing = self._cut_computing + 1 if cut else 0

    def _fixed_schedule(self, num_steps: int | None) -> list[bool] | None:
        """Whether each step computes, where the companions' schedules are fixed in advance (else ``None``). Only
        step-skipping plugins are asked: an attention or parallel plugin runs every step the others compute, so
        it leaves the schedule as they fix it (patch-parallel beside taylorseer made it unknown, and the rebuilt
        steps then differed from one process's)."""
        if num_steps is None:
            return None
        if num_steps not in self._fixed:
            computes = None
            for plugin in self.target.plugins:
                if plugin is not self and plugin.kind == "schedule":
                    known = [plugin.computes_step(s, num_steps) for s in range(num_steps)]
                    if None in known:
                        computes = None
                        break
                    computes = known if computes is None else [a or b for a, b in zip(computes, known)]
            self._fixed[num_steps] = computes
        return self._fixed[num_steps]

    def _schedule(self, num_steps: int | None) -> set[int]:
        """The rebuilt steps of a ``num_steps``-step generation (empty when the length is unknown)."""
        if num_steps is None:
            return set()
        cached = self._schedules.get(num_steps)
        if cached is None:
            config = self.config
            cached = self._schedules[num_steps] = skipped_steps(num_steps, config.start, config.end,
                                                                config.interval, self._fixed_schedule(num_steps))
        return cached

    def _weights(self, context: CallContext, difference: _Difference) -> tuple[float, float]:
        if self.config.weighting != "frequency":
            return 1.0, 1.0
        low, high = band_weights(context.step, context.num_steps, self.config.low_alpha, self.config.high_alpha)
        difference.weights = (difference.weights[0] * low, difference.weights[1] * high)
        return difference.weights

    def forward(self, forward, module: torch.nn.Module, args: tuple, kwargs: dict):
        context = self.target.tracker.current
        if context is None:
            return forward(*args, **kwargs)
        roles = [branch.role for branch in context.branches]
        self._saw_uncond = self._saw_uncond or "uncond" in roles
        if None in roles:
            if not self._unknown_roles:
                warnings.warn("dit_accel cfg-cache cannot tell the conditional from the unconditional rows of this "
                              f"pipeline's calls (roles {roles}): it computes them all; declare how the loop runs "
                              "CFG with handle.begin(cfg=...) or handle.generation(cfg=...)", UserWarning, stacklevel=3)
            self._unknown_roles = True
            return forward(*args, **kwargs)
        if "cond" in roles and "uncond" in roles:
            self._batched_calls += 1
            return self._batched(forward, module, args, kwargs, context, roles)
        return self._separate(forward, args, kwargs, context, roles)

    # --------------------------------------------------------------------------------- separate CFG calls
    def _separate(self, forward, args: tuple, kwargs: dict, context: CallContext, roles: list[str]):
        slot = context.slot
        served = self._served()
        if "uncond" not in roles:  # the conditional call: kept for this step's unconditional call
            output = forward(*args, **kwargs)
            self._cond = (context.step, output, self._computing(served))
            return output
        cond = self._cond if self._cond is not None and self._cond[0] == context.step else None
        difference = self._differences.get(slot)
        # A conditional call that computed nothing (a companion skipped it) leaves nothing to save by rebuilding.
        if cond is not None and difference is not None and cond[2] and self._skipping(context):
            sample = _sample(cond[1])
            if sample.shape == self._shapes.get(slot):
                rebuilt = rebuild_uncond(sample, difference.value, *self._weights(context, difference))
                self.target.stats.record_rows_skipped(context, 1.0)
                self._rebuilt()
                self._count(cut=True, computed=True)
                return _with_sample(cond[1], rebuilt)
        output = forward(*args, **kwargs)
        self._count(cut=False, computed=self._computing(served))
        if cond is not None:
            uncond = _sample(output)
            if uncond.shape == _sample(cond[1]).shape:
                self._store(slot, context, uncond - _sample(cond[1]))
        return output

    # --------------------------------------------------------------------------------------- batched CFG
    def _batched(self, forward, module, args: tuple, kwargs: dict, context: CallContext, roles: list[str]):
        cond = [i for i, role in enumerate(roles) if role == "cond"]
        uncond = [i for i, role in enumerate(roles) if role == "uncond"]
        row_args = self.target.spec.row_args
        difference = self._differences.get(context.slot)
        served = self._served()
        if (len(cond) == len(uncond) and row_args is not None and difference is not None and self._cuts_rows
                and self._skipping(context)):
            output = self._cond_rows_only(forward, args, kwargs, context, cond, uncond, row_args)
            computed = self._computing(served)
            if output is not None:
                sample = _sample(output)
                if (len(cond),) + tuple(sample.shape[1:]) == self._shapes.get(context.slot):
                    full = sample.new_empty((len(roles), *sample.shape[1:]))
                    index = torch.tensor(cond, device=sample.device)
                    full.index_copy_(0, index, sample)
                    rebuilt = rebuild_uncond(sample, difference.value, *self._weights(context, difference))
                    full.index_copy_(0, torch.tensor(uncond, device=sample.device), rebuilt)
                    self.target.stats.record_rows_skipped(context, len(uncond) / len(roles))
                    self._rebuilt()
                    self._count(cut=True, computed=computed)
                    return _with_sample(output, full)
                # The shapes changed under it: run the whole call (the conditional rows compute twice this once).
                served = self._served()
        output = forward(*args, **kwargs)
        self._count(cut=False, computed=self._computing(served))
        if len(cond) == len(uncond):
            sample = _sample(output)
            self._store(context.slot, context, sample[uncond] - sample[cond])
        return output

    def _cond_rows_only(self, forward, args: tuple, kwargs: dict, context: CallContext, cond: list[int],
                        uncond: list[int], row_args: tuple[str, ...]):
        try:
            bound = self._signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            return None
        index = torch.tensor(cond, device=_sample(bound[self.target.spec.hidden_arg]).device)
        batch = context.batch_size
        cut = {name: select_rows(value, index, batch) if name in row_args else value for name, value in bound.items()}
        tracker = self.target.tracker
        tracker.current = dataclasses.replace(
            context, batch_size=len(cond), branches=tuple(context.branches[i] for i in cond), rows=tuple(cond),
            followers=tuple(uncond))
        try:
            return forward(**cut)
        finally:
            tracker.current = context

    def _store(self, slot: int, context: CallContext, difference: torch.Tensor) -> None:
        difference = difference.detach()
        self._shapes[slot] = tuple(difference.shape)
        if self.config.weighting == "frequency":
            spatial = to_grid(difference, context)
            if spatial is not None:
                spatial, layout = spatial
                mask = low_band_mask(spatial.shape[-2], spatial.shape[-1], self.config.cutoff, spatial.device)
                low, high = split_difference(spatial, mask)
                self._differences[slot] = _Difference(context.step, Bands(low, high, layout))
                return
            self._warn_flat(context)
        self._differences[slot] = _Difference(context.step, difference)

    def _warn_flat(self, context: CallContext) -> None:
        if not self._warned_flat:
            self._warned_flat = True
            warnings.warn(f"dit_accel cfg-cache: the {self.target.spec.family} output has no spatial grid to split "
                          "into frequency bands; the difference is added whole (weighting='plain')", UserWarning,
                          stacklevel=4)

    def _rebuilt(self) -> None:
        """Count one rebuilt unconditional output (``handle.stats.notes["cfg_cache.rebuilt"]``)."""
        self.acted()
        self.rebuilt += 1
        current = self.target.stats.current
        if current is not None:
            current.notes["cfg_cache.rebuilt"] = float(self.rebuilt)

    # ------------------------------------------------------------------------------------------ lifecycle
    def idle_reason(self, steps: int) -> str | None:
        config = self.config
        if self._unknown_roles:
            return ("it could not tell the conditional from the unconditional rows of the calls; declare how the "
                    "loop runs CFG with handle.begin(cfg=...)")
        if self._deferred:
            return ("another plugin calibrated in this generation (magcache's first run at a step count), which needs "
                    "every call whole; the next generations skip")
        if not self._saw_uncond:
            return ("no call of this generation ran classifier-free guidance (guidance off, a guidance-distilled "
                    "model, or true_cfg_scale <= 1): there is no unconditional branch to skip")
        if self.target.spec.row_args is None and self._batched_calls:
            return (f"the {self.target.spec.family} block contract does not say which forward arguments hold one "
                    "entry per row (TransformerSpec.row_args), so a call cannot run on its conditional rows alone")
        if not self._schedule(steps):
            return (f"its window start={config.start}, end={config.end} with interval={config.interval} holds no "
                    f"step of {steps} to skip; widen it")
        return super().idle_reason(steps)

    def reset(self) -> None:
        self._differences: dict[int, _Difference] = {}
        self._shapes: dict[int, tuple[int, ...]] = {}
        self._cond: tuple[int, Any, bool] | None = None
        # Computing calls cut since the last computing call of both branches; a generation opens with a refresh.
        self._cut_computing = max(self.config.interval - 1, 1)
        self._saw_uncond = False
        self._unknown_roles = False
        self._batched_calls = 0
        self._deferred = False
        self._warned_flat = getattr(self, "_warned_flat", False)
        self.rebuilt = 0

    def remove(self) -> None:
        detach(self.target.transformer, HOOK_NAME)
        self.reset()

    def cache_bytes(self) -> int:
        total = 0
        for difference in self._differences.values():
            value = difference.value
            tensors = [value] if isinstance(value, torch.Tensor) else [value.low, value.high]
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total
