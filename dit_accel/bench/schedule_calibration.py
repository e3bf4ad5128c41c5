"""Searching magcache's computed-step schedule on a pipeline (``ditaccel calibrate --search-schedule``).

The score of a schedule is the PSNR, pooled over every image, of calibration generations with the recipe forced onto
that schedule against the same generations run dense; the search itself is
:func:`dit_accel.caching.schedule_search.search_schedule`. Use calibration prompts and seeds, never the ones you
report on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from dit_accel.bench.metrics import psnr
from dit_accel.caching.calibration import validate_calibration
from dit_accel.caching.magcache_rule import MagCacheConfig
from dit_accel.caching.schedule_search import Schedule, ScheduleSearch, search_schedule
from dit_accel.recipe import Recipe


def _pixels(output: Any) -> torch.Tensor:
    """An image or video pipeline's output as one float tensor (``output_type="pt"`` or ``"np"``)."""
    pixels = getattr(output, "images", None)
    if pixels is None:
        pixels = getattr(output, "frames", None)
    if pixels is None or isinstance(pixels, list):
        raise ValueError("the calibration generations must return tensors or arrays: call the pipeline with "
                         "output_type='pt' (or 'np')")
    return torch.as_tensor(pixels).float()


def magcache_config(recipe: Recipe) -> MagCacheConfig:
    """The one magcache plugin of ``recipe``; ``ValueError`` if it has none or several."""
    found = [p for p in recipe.plugins if isinstance(p, MagCacheConfig)]
    if len(found) != 1:
        raise ValueError(f"searching a schedule needs a recipe with exactly one magcache plugin; {recipe.name!r} "
                         f"has {len(found)}")
    return found[0]


def rule_schedule(recipe: Recipe, calibration: Mapping[str, Any]) -> Schedule:
    """The steps the recipe's magcache rule computes on ``calibration``'s curves (every role's union)."""
    return magcache_config(recipe).rule_steps(list(calibration["curves"].values()))


@dataclass(frozen=True)
class ScheduleCalibration:
    """What :func:`search_magcache_schedule` did: the ``search``, and on the held-out generations the PSNR of the
    rule's schedule and of the one found (``None`` without held-out generations); ``kept`` says whether the found
    schedule was stored."""

    search: ScheduleSearch
    holdout_rule: float | None
    holdout_found: float | None
    kept: bool


def search_magcache_schedule(pipe: Any, recipe: Recipe, calibration: Mapping[str, Any],
                             calls: Sequence[Callable[[], dict]], *, holdout: Sequence[Callable[[], dict]] = (),
                             min_holdout_gain: float = 0.5, moves: Sequence[int] = (-2, -1, 1, 2),
                             sweeps: int = 3, min_gain: float = 0.05,
                             progress: Callable[[Schedule, float], None] | None = None
                             ) -> tuple[dict[str, Any], ScheduleCalibration]:
    """Search where the recipe's budget of computed steps goes, on ``pipe`` (not accelerated).

    Args:
        recipe: a recipe with one magcache plugin; its rule on ``calibration`` gives the budget and the start.
        calibration: the model's magcache calibration (``ditaccel calibrate``), at the step count of ``calls``.
        calls: one function per calibration generation returning the keyword arguments of ``pipe(...)``
            (``output_type="pt"``, a fresh seeded generator each time). Recommended: 3 generations of 10 images.
        holdout (defaults to none): further calibration generations (other seeds) that only judge the result: the
            schedule found is stored only if its PSNR there beats the rule's by ``min_holdout_gain`` dB; otherwise
            the rule keeps the budget (a search over a few images can fit them and lose elsewhere). Recommended:
            as many as ``calls``.
        min_holdout_gain (defaults to ``0.5``): the held-out gain in dB that keeps the schedule found.
        moves, sweeps, min_gain: as :func:`~dit_accel.caching.schedule_search.search_schedule`.
        progress: called with every evaluated schedule and its score (the search's, not the held-out ones).

    Returns the calibration with the schedule found in its ``schedules`` under its count of computed steps (other
    counts kept; that count removed when the held-out check rejects it), and what was done.
    """
    from dit_accel import accelerate_dit, remove_acceleration
    from dit_accel.caching.magcache import MagCachePlugin

    calibration = validate_calibration(calibration)
    start = rule_schedule(recipe, calibration)
    count = len(start)

    def scorer(generations: Sequence[Callable[[], dict]]) -> Callable[[Schedule], float]:
        dense = torch.cat([_pixels(pipe(**call())) for call in generations])

        def score(schedule: Schedule) -> float:
            table = dict(calibration, schedules={**calibration.get("schedules", {}), str(count): schedule})
            handle = accelerate_dit(pipe, recipe.with_overrides(magcache__ratios=table, magcache__schedule="auto"))
            try:
                images = torch.cat([_pixels(pipe(**call())) for call in generations])
                used = [p for acc in handle.transformers for p in acc.plugins if isinstance(p, MagCachePlugin)]
                if not any(p.schedules.get(calibration["steps"]) for p in used):
                    raise RuntimeError("the searched schedule was not used: do the calibration generations run "
                                       f"{calibration['steps']} steps on the calibrated model?")
            finally:
                remove_acceleration(pipe)
            return psnr(images, dense)

        return score

    search_score = scorer(calls)

    def score(schedule: Schedule) -> float:
        value = search_score(schedule)
        if progress is not None:
            progress(schedule, value)
        return value

    found = search_schedule(score, start, calibration["steps"], moves=moves, sweeps=sweeps, min_gain=min_gain)
    holdout_rule = holdout_found = None
    kept = True
    if holdout:
        judge = scorer(holdout)
        holdout_rule = judge(found.start)
        holdout_found = holdout_rule if found.schedule == found.start else judge(found.schedule)
        kept = holdout_found >= holdout_rule + min_holdout_gain
    schedules = {key: value for key, value in calibration.get("schedules", {}).items() if key != str(count)}
    if kept:
        schedules[str(count)] = found.schedule
    result = {key: value for key, value in calibration.items() if key != "schedules"}
    if schedules:
        result["schedules"] = schedules
    return validate_calibration(result), ScheduleCalibration(found, holdout_rule, holdout_found, kept)


