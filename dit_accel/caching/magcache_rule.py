"""MagCache's skip rule and its config, as pure functions and data (the plugin that applies them is
:mod:`dit_accel.caching.magcache`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Mapping, Sequence

from dit_accel.caching.calibration import load_calibration, validate_calibration
from dit_accel.caching.forecasters import check_forecaster
from dit_accel.recipe import PluginConfig, check_bool, check_choice, check_range, register_config


# ------------------------------------------------------------------------------------------- pure functions
def retention_steps(retention: float, num_steps: int) -> int:
    """Steps at the start that always compute: ``int(retention * num_steps + 0.5)`` (MagCache's rounding)."""
    return int(retention * num_steps + 0.5)


def resample_ratios(ratios: Sequence[float], num_steps: int) -> list[float]:
    """A magnitude-ratio curve calibrated at ``M = len(ratios)`` steps, for a schedule of ``num_steps`` steps.

    The cumulative log magnitude ``L_i = sum_{j <= i} log gamma_j`` is placed at the normalised schedule position
    ``i / (M - 1)``, interpolated linearly at ``k / (N - 1)``, and differenced back: ``gamma'_k = exp(L'_k -
    L'_{k-1})``, ``gamma'_0 = gamma_0``. The curve is returned unchanged when ``M == N``; fewer, larger steps get
    proportionally larger ratios, and the product of the curve (the magnitude change over the whole schedule) is
    kept. (diffusers resamples by nearest index, which keeps per-step ratios of the calibration step size.)
    """
    ratios = [float(r) for r in ratios]
    if len(ratios) == num_steps:
        return ratios
    if num_steps == 1:
        return ratios[:1]
    logs = [0.0]
    for gamma in ratios[1:]:
        logs.append(logs[-1] + math.log(gamma))
    source = len(ratios) - 1
    resampled = []
    for k in range(num_steps):
        x = k / (num_steps - 1) * source
        i = min(int(x), source - 1)
        resampled.append(logs[i] + (logs[i + 1] - logs[i]) * (x - i))
    return [ratios[0]] + [math.exp(b - a) for a, b in zip(resampled, resampled[1:])]


def accumulate(ratio, error, count, gamma, threshold: float, max_skips: int):
    """One candidate step of MagCache's rule on the accumulators (floats, or tensors with one entry per row).

    Returns ``(skip, ratio, error, count)``: the state after adding ``gamma``; a step that computes restarts the
    accumulators at ``(1, 0, 0)`` instead (see :func:`skip_schedule`).
    """
    ratio = ratio * gamma
    count = count + 1
    error = error + abs(1.0 - ratio)
    skip = (error < threshold) & (count <= max_skips)
    return skip, ratio, error, count


def skip_schedule(ratios: Sequence[float], *, threshold: float, max_skips: int, retention: float = 0.2,
                  last_steps: int = 1) -> list[bool]:
    """Which steps of one branch skip, for a curve of ``len(ratios)`` steps (step 0 has nothing to reuse)."""
    num_steps = len(ratios)
    first = max(retention_steps(retention, num_steps), 1)
    state = (1.0, 0.0, 0)
    skips = []
    for step, gamma in enumerate(ratios):
        skip = False
        if first <= step < num_steps - last_steps:
            skip, *after = accumulate(*state, gamma, threshold, max_skips)
        state = tuple(after) if skip else (1.0, 0.0, 0)
        skips.append(bool(skip))
    return skips


def computed_steps(curves: Sequence[Sequence[float]], *, threshold: float, max_skips: int, retention: float = 0.2,
                   last_steps: int = 1) -> tuple[int, ...]:
    """The steps a call computes under the rule when its rows follow ``curves`` (one per row or branch role): a
    step computes where any curve's schedule computes. Its length keys the searched schedules of a calibration."""
    computed: set[int] = set()
    for curve in curves:
        skips = skip_schedule(curve, threshold=threshold, max_skips=max_skips, retention=retention,
                              last_steps=last_steps)
        computed.update(step for step, skip in enumerate(skips) if not skip)
    return tuple(sorted(computed))


# ------------------------------------------------------------------------------------------------- config
@register_config("magcache")
@dataclass(frozen=True)
class MagCacheConfig(PluginConfig):
    """MagCache: skip the whole block stack on steps chosen from a calibrated magnitude-ratio curve.

    Args:
        threshold (`float`, defaults to `0.06`): budget of the accumulated error ``sum |1 - prod gamma|`` since the
            last computed step; a step skips while the error stays below it (0 never skips). diffusers and the
            paper: 0.06 slow, 0.12-0.24 fast. Allowed: 0-100.
        max_skips (`int`, defaults to `3`): at most this many skipped steps in a row (the paper's K). Allowed:
            1-1000.
        retention (`float`, defaults to `0.2`): fraction of the first steps that always compute
            (``int(retention * steps + 0.5)`` steps; step 0 always computes). Allowed: 0-1.
        last_steps (`int`, defaults to `1`): final steps that always compute. Allowed: 0-1000.
        forecast_order (`int`, defaults to `1`): 0 reuses the residual of the last computed step (MagCache);
            1 forecasts it linearly over the timesteps of the last two computed steps; 2-4 higher-order Newton
            forecasts. Allowed: 0-4.
        forecaster (`str`, defaults to `"taylor"`): how a forecast is made from the computed steps (see
            :mod:`dit_accel.caching.forecasters`): ``"taylor"`` (Newton polynomial of the order), ``"hermite"``
            (HiCache's scaled Hermite forecast), ``"foca"`` (FoCa's predictor-corrector, first order).
        sigma (`float`, defaults to `0.5`): the Hermite forecaster's scale (HiCache's default; 1/sqrt(2) gives
            probabilists' Hermite, linear extrapolation at order 1). Allowed: 0.01-4.
        horizon (`float`, defaults to `1.0`): how far the forecast reaches, in gaps of the two newest computed steps
            past the newest one: beyond it the forecast holds its value (FoCa always; Taylor and Hermite with
            ``bounded_forecast``). Allowed: 0.1-100.
        bounded_forecast (`bool`, defaults to `True`): bound the Taylor/Hermite forecast by ``horizon``. Chosen on
            calibration seeds 100-103 (``benchmarks/results/magcache-calibration-cpu.md``): magcache-max +1.3 dB on
            zoo:dit and +4.0 dB on zoo:mmdit, magcache-ultra +3.3 / +1.0 dB, magcache +0.0 / +0.8 dB: the first
            skips after the dense warm-up extrapolate a slope measured over one step up to ``max_skips`` steps out.
            Version-1 recipe files (written before this field existed) load with False: what they meant.
        forecast_target (`str`, defaults to `"output"`): what a skipped call forecasts. ``"output"``: the call runs
            nothing and returns the forecast of the transformer's prediction over the slot's computed calls
            (:mod:`dit_accel.caching.output_forecast`; where that cannot apply, a call holding only some rows of
            its slot or sequence/patch parallelism, the call falls back to ``"residual"``). ``"residual"``:
            MagCache's way, the embeddings and final layers run around the forecast residual of the block stack
            (9-12 % of a bare call on the zoo models, ``call-cost-cpu.md``). Quality on calibration seeds 100-103
            (``magcache-calibration-cpu.md``), wall time in ``magcache-target-cpu.md``: better on both axes on
            zoo:dit; on zoo:mmdit 1.0 dB for 17 % at the ultra level, but 2.2 dB for 5 % at the max level (there
            ``"residual"`` is the better trade).
            Version-1 recipe files (written before this field existed) load with ``"residual"``: what they meant.
        forecast_space (`str`, defaults to `"auto"`): what the output target forecasts. ``"clean"``: the clean-sample
            estimate each computed prediction implies, turned back into a prediction at the skipped call's own input
            (:mod:`dit_accel.caching.prediction_space`: a data-prediction multistep step over the skipped span
            instead of an Adams-Bashforth one); needs the pipeline's scheduler to say what the model predicts (flow
            matching, or ``alphas_cumprod`` with ``prediction_type`` epsilon/v_prediction/sample), or a custom loop
            to declare it (``handle.generation(..., prediction="flow")``). ``"prediction"``: the prediction itself.
            ``"auto"``: ``"clean"`` where that is known, else ``"prediction"``. Chosen on calibration seeds 100-103
            (``magcache-space-cpu.md``). Version-2 files (written before this field existed) load with
            ``"prediction"``. Allowed: auto, clean, prediction (clean and prediction need the output target).
        ratios (`tuple[float, ...] | dict | str`, defaults to `()`): the calibration. Empty: calibrate
            automatically -- the first generation with a new number of steps runs dense and records one curve per
            branch role (``plugin.curves[steps][role]``; ``plugin.calibration(steps)`` exports it). A list: one
            curve (``gamma_0 = 1`` first) for every branch. A table ``{model, steps, curves = {cond = [...], ...}}``
            or the path of a JSON file holding one (written by ``ditaccel calibrate``, embedded by ``ditaccel
            tune``; a relative path in a recipe file is relative to that file; see ``caching.calibration``): per
            role curves from the first generation on. A curve measured at another step count is resampled
            (:func:`resample_ratios`) and one measured on another model is not used (the first generation
            recalibrates), each with a one-time warning. Allowed: empty, at least 2 finite positive numbers, such a
            table, or a path.
        schedule (`str`, defaults to `"auto"`): which steps compute. ``"rule"``: the rule above (threshold,
            max_skips, retention, last_steps). ``"auto"``: where the calibration in ``ratios`` holds a searched
            schedule (``ditaccel calibrate --search-schedule``, :mod:`dit_accel.caching.schedule_search`) with as
            many computed steps as the rule computes at its step count, those steps compute instead (the same
            budget, placed where a search on calibration generations found the smallest error); otherwise the rule.
            A generation with another number of steps than the calibration uses the rule. Version-3 files (written
            before this field existed) load with ``"rule"``. Allowed: auto, rule.
        recalibrate (`bool`, defaults to `True`): automatic calibration only. True: every new number of steps gets
            its own dense calibration run. False: only the first generation calibrates; later step counts
            interpolate the curve of the nearest calibrated step count over the normalised schedule position.
    """

    kind = "schedule"
    path_fields: ClassVar[tuple[str, ...]] = ("ratios",)  # resolved against the folder of the recipe file
    # 2: bounded_forecast and forecast_target, whose defaults changed what a version-1 file meant; 3: forecast_space;
    # 4: schedule.
    current_version: ClassVar[int] = 4
    version: int = 4
    threshold: float = 0.06
    max_skips: int = 3
    retention: float = 0.2
    last_steps: int = 1
    forecast_order: int = 1
    forecaster: str = "taylor"
    sigma: float = 0.5
    horizon: float = 1.0
    bounded_forecast: bool = True
    forecast_target: str = "output"
    forecast_space: str = "auto"
    ratios: tuple[float, ...] = ()
    schedule: str = "auto"
    recalibrate: bool = True

    @classmethod
    def migrate(cls, data: dict, version: int) -> dict:
        """Version 1 files predate ``bounded_forecast`` and ``forecast_target``: what they meant was the unbounded
        forecast of the block residual; version 2 files predate ``forecast_space``: the prediction was forecast;
        version 3 files predate ``schedule``: the rule decided (a file that names a field keeps its value)."""
        if version == 1:
            data = {"bounded_forecast": False, "forecast_target": "residual", **data, "version": 2}
            version = 2
        if version == 2:
            space = "prediction" if data.get("forecast_target", "output") == "output" else "auto"
            data = {"forecast_space": space, **data, "version": 3}
            version = 3
        if version == 3:
            data = {"schedule": "rule", **data, "version": 4}
        return data

    def rule_steps(self, curves: Sequence[Sequence[float]]) -> tuple[int, ...]:
        """The steps the rule computes for rows following ``curves`` (:func:`computed_steps`); its length keys the
        searched schedule that ``schedule = "auto"`` uses."""
        return computed_steps(curves, threshold=self.threshold, max_skips=self.max_skips, retention=self.retention,
                              last_steps=self.last_steps)

    def validate(self) -> None:
        check_range(self, "threshold", 0.0, 100.0)
        check_range(self, "max_skips", 1, 1000, integer=True)
        check_range(self, "retention", 0.0, 1.0)
        check_range(self, "last_steps", 0, 1000, integer=True)
        check_range(self, "forecast_order", 0, 4, integer=True)
        check_forecaster(self, "forecast_order")
        check_bool(self, "recalibrate")
        check_bool(self, "bounded_forecast")
        check_choice(self, "forecast_target", ("output", "residual"))
        check_choice(self, "forecast_space", ("auto", "clean", "prediction"))
        check_choice(self, "schedule", ("auto", "rule"))
        if self.forecast_space != "auto" and self.forecast_target != "output":
            raise ValueError(f"MagCacheConfig.forecast_space = {self.forecast_space!r} applies to forecast_target = "
                             f"'output' only (this config forecasts the {self.forecast_target}); use 'auto'")
        ratios = self.ratios
        if isinstance(ratios, (str, Path)):
            object.__setattr__(self, "ratios", load_calibration(ratios))
            return
        if isinstance(ratios, Mapping):
            object.__setattr__(self, "ratios", validate_calibration(ratios, where="MagCacheConfig.ratios"))
            return
        valid = isinstance(ratios, (tuple, list)) and all(
            isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r > 0 for r in ratios)
        if not valid or len(ratios) == 1:
            raise ValueError(
                f"MagCacheConfig.ratios = {ratios!r} is invalid; allowed: empty (calibrate automatically), a list "
                "of at least 2 finite positive magnitude ratios, one per calibration step (the first is 1.0), a "
                "calibration table {model, steps, curves} or the path of a calibration file"
            )
        object.__setattr__(self, "ratios", tuple(float(r) for r in ratios))
