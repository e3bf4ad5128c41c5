"""How magcache-ultra and magcache-turbo were chosen, on CALIBRATION seeds 100-107 (never the reported ones).

Each level has a budget of computed steps at 50 steps (ultra: at most 15, about 3.3x; turbo: at most 11, about
4.5x). Candidates are the (retention, threshold, max_skips) settings whose schedule, computed by
:func:`~dit_accel.caching.magcache_rule.skip_schedule` from the calibration shipped with each zoo model, meets the
budget on both zoo:dit and zoo:mmdit (distinct schedules only; narrowed from a screen of each model's own schedules on
the same seeds). Each runs through the pipelines (8 images per seed,
labels ``(seed + i) % 10``, ``forecast_space`` auto); the level takes the candidate with the highest PSNR on its
worse model (ties: on its better model) (pooled over the 64 images, one MSE, as the reports pool theirs). The worst single image and class
consistency are reported beside it.

    python benchmarks/magcache_levels_cpu.py -o benchmarks/results
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dit_accel import accelerate_dit, remove_acceleration
from calibration_runs import CountingPipeline, level_choice_setup, quality_of
from dit_accel.pipelines import zoo

SEEDS = tuple(range(100, 108))
IMAGES = 8
STEPS = 50
CALIBRATION_SEED = 10_000
# (retention, threshold, max_skips); the first of each level is the setting it had before this choice.
BUDGETS = {"magcache-ultra": 15, "magcache-turbo": 11}  # computed steps of 50, on every model
CANDIDATES = {
    "magcache-turbo": [(0.08, 2.0, 5), (0.08, 1.2, 5), (0.1, 1.0, 6), (0.1, 1.2, 6), (0.08, 0.7, 6),
                       (0.08, 0.8, 6)],
    "magcache-ultra": [(0.15, 0.5, 6), (0.1, 0.4, 4), (0.1, 0.8, 4), (0.12, 0.4, 4), (0.12, 0.8, 4),
                       (0.15, 0.8, 6), (0.15, 0.8, 5), (0.12, 0.5, 4), (0.12, 0.6, 4)],
}


def main() -> None:
    args, results, labels = level_choice_setup(__doc__, SEEDS, IMAGES, STEPS)
    evaluator = zoo.evaluator()
    for model in args.models:
        runner = CountingPipeline(model, STEPS)
        pipe = runner.pipe

        def generate(seed: int, count: int = IMAGES) -> torch.Tensor:
            return runner.generate(seed, count)

        dense = torch.cat([generate(seed) for seed in SEEDS])
        results["dense"][model] = {"class_consistency": evaluator.class_consistency(dense, labels)}
        for level, candidates in CANDIDATES.items():
            for retention, threshold, max_skips in candidates:
                accelerate_dit(pipe, level, retention=retention, threshold=threshold, max_skips=max_skips)
                generate(CALIBRATION_SEED, 2)  # the calibration generation (dense)
                runner.calls = 0
                images = torch.cat([generate(seed) for seed in SEEDS])
                remove_acceleration(pipe)
                name = f"{level} retention={retention} threshold={threshold} max_skips={max_skips}"
                row = results["rows"].setdefault(name, {"level": level})
                row[model] = {"computed_steps": runner.computed_steps(len(SEEDS)),
                              **quality_of(images, dense, evaluator, labels)}
                print(model, name, row[model], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "magcache-levels-cpu.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, args.out / "magcache-levels-cpu.md")


def write_markdown(results: dict, path: Path) -> None:
    meta = results["meta"]
    models = list(results["dense"])
    lines = ["# magcache's ultra and turbo levels, chosen on calibration seeds (CPU)", "",
             f"`python benchmarks/magcache_levels_cpu.py -o benchmarks/results`; {meta['machine']}, torch "
             f"{meta['torch']}. Calibration seeds {meta['seeds'][0]}-{meta['seeds'][-1]} ({meta['images_per_seed']} "
             f"images each; nothing here is a reported result), {meta['steps']} steps. PSNR against dense pooled "
             "over all images; worst: the worst single image; cc: class consistency (dense: "
             + ", ".join(f"zoo:{m} {results['dense'][m]['class_consistency']:.3f}" for m in models)
             + "). Chosen: the highest PSNR on the worse model among the settings within the level's budget of "
             "computed steps (ultra <= 15, turbo <= 11), ties broken by the better model (**bold**)."]
    header = "| setting | " + " | ".join(f"zoo:{m} steps | PSNR | worst | cc" for m in models) + " | worse PSNR |"
    for level in dict.fromkeys(r["level"] for r in results["rows"].values()):
        rows = {name: r for name, r in results["rows"].items() if r["level"] == level}
        budget = BUDGETS[level]
        within = [name for name in rows if all(rows[name][m]["computed_steps"] <= budget for m in models)]
        best = max(within, key=lambda name: (min(rows[name][m]["psnr"] for m in models),
                                             max(rows[name][m]["psnr"] for m in models)))
        lines += ["", f"## {level}", "", header, "|---|" + "---|" * (4 * len(models) + 1)]
        for name, r in rows.items():
            cells = " | ".join(f"{r[m]['computed_steps']:.0f} | {r[m]['psnr']:.2f} | {r[m]['worst_image_psnr']:.2f} | "
                               f"{r[m]['class_consistency']:.3f}" for m in models)
            setting = name.split(" ", 1)[1]
            worse = min(r[m]["psnr"] for m in models)
            lines.append(f"| {'**' + setting + '**' if name == best else setting} | {cells} | {worse:.2f} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