def with_searched_schedule(pipe: Any, recipe: Recipe, steps: int, calls: Sequence[Callable[[], dict]],
                           holdout: Sequence[Callable[[], dict]], log: Callable[[str], None] = print) -> Recipe:
    """``recipe`` with the schedule :func:`search_magcache_schedule` finds for its magcache plugin added to that
    plugin's embedded calibration (a table in ``ratios`` at ``steps`` steps, as ``ditaccel tune`` writes it) when the
    held-out generations keep it; otherwise ``recipe`` as it is. ``log`` says which, or why nothing was searched
    (no single magcache plugin, no embedded calibration of ``steps`` steps)."""
    found = [p for p in recipe.plugins if isinstance(p, MagCacheConfig)]
    if len(found) != 1:
        log(f"schedule search: {recipe.name} has {len(found)} magcache plugins, not one: nothing searched")
        return recipe
    calibration = found[0].ratios
    if not isinstance(calibration, Mapping) or calibration.get("steps") != steps:
        log(f"schedule search: {recipe.name}'s magcache holds no calibration table of {steps} steps: nothing "
            "searched")
        return recipe
    table, done = search_magcache_schedule(pipe, recipe, calibration, calls, holdout=holdout)
    search = done.search
    verdict = ("kept" if done.kept else "not kept (under 0.5 dB better), the rule keeps the budget")
    log(f"schedule search: {len(search.schedule)} computed steps at {list(search.schedule)}, {search.score:.2f} dB "
        f"against the rule's {search.start_score:.2f} on the search images; held out {done.holdout_found:.2f} "
        f"against {done.holdout_rule:.2f}: {verdict}")
    if not done.kept:
        return recipe
    return recipe.with_overrides(magcache__ratios=table)


def searched_on_session(recipe: Recipe, session: Any, log: Callable[[str], None] = print) -> Recipe:
    """:func:`with_searched_schedule` on a benchmark session's calibration chunks (``ditaccel tune``), judged on as
    many chunks on the seeds after them."""
    chunks = session.chunks()
    calls = [lambda c=c: session.kwargs(*c) for c in chunks]
    holdout = [lambda c=c: session.kwargs(c[0], c[1] + len(chunks), c[2]) for c in chunks]
    with torch.inference_mode():
        return with_searched_schedule(session.pipe, recipe, session.steps, calls, holdout, log)
