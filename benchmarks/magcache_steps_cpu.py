"""The magcache levels at other step counts: what each computes, and how close it stays, at 20, 28 and 50 steps.

The levels were chosen at 50 steps (``magcache-levels-cpu.md``) and the zoo models ship their calibration, with its
searched schedules, at 50 steps; a generation at another step count resamples the curve and the rule decides. This
measures what that gives, with the shipped calibration as ``ditaccel generate`` applies it: per model, step count
and level, the estimated FLOPs speedup, the computed steps per CFG branch, PSNR against dense at the same step count
(pooled over every image), the worst image and class consistency. Seeds 200-202 (8 images each, labels
``(seed + i) % 10``): neither a calibration seed the levels were chosen on nor a reported benchmark's; nothing is
chosen from this run. No wall time: FLOPs and calls only.

    python benchmarks/magcache_steps_cpu.py -o benchmarks/results
"""

from __future__ import annotations

import argparse
import platform
import warnings
from pathlib import Path

import torch

from calibration_runs import CountingPipeline, quality_of, save_results
from dit_accel import accelerate_dit, load_recipe, remove_acceleration
from dit_accel.pipelines import zoo
from dit_accel.pipelines.zoo.calibrations import with_shipped_calibration

SEEDS = (200, 201, 202)
IMAGES = 8
STEPS = (20, 28, 50)
LEVELS = ("magcache", "magcache-fast", "magcache-max", "magcache-ultra", "magcache-turbo")


def generate(runner: CountingPipeline, steps: int) -> torch.Tensor:
    runner.steps = steps
    return torch.cat([runner.generate(seed, IMAGES) for seed in SEEDS])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["dit", "mmdit", "flowdit"])
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    results = {"meta": {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU",
                        "torch": torch.__version__, "seeds": list(SEEDS), "images_per_seed": IMAGES,
                        "steps": list(STEPS)}, "rows": []}
    labels = [(seed + i) % 10 for seed in SEEDS for i in range(IMAGES)]
    evaluator = zoo.evaluator()
    for model in args.models:
        runner = CountingPipeline(model, STEPS[-1])
        for steps in STEPS:
            dense = generate(runner, steps)
            base = {"model": model, "steps": steps}
            results["rows"].append({**base, "level": "dense", "flops_speedup": 1.0, "computed_steps": steps,
                                    "class_consistency": evaluator.class_consistency(dense, labels)})
            for level in LEVELS:
                handle = accelerate_dit(runner.pipe, with_shipped_calibration(load_recipe(level), model)[0])
                runner.calls, fractions, images = 0, [], []
                for seed in SEEDS:
                    images.append(runner.generate(seed, IMAGES))
                    fractions.append(handle.stats.flops_fraction)
                remove_acceleration(runner.pipe)
                row = {**base, "level": level, "flops_speedup": len(fractions) / sum(fractions),
                       "computed_steps": runner.computed_steps(len(SEEDS)),
                       **quality_of(torch.cat(images), dense, evaluator, labels)}
                results["rows"].append(row)
                print(row, flush=True)
    save_results(results, args.out, "magcache-steps-cpu", write_markdown)


def write_markdown(results: dict, path: Path) -> None:
    meta = results["meta"]
    lines = ["# The magcache levels at 20, 28 and 50 steps (CPU)", "",
             f"`python benchmarks/magcache_steps_cpu.py -o benchmarks/results`; {meta['machine']}, torch "
             f"{meta['torch']}. Seeds {meta['seeds'][0]}-{meta['seeds'][-1]} ({meta['images_per_seed']} images each; "
             "neither calibration nor reported seeds; nothing was chosen from this run), the zoo models' shipped "
             "50-step calibrations (resampled at other step counts, where the rule decides: the searched schedules "
             "are for 50 steps). FLOPs ×: dit_accel's estimate, mean over the generations; computed: steps per CFG "
             "branch; PSNR against dense at the same step count, pooled over all images; worst: the worst single "
             "image; cc: class consistency (dense's in its row).", "",
             "| model | steps | level | FLOPs × | computed | PSNR dB | worst dB | cc |", "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        if r["level"] == "dense":
            lines.append(f"| zoo:{r['model']} | {r['steps']} | dense | 1.00 | {r['computed_steps']} | ∞ | ∞ | "
                         f"{r['class_consistency']:.3f} |")
            continue
        lines.append(f"| zoo:{r['model']} | {r['steps']} | {r['level']} | {r['flops_speedup']:.2f} | "
                     f"{r['computed_steps']:.1f} | {r['psnr']:.2f} | {r['worst_image_psnr']:.2f} | "
                     f"{r['class_consistency']:.3f} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
