"""MagCache with a forecast, per branch and per row (after Ma et al., "MagCache: Fast Video Generation with
Magnitude-Aware Cache", 2025; diffusers' ``MagCacheConfig`` is the anchor).

The magnitude ratio of step ``t`` is ``gamma_t = mean|r_t| / mean|r_{t-1}|``, where ``r`` is the residual of the
whole block stack (output of the last block minus input of the first, hidden stream; for dual-stream models the
image stream), per sample row; ``gamma_0 = 1``. The curve barely depends on the prompt or the seed, so it is
calibrated once and the skip schedule is decided from it in advance: on each step after the retention window,
``acc_ratio *= gamma_t``, ``acc_steps += 1``, ``acc_err += |1 - acc_ratio|``; the step skips while
``acc_err < threshold`` and ``acc_steps <= max_skips``, otherwise it computes and the accumulators restart. A
skipped step computes nothing at all (no first block, unlike ``fbcache``): every block passes its input through and
the last one adds the residual. What we add to the anchor:

* the skipped residual is **forecast** (``forecast_order = 1``: the line through the last two computed residuals,
  over the transformer's timestep input, via :class:`~dit_accel.caching.blockrange.BlockRange`) instead of reused;
* curves and accumulators are **per branch**: per CFG role (``cond``/``uncond``; the slot where the role is unknown)
  and per sample row, never a shared batch mean;
* **automatic calibration**: with no ``ratios`` given, the first generation with a given number of steps runs dense
  and records the curve of each branch role; later generations use it (``plugin.calibrated``, ``plugin.curves``,
  and a one-time :class:`MagCacheCalibration` warning say so);
* a curve calibrated at ``M`` steps is used at ``N`` steps by interpolating its cumulative log magnitude over the
  normalised schedule position (:func:`resample_ratios`), which keeps the total magnitude change of the schedule.

Rows of one call are computed together, so a call skips only when every row's own curve allows it; when some row
must compute, the whole call computes and every row takes the fresh result (it costs nothing more) and restarts its
accumulators. Separate CFG calls (Flux, Wan, zoo:mmdit) are separate branches and skip independently.

Under sequence parallelism (``ulysses``/``ring``/``patch``) the calibration's magnitudes are all-reduced over the
ranks (:mod:`dit_accel.core.parallel`), so every rank holds the whole sequence's curve and skips the same steps.
"""

from __future__ import annotations

import logging
import warnings
from typing import Mapping

import torch

from dit_accel.caching.blockrange import BlockRange
from dit_accel.caching.calibration import CALIBRATION_FORMAT, model_identity
from dit_accel.caching.forecasters import config_forecaster
from dit_accel.caching.magcache_rule import (  # noqa: F401  (the public names of magcache, re-exported)
    MagCacheConfig,
    accumulate,
    computed_steps,
    resample_ratios,
    retention_steps,
    skip_schedule,
)
from dit_accel.caching.output_forecast import OutputForecast
from dit_accel.core.context import CallContext
from dit_accel.core.parallel import all_reduce_sum, parallel_setting
from dit_accel.core.plugin import Plugin, register_plugin

logger = logging.getLogger(__name__)


class MagCacheCalibration(UserWarning):
    """Issued once per step count: a generation runs dense to calibrate the magnitude-ratio curve."""


# ------------------------------------------------------------------------------------------------- plugin
def branch_key(context: CallContext, row: int) -> str:
    """The curve a row uses: its CFG role, or ``slot<k>`` where the pipeline's convention is unknown."""
    role = context.branches[row].role if row < len(context.branches) else None
    return role if role is not None else f"slot{context.slot}"


