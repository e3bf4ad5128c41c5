"""The searched computed-step schedules shipped with the zoo models, checked on held-out CALIBRATION seeds (CPU).

Each zoo model's ``magcache-50.json`` holds, for ``magcache-ultra`` (14 computed steps of 50) and
``magcache-turbo`` (11), the schedule ``ditaccel calibrate --search-schedule`` found on its two search generations
(seeds 10001-10002, 8 images each). This script runs each level with ``schedule = "rule"`` and ``"auto"`` (the
searched one) on seeds 102-109 (8 images each, labels ``(seed + i) % 10``), which the search never saw and which no
report uses, and gives the PSNR against dense pooled over the 64 images, the worst image, and class consistency.

    python benchmarks/schedule_search_cpu.py -o benchmarks/results
"""

from __future__ import annotations

import argparse
import platform
import warnings
from pathlib import Path

import torch

from calibration_runs import CountingPipeline, quality_of, save_results
from dit_accel import accelerate_dit, load_recipe, remove_acceleration
from dit_accel.bench.schedule_calibration import rule_schedule
from dit_accel.caching.calibration import load_calibration
from dit_accel.pipelines import zoo
from dit_accel.pipelines.zoo.calibrations import shipped_calibration

SEEDS = tuple(range(102, 110))
IMAGES = 8
STEPS = 50
LEVELS = ("magcache-ultra", "magcache-turbo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["dit", "mmdit", "flowdit"])
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    evaluator = zoo.evaluator()
    labels = [(seed + i) % 10 for seed in SEEDS for i in range(IMAGES)]
    results = {"meta": {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU",
                        "torch": torch.__version__, "seeds": list(SEEDS), "images_per_seed": IMAGES,
                        "steps": STEPS}, "models": {}}
    for model in args.models:
        runner = CountingPipeline(model, STEPS)
        pipe = runner.pipe
        path = shipped_calibration(model)
        calibration = load_calibration(path)
        dense = torch.cat([runner.generate(seed, IMAGES) for seed in SEEDS])
        entry = results["models"][model] = {"dense_class_consistency": evaluator.class_consistency(dense, labels)}
        for level in LEVELS:
            recipe = load_recipe(level, ratios=str(path))
            rule = rule_schedule(recipe, calibration)
            searched = calibration.get("schedules", {}).get(str(len(rule)))
            for schedule in ("rule", "auto"):
                accelerate_dit(pipe, recipe.with_overrides(schedule=schedule))
                runner.calls = 0
                images = torch.cat([runner.generate(seed, IMAGES) for seed in SEEDS])
                remove_acceleration(pipe)
                name = "searched" if schedule == "auto" else "rule"
                entry[f"{level} {name}"] = {
                    "schedule": list(rule if schedule == "rule" else searched or rule),
                    "computed_steps": runner.computed_steps(len(SEEDS)),
                    **quality_of(images, dense, evaluator, labels)}
                print(model, level, name, entry[f"{level} {name}"], flush=True)
    save_results(results, args.out, "schedule-search-cpu", write_markdown)


def write_markdown(results: dict, path: Path) -> None:
    meta = results["meta"]
    lines = ["# Searched computed-step schedules on held-out calibration seeds (CPU)", "",
             f"`python benchmarks/schedule_search_cpu.py -o benchmarks/results`; {meta['machine']}, torch "
             f"{meta['torch']}. Seeds {meta['seeds'][0]}-{meta['seeds'][-1]} ({meta['images_per_seed']} images each, "
             "calibration seeds: neither the search's 10001-10002 nor any reported seed), 50 steps, each zoo model's "
             "shipped calibration (`pipelines/zoo/weights/<model>/magcache-50.json`). rule: magcache's "
             "threshold/max_skips/retention rule (`schedule = \"rule\"`); searched: the schedule of as many steps "
             "that `ditaccel calibrate --search-schedule` stored (`schedule = \"auto\"`). PSNR against dense pooled "
             "over all images; worst: the worst single image; cc: class consistency.", "",
             "| model | level | schedule | computed steps | PSNR dB | worst dB | cc (dense) | steps computed |",
             "|---|---|---|---|---|---|---|---|"]
    for model, entry in results["models"].items():
        for name, row in entry.items():
            if not isinstance(row, dict):
                continue
            level, kind = name.rsplit(" ", 1)
            lines.append(f"| zoo:{model} | {level} | {kind} | {row['computed_steps']:.0f} | {row['psnr']:.2f} | "
                         f"{row['worst_image_psnr']:.2f} | {row['class_consistency']:.3f} "
                         f"({entry['dense_class_consistency']:.3f}) | {row['schedule']} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
