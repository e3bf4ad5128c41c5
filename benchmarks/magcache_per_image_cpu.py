"""Per-image PSNR of magcache-max against diffusers' MagCache 0.24 / K=4 on caching_cpu.py's zoo:dit images.

A diagnosis, not a tuning run: it reads the 40 images ``benchmarks/caching_cpu.py`` reports on (classes 0-9 four
times, seed 0, 50 steps; calibration generations on seed 999, as there) to see whether a batch PSNR is carried by
most images or by a few. Nothing here chose a setting: ``bounded_forecast`` was chosen on calibration seeds
(``magcache_calibration_cpu.py``).

    python benchmarks/magcache_per_image_cpu.py -o benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from pathlib import Path

import torch

from dit_accel import accelerate_dit, remove_acceleration
from dit_accel.bench.baselines import apply_baseline, calibrate_magcache
from dit_accel.pipelines import zoo

LABELS = [i % 10 for i in range(40)]
VARIANTS = [("magcache-max", {}), ("magcache-max", {"bounded_forecast": False}),
            ("magcache-max", {"forecast_order": 0})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    pipe = zoo.load("dit")

    def call(labels, seed=0):
        return pipe(class_labels=labels, num_inference_steps=50, output_type="pt",
                    generator=torch.Generator().manual_seed(seed)).images

    dense = call(LABELS)

    def scores(images):
        per_image = (10 * torch.log10(1 / ((images - dense) ** 2).flatten(1).mean(1))).tolist()
        return {"batch_psnr": float(10 * torch.log10(1 / ((images - dense) ** 2).mean())), "per_image": per_image}

    rows = {}
    for recipe, overrides in VARIANTS:
        accelerate_dit(pipe, recipe, **overrides)
        call(LABELS[:2], seed=999)  # the calibration generation
        rows[recipe + "".join(f" {k}={v}" for k, v in overrides.items())] = scores(call(LABELS))
        remove_acceleration(pipe)
    ratios = calibrate_magcache(pipe, lambda: call(LABELS[:2], seed=999), 50)
    applied = apply_baseline("diffusers:magcache", pipe, num_steps=50, calibration=None,
                             setting={"threshold": 0.24, "max_skip_steps": 4, "mag_ratios": ratios})
    rows["diffusers:magcache 0.24/K4"] = scores(applied.run(lambda: call(LABELS)))
    applied.remove()
    anchor = rows["diffusers:magcache 0.24/K4"]["per_image"]
    lines = ["# magcache-max per image on caching_cpu's zoo:dit images (CPU, a diagnosis)", "",
             "`python benchmarks/magcache_per_image_cpu.py -o benchmarks/results`: the 40 images caching_cpu.py "
             "reports on, PSNR against dense per image; nothing here chose a setting.", "",
             "| configuration | batch PSNR dB | median image dB | worst image dB | images above diffusers' |",
             "|---|---|---|---|---|"]
    for name, row in rows.items():
        values = row["per_image"]
        above = sum(a > b for a, b in zip(values, anchor))
        lines.append(f"| {name} | {row['batch_psnr']:.2f} | {statistics.median(values):.2f} | {min(values):.2f} | "
                     f"{above} of {len(values)} |")
        print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "magcache-per-image-cpu.json").write_text(json.dumps(rows, indent=2))
    (args.out / "magcache-per-image-cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
