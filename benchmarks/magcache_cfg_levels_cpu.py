"""How magcache-cfg-turbo's cfg-cache window was chosen, on CALIBRATION seeds 100-107 (never the reported ones).

``magcache-turbo`` (11 of 50 steps computed on the zoo models, where the shipped calibration's searched schedule
puts them) stacked with ``cfg-cache``: on the steps of its window that magcache computes, every ``interval``-th
computes both branches and the others the conditional branch alone (the unconditional output rebuilt from the
cached difference). Candidates are windows ``(start, interval)``; each runs through the pipelines of zoo:dit
(batched CFG) and zoo:mmdit (separate CFG calls), 8 images per seed, labels ``(seed + i) % 10``, with the shipped
calibration. The budget: an estimated FLOPs speedup of at least 5x on both models (turbo alone: 4.55x), i.e. at
least two of the eleven computed steps rebuilt. Among the windows within it, the one with the highest PSNR on its
worse model wins (pooled over the 64 images, one MSE); the worst single image and class consistency beside it.

    python benchmarks/magcache_cfg_levels_cpu.py -o benchmarks/results
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from calibration_runs import CountingPipeline, level_choice_setup, quality_of
from dit_accel import Recipe, accelerate_dit, load_recipe, remove_acceleration
from dit_accel.caching.cfg_cache import CFGCacheConfig
from dit_accel.pipelines import zoo
from dit_accel.pipelines.zoo.calibrations import with_shipped_calibration

SEEDS = tuple(range(100, 108))
IMAGES = 8
STEPS = 50
BUDGET = 5.0  # estimated FLOPs speedup, on every model
BASE = "magcache-turbo"
WINDOWS = [(0.2, 2), (0.35, 2), (0.5, 2), (0.65, 2), (0.2, 3), (0.5, 3)]  # (start, interval)


def stacked(start: float, interval: int) -> Recipe:
    base = load_recipe(BASE)
    return Recipe(plugins=base.plugins + (CFGCacheConfig(start=start, interval=interval),),
                  name=f"{BASE}+cfg-cache")


def main() -> None:
    args, results, labels = level_choice_setup(__doc__, SEEDS, IMAGES, STEPS, base=BASE, budget=BUDGET)
    evaluator = zoo.evaluator()
    for model in args.models:
        runner = CountingPipeline(model, STEPS)
        pipe = runner.pipe
        dense = torch.cat([runner.generate(seed, IMAGES) for seed in SEEDS])
        results["dense"][model] = {"class_consistency": evaluator.class_consistency(dense, labels)}
        for window in [None, *WINDOWS]:
            recipe = load_recipe(BASE) if window is None else stacked(*window)
            handle = accelerate_dit(pipe, with_shipped_calibration(recipe, model)[0])
            images, fractions = [], []
            for seed in SEEDS:
                images.append(runner.generate(seed, IMAGES))
                fractions.append(handle.stats.flops_fraction)
            remove_acceleration(pipe)
            images = torch.cat(images)
            name = BASE if window is None else f"start={window[0]} interval={window[1]}"
            row = results["rows"].setdefault(name, {"window": window})
            row[model] = {"flops_speedup": len(fractions) / sum(fractions),
                          **quality_of(images, dense, evaluator, labels)}
            print(model, name, row[model], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "magcache-cfg-levels-cpu.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, args.out / "magcache-cfg-levels-cpu.md")


def chosen(results: dict) -> str:
    """The window within the budget with the best PSNR on its worse model (ties: its better model)."""
    models = list(results["dense"])
    rows = {name: r for name, r in results["rows"].items() if r["window"] is not None}
    within = [name for name, r in rows.items() if all(r[m]["flops_speedup"] >= BUDGET for m in models)]
    return max(within, key=lambda name: (min(rows[name][m]["psnr"] for m in models),
                                         max(rows[name][m]["psnr"] for m in models)))


def write_markdown(results: dict, path: Path) -> None:
    meta = results["meta"]
    models = list(results["dense"])
    best = chosen(results)
    lines = ["# magcache-cfg-turbo's cfg-cache window, chosen on calibration seeds (CPU)", "",
             f"`python benchmarks/magcache_cfg_levels_cpu.py -o benchmarks/results`; {meta['machine']}, torch "
             f"{meta['torch']}. Calibration seeds {meta['seeds'][0]}-{meta['seeds'][-1]} ({meta['images_per_seed']} "
             f"images each; nothing here is a reported result), {meta['steps']} steps, `{meta['base']}` with the "
             "shipped calibration stacked with cfg-cache over the window. FLOPs ×: dit_accel's estimate, mean over "
             "the generations; PSNR against dense pooled over all images; worst: the worst single image; cc: class "
             "consistency (dense: " + ", ".join(f"zoo:{m} {results['dense'][m]['class_consistency']:.3f}"
                                                 for m in models)
             + f"). Chosen (**bold**): the highest PSNR on the worse model among the windows at >= {meta['budget']}x "
             "FLOPs on every model."]
    lines += ["", "| window | " + " | ".join(f"zoo:{m} FLOPs × | PSNR | worst | cc" for m in models)
              + " | worse PSNR |", "|---|" + "---|" * (4 * len(models) + 1)]
    for name, r in results["rows"].items():
        cells = " | ".join(f"{r[m]['flops_speedup']:.2f} | {r[m]['psnr']:.2f} | {r[m]['worst_image_psnr']:.2f} | "
                           f"{r[m]['class_consistency']:.3f}" for m in models)
        worse = min(r[m]["psnr"] for m in models)
        lines.append(f"| {'**' + name + '**' if name == best else name} | {cells} | {worse:.2f} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
