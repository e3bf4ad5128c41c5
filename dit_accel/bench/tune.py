"""``ditaccel tune``: the fastest setting of some recipes that meets a quality target, written as a TOML recipe.

The search, per recipe: each plugin's speed knob (:data:`~dit_accel.bench.tune_space.KNOBS`: FORA/TaylorSeer/ToCa/Δ-DiT ``interval``, the
first-block cache's and magcache's ``threshold``, ToDo's ``factor``, CFG sharing's ``start``) on a coarse grid, most conservative
first; then, between the most aggressive value that met the target and the next one that did not, the values in
between (integers) or two bisections (floats). Recipes with several knobs try the product of the coarse grids.
Then, for per-layer plugins (FORA, TaylorSeer, ToCa, ToDo), a per-layer plan in DiTFastAttn's greedy style
(:mod:`dit_accel.bench.layer_plan`): the first value that missed the target runs on the blocks that tolerate it,
chosen greedily from the least sensitive, the best uniform value on the rest.
Every candidate generates the calibration samples (seeds ``seed + k``) and is scored against the dense output of
the same seeds (PSNR, SSIM, relative L1; on zoo models also fd and class consistency). The winner is the candidate
that meets the target with the lowest measured wall time of its calibration pass (times within 5 % of the fastest
count as equal), then the lowest FLOPs fraction (dit_accel's estimate), then the best quality. It is saved with
``Recipe.save`` (load it with ``--recipe path.toml``) and measured again on held-out seeds, which the search never
saw, where its wall speedup is also timed against dense runs interleaved with it. TaylorSeer's ``order`` and magcache's ``forecast_order`` are searched as an outer loop around the speed
knob; fields the user sets (``taylorseer@order=2``) are never searched.
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from dit_accel.bench.distributed import launched_distributed
from dit_accel.bench.layer_plan import PER_LAYER_TYPES, greedy_layer_plan, split_recipe, transformer_blocks
from dit_accel.bench.quality import Quality, fidelity
from dit_accel.bench.runner import RecipeToggle, Session, noisy_timing_notes
from dit_accel.bench.tune_space import (KNOBS, METRICS, SECONDARY_KNOBS, ZOO_ONLY_METRICS, Candidate, Target,
                                         TuneResult, _between, knobs_of)

HOLDOUT_OFFSET = 1000
MAX_COMBINATIONS = 24
WALL_TIE = 0.05  # calibration-pass wall times within 5 % of the fastest are a tie (then FLOPs decide)


class Tuner:
    def __init__(self, session: Session, quality: Quality, target: Target, budget_s: float,
                 log: Callable[[str], None] = print, per_layer: bool = True) -> None:
        self.session, self.quality, self.target, self.log = session, quality, target, log
        self.per_layer = per_layer
        self.deadline = time.monotonic() + budget_s
        self.dense, self.conditioning, _ = session.quality_pass()
        self.candidates: list[Candidate] = []
        self.exhausted = False
        self.on_candidate: Callable[[Candidate], None] | None = None

    def evaluate(self, recipe: Any, settings: dict[str, Any], prepared: Any = None) -> Candidate | None:
        """Measure ``recipe`` with ``settings`` as overrides (or the ``prepared`` recipe, ``settings`` then only
        describing it); None once the budget is spent."""
        if time.monotonic() > self.deadline:
            self.exhausted = True
            return None
        candidate = Candidate(prepared if prepared is not None else recipe.with_overrides(**settings), settings)
        toggle = RecipeToggle(self.session, candidate.recipe)
        toggle.enable()
        try:
            start = time.perf_counter()
            images, _, fractions = self.session.quality_pass(
                after_chunk=lambda: toggle.handles[-1].stats.flops_fraction if toggle.handles[-1].stats else 1.0)
            candidate.seconds = time.perf_counter() - start
        finally:
            toggle.disable()
        candidate.flops_fraction = sum(fractions) / len(fractions) if fractions else 1.0
        candidate.metrics = score(images, self.dense, self.conditioning, self.quality)
        self.candidates.append(candidate)
        verdict = "meets" if self.target.met(candidate.metrics) else "misses"
        self.log(f"  {candidate.describe()}: {candidate.seconds:.2f} s, FLOPs {candidate.flops_fraction:.3f} of "
                 f"dense, {self.target.metric} {candidate.metrics.get(self.target.metric, float('nan')):.4g} -> "
                 f"{verdict} {self.target}")
        if self.on_candidate is not None:
            self.on_candidate(candidate)
        return candidate

    def search(self, recipe: Any, steps: int, fixed: frozenset[str] = frozenset()) -> None:
        """Search ``recipe``'s knobs; fields in ``fixed`` (set by the user, ``name@field=value``) are never
        searched."""
        knobs = [(key, [v for v in grid if not (key.endswith("interval") and v > steps)] or grid[:1])
                 for key, grid in knobs_of(recipe) if key.rpartition("__")[2] not in fixed]
        if not knobs:
            self.log(f"  {recipe.name}: no tunable field (known: {', '.join(KNOBS)}); measured as is")
            self.evaluate(recipe, {})
            return
        if len(knobs) > 1:  # a product of coarse grids, no refinement
            keys = [k for k, _ in knobs]
            for values in itertools.islice(itertools.product(*(g for _, g in knobs)), MAX_COMBINATIONS):
                if self.evaluate(recipe, dict(zip(keys, values))) is None:
                    return
            return
        key, grid = knobs[0]
        plugin = next(p for p in recipe.plugins if p.type_name in KNOBS)
        outer = [{}]
        if plugin.type_name in SECONDARY_KNOBS and SECONDARY_KNOBS[plugin.type_name][0] not in fixed:
            name, values = SECONDARY_KNOBS[plugin.type_name]
            outer = [{name: value} for value in values]
        for settings in outer:
            if self.exhausted:
                return
            passed, missed = self.uniform_search(recipe, key, grid, settings)
            if self.per_layer and not self.exhausted:
                self.layer_stage(recipe, key, grid, passed, missed, settings)

    def uniform_search(self, recipe: Any, key: str, grid: list[Any], settings: dict[str, Any] | None = None
                       ) -> tuple[list[Any], list[Any]]:
        """One knob over all layers (other fields as in ``settings``); returns the values that met and missed the
        target."""
        passed: list[Any] = []
        missed: list[Any] = []
        settings = settings or {}

        def measure(value: Any) -> bool | None:
            candidate = self.evaluate(recipe, {**settings, key: value})
            if candidate is None:
                return None
            met = self.target.met(candidate.metrics)
            (passed if met else missed).append(value)
            return met

        best_index = None
        for index, value in enumerate(grid):  # coarse: conservative -> aggressive, stop at the second miss
            met = measure(value)
            if met is None:
                return passed, missed
            if met:
                best_index = index
            elif best_index is not None or index >= 1:
                break
        if best_index is None or best_index + 1 >= len(grid):
            return passed, missed
        for value in _between(grid[best_index], grid[best_index + 1]):  # fine: between the last pass and the miss
            if not measure(value):
                break
        return passed, missed

    def layer_stage(self, recipe: Any, key: str, grid: list[Any], passed: list[Any], missed: list[Any],
                    settings: dict[str, Any] | None = None) -> None:
        """The per-layer plan (:mod:`dit_accel.bench.layer_plan`): the first missing value on the least sensitive
        blocks, the best uniform value on the others (other fields as in ``settings``)."""
        settings = settings or {}
        recipe = recipe.with_overrides(**settings) if settings else recipe
        index = next(i for i, p in enumerate(recipe.plugins) if p.type_name in KNOBS)
        plugin = recipe.plugins[index]
        if plugin.type_name not in PER_LAYER_TYPES or plugin.layers is not None:
            return
        blocks = transformer_blocks(self.session.pipe)
        if len(blocks) < 2:
            return
        field_name = KNOBS[plugin.type_name][0]
        ascending = grid[-1] > grid[0]

        def rank(value: Any) -> Any:
            return value if ascending else -value

        base = max(passed, key=rank) if passed else None
        faster = [v for v in missed if base is None or rank(v) > rank(base)]
        if not faster:
            return
        fast = min(faster, key=rank)
        sign = -1 if METRICS[self.target.metric] == "higher" else 1
        self.log(f"  per-layer plan: {field_name}={fast} on the blocks that tolerate it, "
                 + (f"{field_name}={base} elsewhere" if base is not None else "exact elsewhere"))

        def plan(chosen: list[str]) -> Candidate | None:
            described = {**settings, field_name: base if base is not None else "exact", f"fast_{field_name}": fast,
                         "fast_blocks": ",".join(chosen)}
            return self.evaluate(recipe, described, split_recipe(recipe, index, field_name, base, fast, chosen, blocks))

        def single(block: str) -> float | None:
            candidate = plan([block])
            if candidate is None or not self.target.met(candidate.metrics):
                return None
            return sign * candidate.metrics[self.target.metric]

        def accepts(chosen: list[str]) -> bool | None:
            candidate = plan(chosen)
            return None if candidate is None else self.target.met(candidate.metrics)

        greedy_layer_plan(blocks, single, accepts)

    def best(self) -> Candidate | None:
        """The fastest candidate meeting the target by measured wall time of its calibration pass; candidates
        within :data:`WALL_TIE` of the fastest count as equally fast and are ranked by FLOPs fraction, then quality.
        (FLOPs alone misleads: a forecast or a cache costs time the FLOPs estimate does not see.)"""
        passing = [c for c in self.candidates if self.target.met(c.metrics)]
        if not passing:
            return None
        fastest = min(c.seconds for c in passing)
        tied = [c for c in passing if c.seconds <= fastest * (1 + WALL_TIE)]
        sign = -1 if METRICS[self.target.metric] == "higher" else 1
        return min(tied, key=lambda c: (round(c.flops_fraction, 3), sign * c.metrics[self.target.metric]))


def with_calibrations(recipe: Any, session: Session) -> Any:
    """``recipe`` with the curves its self-calibrating plugins measure (one untimed generation on calibration
    seeds) written into it, so that a fresh process loading the file skips from its first generation."""
    from dit_accel.caching.calibration import embed_calibrations

    toggle = RecipeToggle(session, recipe)
    toggle.enable()
    try:
        return embed_calibrations(recipe, toggle.handles[-1])
    finally:
        toggle.disable()


def score(images: torch.Tensor, dense: torch.Tensor, conditioning: dict, quality: Quality) -> dict[str, Any]:
    metrics = fidelity(images, dense)
    metrics.update(quality.measure(images, dense, conditioning, []))
    return metrics


def tune(pipe: Any, spec: str, family: str, recipes: list[Any], target: Target, *, steps: int, num_samples: int,
         seed: int, batch: int, budget_minutes: float, output: Path, guidance_scale: float | None = None,
         device: torch.device | None = None, holdout_seed: int | None = None,
         log: Callable[[str], None] = print, per_layer: bool = True, fixed: list[frozenset[str]] | None = None,
         repeats: int = 3, progress: bool = False, search_schedule: bool = False) -> TuneResult:
    """Search, save the winner to ``output`` (a .toml recipe), and re-measure it on held-out seeds: quality, FLOPs,
    and wall/transformer speedup from ``repeats`` timed runs interleaved with dense ones.

    ``fixed[i]``: the fields of ``recipes[i]`` the user set (``name@field=value``), never searched. ``progress``:
    a bar on stderr over the time budget, with the best candidate so far. ``search_schedule``: where the winner has
    one magcache plugin, also search where its computed steps go (:func:`~dit_accel.bench.schedule_calibration.
    with_searched_schedule`) on the calibration seeds, judged on the seeds after them (never the held-out ones)."""
    from dit_accel import load_recipe
    from dit_accel.recipe import Recipe

    if launched_distributed():
        raise ValueError("ditaccel tune runs in one process (its search is sequential); launch it without "
                         "torchrun/accelerate. `ditaccel bench` is the command that runs data-parallel")
    from dit_accel.pipelines.zoo import EVALUATION_ONLY

    if spec.startswith("zoo:") and spec[4:] in EVALUATION_ONLY:
        raise ValueError(f"{spec} is the evaluation-only model: nothing is tuned on it, so that what is reported on "
                         "it was not chosen on it; tune on zoo:dit or zoo:mmdit (or your own model)")
    if target.metric in ZOO_ONLY_METRICS and not spec.startswith("zoo:"):
        raise ValueError(f"--target {target}: {target.metric} is measured on zoo models only; use psnr, ssim or "
                         "rel_l1")
    device = device or torch.device("cpu")
    session = Session(pipe, spec, family, steps=steps, num_samples=num_samples, seed=seed, batch=batch,
                      guidance_scale=guidance_scale, device=device)
    try:
        quality = Quality(spec, num_samples)
        log(f"calibration: {num_samples} samples on seeds {[s for _, s, _ in session.chunks()]}, {steps} steps")
        bar = tqdm(total=round(budget_minutes * 60), desc="tune", unit="s", file=sys.stderr, disable=not progress,
                   bar_format="{desc}: {percentage:3.0f}% of the budget |{bar}| {n}/{total} s{postfix}")
        if progress:
            log = lambda message, log=log: bar.write(message, file=sys.stdout)  # noqa: E731 - keeps the bar below
        tuner = Tuner(session, quality, target, budget_minutes * 60, log, per_layer=per_layer)
        started = time.monotonic()

        def advance(_: Candidate) -> None:
            bar.n = min(bar.total, round(time.monotonic() - started))
            best = tuner.best()
            bar.set_postfix_str(f"{len(tuner.candidates)} tried, best {best.describe()}" if best else
                                f"{len(tuner.candidates)} tried, none meets {target} yet")

        tuner.on_candidate = advance
        for index, recipe in enumerate(recipes):
            log(f"{recipe.name}:")
            tuner.search(recipe, steps, fixed[index] if fixed else frozenset())
            if tuner.exhausted:
                log(f"budget of {budget_minutes:g} min spent: search stopped")
                break
        bar.close()
        result = TuneResult(target, tuner.best(), tuner.candidates, budget_exhausted=tuner.exhausted)
        if result.best is None:
            return result
        best = result.best
        settings = ", ".join(f"{k}={v}" for k, v in best.settings.items()) or "as shipped"
        tuned = Recipe(plugins=best.recipe.plugins, name=f"{best.recipe.name}-tuned",
                       description=f"{best.recipe.name} tuned by ditaccel tune for {target} on {spec} at {steps} steps "
                       f"({settings}; FLOPs {best.flops_fraction:.3f} of dense on calibration seeds)")
        tuned = with_calibrations(tuned, session)
        if search_schedule:
            from dit_accel.bench.schedule_calibration import searched_on_session

            tuned = searched_on_session(tuned, session, log)
        tuned.save(output)
        result.recipe = load_recipe(str(output))  # what the user will load, checked
        session.seed = holdout_seed if holdout_seed is not None else seed + HOLDOUT_OFFSET
        dense, conditioning, _ = session.quality_pass()
        toggle = RecipeToggle(session, result.recipe)
        toggle.enable()
        try:
            images, _, fractions = session.quality_pass(after_chunk=lambda: toggle.handles[-1].stats.flops_fraction)
        finally:
            toggle.disable()
        result.holdout = score(images, dense, conditioning, quality)
        result.holdout["flops_fraction"] = sum(fractions) / len(fractions)
        result.holdout["seeds"] = [s for _, s, _ in session.chunks()]
        timing = session.side_by_side(repeats, toggle.enable, toggle.disable)
        result.holdout.update(wall_speedup=timing["wall_speedup"], transformer_speedup=timing["transformer_speedup"],
                              timed_runs=repeats, timing_notes=noisy_timing_notes(timing))
        return result
    finally:
        session.close()