@register_plugin(MagCacheConfig)
class MagCachePlugin(Plugin):
    """State: ``curves`` (calibrated, kept across generations); per generation and slot the rows' curves and
    accumulators; ``decisions`` lists ``(step, slot, rows that could skip, whether the call skipped)`` for the
    candidate steps of the running generation, ``last_decisions`` those of the previous one."""

    kind = "schedule"
    skips_block_ranges = True  # refused where ControlNet adds residuals between blocks

    def install(self) -> None:
        if self.config.layers is not None:
            raise ValueError("magcache decides for the whole block stack; it does not take `layers`")
        blocks = self.target.spec.blocks(self.target.transformer)
        if not blocks:
            raise ValueError(f"magcache found no blocks in {type(self.target.transformer).__name__}")
        self.curves: dict[int, dict[str, tuple[float, ...]]] = {}
        self.schedules: dict[int, dict[str, tuple[int, ...]]] = {}  # searched, from the calibration in `ratios`
        self._identity: str | None = None
        self._warned: set = set()
        self.last_decisions: list[tuple[int, int, list[bool], bool]] = []
        self._mode: str | None = None
        self._magnitudes: dict[int, dict[int, torch.Tensor]] = {}
        self._keys: dict[int, tuple[str, ...]] = {}
        self.range = BlockRange(self.target, "dit_accel.magcache", self, 0, len(blocks),
                               forecast_order=self.config.forecast_order, forecaster=config_forecaster(self.config))
        self.whole_calls = None
        if self.config.forecast_target == "output":
            space = "prediction" if self.config.forecast_space == "prediction" else "clean"
            self.whole_calls = OutputForecast(self.target, "dit_accel.magcache.call", self,
                                              config_forecaster(self.config), self.range.sublayers, self.range.blocks,
                                              space=space)
        self._decided: tuple[tuple, bool] | None = None
        self.reset()

    @property
    def calibrated(self) -> bool:
        """Whether a curve is available (given in ``ratios`` or calibrated by an earlier generation)."""
        ratios = self.config.ratios
        if isinstance(ratios, Mapping):  # a calibration of another model is not used
            return bool(self.curves) or not ratios["model"] or ratios["model"] == self.model_identity()
        return bool(ratios) or bool(self.curves)

    def model_identity(self) -> str:
        """:func:`~dit_accel.caching.calibration.model_identity` of the transformer (computed once)."""
        if self._identity is None:
            self._identity = model_identity(self.target.transformer)
        return self._identity

    @property
    def calibrating(self) -> bool:
        """Whether the running generation is a dense calibration run."""
        return self._mode == "calibrate"

    # ------------------------------------------------------------------------------------- per generation
    def _warn_once(self, key, message: str, category=MagCacheCalibration) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, category, stacklevel=5)

    def _begin(self, context: CallContext) -> None:
        if self.config.forecast_space == "clean" and self.target.parameterization is None:
            # Checked per generation, not at install: a custom loop declares it with handle.generation(prediction=).
            raise ValueError(
                "magcache forecast_space = 'clean' needs to know what the model predicts, which dit_accel reads from "
                "the pipeline's scheduler (flow matching, or alphas_cumprod with prediction_type epsilon, "
                "v_prediction or sample); none is known for this generation (a transformer accelerated alone or an "
                "unknown scheduler): declare it with `handle.generation(..., prediction='flow' or a scheduler)`, or "
                "use forecast_space = 'auto' or 'prediction'")
        self._generation = context.generation
        steps = context.num_steps
        config = self.config
        if steps is None or steps < 2:
            self._mode = "dense"
            self._warn_once(("steps", steps), "dit_accel magcache: the number of steps of this generation is unknown "
                            "(the scheduler's set_timesteps was not seen: a custom loop?), so it runs dense; declare the loop with "
                            "`with handle.generation(num_steps=N):` (or handle.begin(num_steps=N))", UserWarning)
        elif steps in self.curves or (config.ratios and self._use_given(steps)):
            self._mode = "cache"
        elif self.curves and not config.recalibrate:
            nearest = min(self.curves, key=lambda m: (abs(m - steps), -m))
            self.curves[steps] = {key: tuple(resample_ratios(curve, steps))
                                  for key, curve in self.curves[nearest].items()}
            logger.info("magcache: curves for %d steps interpolated from the %d-step calibration", steps, nearest)
            self._mode = "cache"
        else:
            self._mode = "calibrate"
            self._calibration_steps = steps
            self._warn_once(("calibrate", steps), f"dit_accel magcache: no magnitude-ratio curve for {steps} steps "
                            "yet; this generation runs dense to calibrate one per branch, later generations with "
                            f"{steps} steps skip (pass `ratios` to skip from the first generation)")

    def _use_given(self, steps: int) -> bool:
        """Whether the ``ratios`` given serve a generation of ``steps`` steps (a calibration table is loaded into
        ``curves``); False for a calibration of another model (this generation calibrates anew). Says once when it
        resamples or refuses."""
        calibration = self.config.ratios
        if not isinstance(calibration, Mapping):
            if len(calibration) != steps:
                self._warn_once(("resample", steps), f"dit_accel magcache: `ratios` has {len(calibration)} entries, "
                                f"this generation {steps} steps: the curve is resampled", UserWarning)
            return True
        if calibration["model"] and calibration["model"] != self.model_identity():
            self._warn_once(("model", steps), f"dit_accel magcache: the calibration in `ratios` was measured on "
                            f"{calibration['model']}, this transformer is {self._identity}: it is not used, and this "
                            "generation runs dense to calibrate (write one for this model with `ditaccel calibrate`)",
                            UserWarning)
            return False
        if calibration["steps"] != steps:
            self._warn_once(("resample", steps), f"dit_accel magcache: the calibration in `ratios` is for "
                            f"{calibration['steps']} steps, this generation has {steps}: its curves are resampled"
                            + (" and the rule decides (its searched schedules hold for its own step count only)"
                               if calibration.get("schedules") and self.config.schedule == "auto" else ""),
                            UserWarning)
        self.curves[steps] = {role: tuple(resample_ratios(curve, steps)) for role, curve in calibration["curves"].items()}
        if calibration["steps"] == steps and calibration.get("schedules"):
            self.schedules[steps] = dict(calibration["schedules"])
        return True

    def model_changed(self) -> None:
        """Calibrated curves belong to the weights they were measured on: recalibrate after an adapter swap."""
        self.curves.clear()
        self.schedules.clear()
        self._identity = None
        self._warned = {key for key in self._warned if key[0] != "calibrate"}  # say so again when it recalibrates

    def idle_reason(self, steps: int) -> str | None:
        if self._mode in ("calibrate", "dense"):
            return None  # a calibration run or an unknown schedule: it warned when the generation began
        config = self.config
        return (f"its error budget threshold={config.threshold} was never within reach in {steps} steps "
                f"(retention={config.retention}, max_skips={config.max_skips}); raise threshold (magcache-fast: 0.1, "
                "magcache-max: 0.24) or lower retention")

    def calibration(self, steps: int) -> dict:
        """The calibrated curves for ``steps`` as a calibration table (see ``caching.calibration``)."""
        if steps not in self.curves:
            raise KeyError(f"magcache has no calibration for {steps} steps; calibrated: {sorted(self.curves)}")
        return {"format": CALIBRATION_FORMAT, "model": self.model_identity(), "steps": steps,
                "curves": {role: list(curve) for role, curve in self.curves[steps].items()}}

    def _curve(self, key: str, steps: int) -> tuple[float, ...]:
        if self.config.ratios and not isinstance(self.config.ratios, Mapping):
            return tuple(resample_ratios(self.config.ratios, steps))
        curves = self.curves[steps]
        if key in curves:
            return curves[key]
        self._warn_once(("key", key, steps), f"dit_accel magcache: no curve was calibrated for branch {key!r} at "
                        f"{steps} steps (calibrated: {', '.join(sorted(curves))}); it uses their mean", UserWarning)
        return tuple(sum(values) / len(values) for values in zip(*curves.values()))

    def _slot_state(self, context: CallContext, batch: int) -> dict:
        # Per row: its curve and accumulators (ratio, error, count) as Python floats: a few rows decided in Python
        # cost microseconds, tensor arithmetic per call cost a tenth of a skipped call.
        state = self._state.get(context.slot)
        if state is None or len(state["gamma"]) != batch:
            steps = context.num_steps
            state = self._state[context.slot] = {"gamma": [self._curve(branch_key(context, row), steps)
                                                           for row in range(batch)]}
            state["mask"] = self._searched_schedule(state["gamma"], steps)
            self._restart(state)
        return state

    def _searched_schedule(self, curves: list, steps: int) -> frozenset[int] | None:
        """The searched schedule replacing the rule's for rows with these curves (same count of computed steps),
        or None where the calibration holds none for that count (or ``schedule = "rule"``)."""
        searched = self.schedules.get(steps)
        if self.config.schedule != "auto" or not searched:
            return None
        count = len(self.config.rule_steps(curves))
        schedule = searched.get(str(count))
        if schedule is None:
            if ("schedule", steps, count) not in self._warned:  # said once: the same for every slot and generation
                self._warned.add(("schedule", steps, count))
                logger.info("magcache: the calibration has searched schedules for %s computed steps, the rule "
                            "computes %d: the rule decides", ", ".join(sorted(searched, key=int)), count)
            return None
        return frozenset(schedule)

    @staticmethod
    def _restart(state: dict) -> None:
        state["acc"] = [(1.0, 0.0, 0)] * len(state["gamma"])

    def check_companions(self, plugins: list[Plugin]) -> None:
        # The first moment every plugin is installed: the whole-call hook must wrap their transformer-level hooks.
        if self.whole_calls is not None:
            self.whole_calls.attach()

    def needs_whole_calls(self) -> bool:
        return self._mode == "calibrate"

    # ----------------------------------------------------------------------------------- RangePolicy
    def decide(self, context: CallContext, hidden: torch.Tensor | None, encoder) -> bool:
        # Asked at the call (whole-call skipping) and again at the first block when the call runs, where cfg-cache
        # may have cut the call to its conditional rows: one answer per call.
        key = (context.generation, context.step, context.slot)
        if self._decided is not None and self._decided[0] == key:
            return self._decided[1]
        skip = self._decide(context, context.batch_size if hidden is None else hidden.shape[0])
        self._decided = (key, skip)
        return skip

    def _decide(self, context: CallContext, batch: int) -> bool:
        if context.generation != self._generation:
            self._begin(context)
        if self._mode != "cache":
            if self._mode == "calibrate":
                self._keys[context.slot] = tuple(branch_key(context, row) for row in range(batch))
            return False
        config, steps, step = self.config, context.num_steps, context.step
        full = self._state.get(context.slot)
        if context.rows is not None and full is not None and max(context.rows) < len(full["gamma"]):
            # A call on some rows of the slot (cfg-cache): the accumulators of those rows and of their followers
            # (which take their partner's fresh residual when it computes), written back after.
            index = list(context.rows + (context.followers or ()))
            state = {"gamma": [full["gamma"][i] for i in index], "acc": [full["acc"][i] for i in index],
                     "last": full.get("last"), "mask": full.get("mask")}
        else:
            index, state = None, self._slot_state(context, batch)
        if state.get("mask") is not None:  # a searched schedule: no accumulators
            # A step of the schedule this slot was not called at (cfg-cache answered its unconditional call before
            # the blocks, where magcache skips only the block stack) is computed at the slot's next call instead
            # of forecasting past it.
            last, mask = state.get("last"), state["mask"]
            missed = last is not None and any(s in mask for s in range(last + 1, step))
            (full if index is not None else state)["last"] = step
            skip = (step not in mask and not missed and self.target.in_scope(config, context)
                    and context.slot in self.range.residuals)
            self.decisions.append((step, context.slot, [skip] * batch, skip))
            return skip
        first = max(retention_steps(config.retention, steps), 1)
        threshold, max_skips = config.threshold, config.max_skips
        # Steps this slot was not called at (cfg-cache rebuilt the unconditional call) still add their error.
        last = state.get("last")
        for missed in range(max(first, last + 1), min(step, steps)) if last is not None else ():
            state["acc"] = [accumulate(*acc, gamma[missed], threshold, max_skips)[1:]
                            for acc, gamma in zip(state["acc"], state["gamma"])]
        state["last"] = step
        skip = False
        if not first <= step < steps - config.last_steps or not self.target.in_scope(config, context):
            self._restart(state)
        else:
            results = [accumulate(*acc, gamma[step], threshold, max_skips)
                       for acc, gamma in zip(state["acc"], state["gamma"])]
            rows = [bool(result[0]) for result in results[:batch]]  # the call's own rows decide; followers go along
            skip = all(rows) and context.slot in self.range.residuals
            if skip:
                state["acc"] = [result[1:] for result in results]
            else:
                self._restart(state)
            self.decisions.append((step, context.slot, rows, skip))
        if index is not None:
            for i, acc in zip(index, state["acc"]):
                full["acc"][i] = acc
            full["last"] = step
        return skip  # the whole call skips or computes

    def computed(self, context: CallContext, rows: torch.Tensor) -> None:
        if self._mode != "calibrate":
            return
        residual = self.range.residuals[context.slot][0].float()
        dims = tuple(range(1, residual.ndim))
        count = torch.full((residual.shape[0],), float(residual[0].numel()), device=residual.device)
        both = torch.stack([residual.abs().sum(dims), count])
        # Every rank calibrates the same curve from the whole sequence (the decisions follow from the curve alone).
        all_reduce_sum(both, parallel_setting(self.target.transformer))
        magnitude = (both[0] / both[1]).double().cpu()
        self._magnitudes.setdefault(context.slot, {})[context.step] = magnitude

    # ------------------------------------------------------------------------------------- calibration
    def _finish_calibration(self) -> None:
        if self._mode != "calibrate" or not self._magnitudes:
            return
        steps = self._calibration_steps
        by_key: dict[str, list[list[float]]] = {}
        for slot, recorded in self._magnitudes.items():
            if sorted(recorded) != list(range(steps)):
                logger.info("magcache: calibration of slot %d is incomplete (%d of %d steps); discarded", slot,
                            len(recorded), steps)
                self._warned.discard(("calibrate", steps))  # the next attempt says so again
                return
            magnitudes = torch.stack([recorded[s] for s in range(steps)])  # (steps, rows)
            previous = magnitudes[:-1]
            ratios = torch.where(previous > 0, magnitudes[1:] / previous.clamp_min(1e-30), torch.ones_like(previous))
            ratios = torch.cat([torch.ones_like(magnitudes[:1]), ratios])
            for row, key in enumerate(self._keys.get(slot, ())):
                by_key.setdefault(key, []).append(ratios[:, row].tolist())
        self.curves[steps] = {key: tuple(sum(values) / len(values) for values in zip(*curves))
                              for key, curves in by_key.items()}
        logger.info("magcache: calibrated %d-step curves for %s", steps, ", ".join(sorted(by_key)))

    # ------------------------------------------------------------------------------------------ lifecycle
    def reset(self) -> None:
        self._finish_calibration()
        if getattr(self, "decisions", None):
            self.last_decisions = self.decisions
        self._mode = None
        self._generation = None
        self._calibration_steps = None
        self._magnitudes = {}
        self._keys = {}
        self._state: dict[int, dict] = {}
        self.decisions: list[tuple[int, int, list[bool], bool]] = []
        self._decided = None
        self.range.clear()
        if self.whole_calls is not None:
            self.whole_calls.clear()

    def remove(self) -> None:
        self.range.remove()
        if self.whole_calls is not None:
            self.whole_calls.remove()

    def cache_bytes(self) -> int:
        return self.range.nbytes() + (self.whole_calls.nbytes() if self.whole_calls is not None else 0)
