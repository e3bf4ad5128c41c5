"""Alternatives to the turbo level that were tried and not taken, on CALIBRATION seeds 100-103 (8 images each).

1. More computed steps with most unconditional outputs rebuilt (zoo:dit, batched CFG, where a call on the
   conditional rows alone costs about two thirds of a whole call): ``magcache-ultra`` (14 computed steps) stacked
   with cfg-cache windows ``(start, interval)`` that rebuild enough steps for turbo's wall cost.
2. Other forecasters for ``magcache-turbo`` (zoo:dit and zoo:mmdit): Hermite at sigma 0.6-0.8 (order 1: the linear
   forecast with its slope scaled by 2 sigma^2), order 2, a longer horizon, no bound, plain reuse.
3. ``max_skips`` scaled with the step count (``max_skips * steps / 50``) for ultra and turbo at 20 and 28 steps.

Nothing was chosen from this run (the settings stayed); PSNR against dense pooled over all images, the worst
image, class consistency, the estimated FLOPs speedup.

    python benchmarks/turbo_alternatives_cpu.py -o benchmarks/results
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from calibration_runs import CountingPipeline, level_choice_setup, quality_of, save_results
from dit_accel import Recipe, accelerate_dit, load_recipe, remove_acceleration
from dit_accel.caching.cfg_cache import CFGCacheConfig
from dit_accel.pipelines import zoo
from dit_accel.pipelines.zoo.calibrations import with_shipped_calibration

SEEDS = tuple(range(100, 104))
IMAGES = 8
CFG_WINDOWS = [(0.05, 3), (0.05, 5), (0.05, 8), (0.1, 4), (0.2, 4), (0.2, 8), (0.05, 50)]
FORECASTS = [{}, {"forecaster": "hermite", "sigma": 0.6}, {"forecaster": "hermite", "sigma": 0.7},
             {"forecaster": "hermite", "sigma": 0.8}, {"forecast_order": 2}, {"horizon": 2.0},
             {"bounded_forecast": False}, {"forecast_order": 0}]


def with_magcache(recipe: Recipe, **changes) -> Recipe:
    return dataclasses.replace(recipe, plugins=(dataclasses.replace(recipe.plugins[0], **changes),)
                               + recipe.plugins[1:])


def main() -> None:
    args, results, labels = level_choice_setup(__doc__, SEEDS, IMAGES, 50)
    evaluator = zoo.evaluator()

    def measure(runner: CountingPipeline, recipe: Recipe, dense: torch.Tensor, steps: int) -> dict:
        runner.steps = steps
        handle = accelerate_dit(runner.pipe, recipe)
        images, fractions = [], []
        for seed in SEEDS:
            images.append(runner.generate(seed, IMAGES))
            fractions.append(handle.stats.flops_fraction)
        remove_acceleration(runner.pipe)
        return {"flops_speedup": len(fractions) / sum(fractions),
                **quality_of(torch.cat(images), dense, evaluator, labels)}

    for model in args.models:
        runner = CountingPipeline(model, 50)
        dense = {}

        def dense_at(steps: int) -> torch.Tensor:
            if steps not in dense:
                runner.steps = steps
                dense[steps] = torch.cat([runner.generate(seed, IMAGES) for seed in SEEDS])
            return dense[steps]

        results["dense"][model] = {"class_consistency": evaluator.class_consistency(dense_at(50), labels)}
        turbo = with_shipped_calibration(load_recipe("magcache-turbo"), model)[0]
        ultra = with_shipped_calibration(load_recipe("magcache-ultra"), model)[0]
        rows = []
        if model == "dit":
            rows.append(("cfg windows", "magcache-turbo", 50, turbo))
            for start, interval in CFG_WINDOWS:
                stacked = Recipe(plugins=ultra.plugins + (CFGCacheConfig(start=start, interval=interval),),
                                 name="magcache-ultra+cfg-cache")
                rows.append(("cfg windows", f"ultra + cfg-cache start={start} interval={interval}", 50, stacked))
        for changes in FORECASTS:
            label = ", ".join(f"{k}={v}" for k, v in changes.items()) or "as shipped"
            rows.append(("forecasters", f"magcache-turbo {label}", 50, with_magcache(turbo, **changes)))
        for steps in (20, 28):
            for name, recipe in (("magcache-ultra", ultra), ("magcache-turbo", turbo)):
                scaled = max(1, round(recipe.plugins[0].max_skips * steps / 50))
                rows.append(("max_skips scaled", f"{name} max_skips={recipe.plugins[0].max_skips}", steps, recipe))
                rows.append(("max_skips scaled", f"{name} max_skips={scaled}", steps,
                             with_magcache(recipe, max_skips=scaled)))
        for part, name, steps, recipe in rows:
            row = {"model": model, "part": part, "configuration": name, "steps": steps,
                   **measure(runner, recipe, dense_at(steps), steps)}
            results["rows"].setdefault(model, []).append(row)
            print(row, flush=True)
    save_results(results, args.out, "turbo-alternatives-cpu", write_markdown)


def write_markdown(results: dict, path: Path) -> None:
    meta = results["meta"]
    lines = ["# Alternatives to the turbo level, tried on calibration seeds and not taken (CPU)", "",
             f"`python benchmarks/turbo_alternatives_cpu.py -o benchmarks/results`; {meta['machine']}, torch "
             f"{meta['torch']}. Calibration seeds {meta['seeds'][0]}-{meta['seeds'][-1]} ({meta['images_per_seed']} "
             "images each; nothing here is a reported result and nothing was chosen from it), the shipped "
             "calibrations. PSNR against dense at the same step count, pooled; worst: the worst single image; cc: "
             "class consistency (dense: " + ", ".join(f"zoo:{m} {c['class_consistency']:.3f}"
                                                       for m, c in results["dense"].items()) + ").", "",
             "| model | part | configuration | steps | FLOPs × | PSNR dB | worst dB | cc |",
             "|---|---|---|---|---|---|---|---|"]
    for model, rows in results["rows"].items():
        lines += [f"| zoo:{model} | {r['part']} | {r['configuration']} | {r['steps']} | {r['flops_speedup']:.2f} | "
                  f"{r['psnr']:.2f} | {r['worst_image_psnr']:.2f} | {r['class_consistency']:.3f} |" for r in rows]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
