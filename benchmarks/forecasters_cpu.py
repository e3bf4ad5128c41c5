"""Forecasters and SpeCa on the zoo models' calibration seeds: FLOPs and PSNR against dense (no wall time).

Chooses defaults (``forecaster``, ``speca`` threshold) on the two zoo models and seeds that no reported benchmark
uses (seed 1000 onward); zoo:flowdit, the evaluation-only model, is never run here. Each configuration generates the
same samples as dense; the table gives the estimated FLOPs fraction (dit_accel's stats) and the mean PSNR.

    python benchmarks/forecasters_cpu.py --samples 8 -o benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import warnings
from pathlib import Path

import torch

from dit_accel import accelerate_dit, remove_acceleration
from dit_accel.pipelines import zoo

CONFIGS: list[tuple[str, dict]] = [
    ("taylorseer", {}),
    ("taylorseer", {"verify": False}),
    ("taylorseer", {"forecaster": "hermite", "sigma": 0.5}),
    ("taylorseer", {"forecaster": "hermite", "sigma": 0.6}),
    ("taylorseer", {"forecaster": "foca"}),
    ("magcache-max", {}),
    ("magcache-max", {"forecaster": "hermite"}),
    ("magcache-max", {"forecaster": "foca"}),
    ("speca", {}),
    ("speca", {"threshold": 0.15}),
    ("speca", {"threshold": 0.6}),
    ("speca", {"forecaster": "hermite"}),
    ("freqca", {}),
    ("freqca", {"interval": 3}),
    ("freqca", {"forecaster": "taylor", "order": 1}),
    ("freqca", {"interval": 3, "cutoff": 1.0}),
]
SEED = 1000


def _psnr(images: list[torch.Tensor], dense: list[torch.Tensor]) -> float:
    mse = torch.cat([((a - b) ** 2).flatten(1).mean(1) for a, b in zip(images, dense)])
    return float((10 * torch.log10(1.0 / mse.clamp_min(1e-20))).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--models", nargs="*", default=["dit", "mmdit"], choices=["dit", "mmdit"])
    parser.add_argument("--append", action="store_true",
                        help="keep the rows of the other models in an existing forecasters-cpu.json")
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    rows = []
    existing = args.out / "forecasters-cpu.json"
    if args.append and existing.is_file():
        rows = [r for r in json.loads(existing.read_text()) if r["model"].split(":")[1] not in args.models]
    for model in args.models:
        pipe = zoo.load(model)
        batches = [[(2 * i) % 10, (2 * i + 1) % 10] for i in range(math.ceil(args.samples / 2))]

        def run() -> list[torch.Tensor]:
            return [pipe(class_labels=labels, num_inference_steps=args.steps, output_type="pt",
                         generator=torch.Generator().manual_seed(SEED + i)).images for i, labels in enumerate(batches)]

        dense = run()
        for recipe, settings in CONFIGS:
            handle = accelerate_dit(pipe, recipe, **settings)
            try:
                pipe(class_labels=[0, 1], num_inference_steps=args.steps, output_type="pt",
                     generator=torch.Generator().manual_seed(SEED + 500))  # magcache calibrates here
                fractions, images = [], []
                for i, labels in enumerate(batches):
                    images.append(pipe(class_labels=labels, num_inference_steps=args.steps, output_type="pt",
                                       generator=torch.Generator().manual_seed(SEED + i)).images)
                    fractions.append(handle.stats.flops_fraction)
                notes = dict(handle.stats.notes)
            finally:
                remove_acceleration(pipe)
            label = recipe + "".join(f"@{k}={v}" for k, v in settings.items())
            row = {"model": f"zoo:{model}", "config": label, "flops_fraction": sum(fractions) / len(fractions),
                   "psnr": _psnr(images, dense), **notes}
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "forecasters-cpu.json").write_text(json.dumps(rows, indent=1))
    lines = ["# Forecasters and SpeCa on the zoo models' calibration seeds (CPU)", "",
             f"`python benchmarks/forecasters_cpu.py --samples {args.samples} --steps {args.steps}` (one model at a "
             "time with `--models M --append` gives the same rows); "
             f"{platform.machine()}, torch {torch.__version__}; seeds {SEED}+ (no reported benchmark uses them); "
             "FLOPs fraction is dit_accel's estimate (mean over the samples), PSNR against dense on the same seeds. "
             "No wall time: this chooses defaults, it does not report speed.", "",
             "| model | configuration | FLOPs fraction | PSNR dB | speca acceptance |", "|---|---|---|---|---|"]
    for row in rows:
        acceptance = row.get("speca.acceptance")
        lines.append(f"| {row['model']} | {row['config']} | {row['flops_fraction']:.3f} | {row['psnr']:.2f} | "
                     f"{'–' if acceptance is None else f'{acceptance:.2f}'} |")
    (args.out / "forecasters-cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
