"""magcache's forecast space, and the turbo level, on CALIBRATION seeds (100-103): where they are chosen, never reported.

Each configuration runs with ``forecast_space = "prediction"`` and ``"clean"`` on the zoo models through their
pipelines (50 steps, 8 images per seed, labels ``(seed + i) % 10``); PSNR is pooled over all 32 images (one MSE, as
the reports pool theirs); computed steps are calls of one attention module per generation and branch.

    python benchmarks/magcache_space_cpu.py -o benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
import warnings
from pathlib import Path

import torch

from dit_accel import accelerate_dit, remove_acceleration
from dit_accel.bench.metrics import psnr
from calibration_runs import CountingPipeline

SEEDS = (100, 101, 102, 103)
IMAGES = 8
CALIBRATION_SEED = 10_000
STEPS = 50
TURBO = {"retention": 0.08, "threshold": 2.0, "max_skips": 5}
CONFIGURATIONS = [("magcache", {}), ("magcache-fast", {}), ("magcache-max", {}), ("magcache-ultra", {}),
                  ("magcache-turbo", {}), ("magcache-turbo", {"last_steps": 1}),
                  ("magcache-turbo", {"retention": 0.1}), ("magcache-turbo", {"retention": 0.06}),
                  ("magcache-turbo", {"threshold": 0.5})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["dit", "mmdit"])
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    results = {"meta": {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU",
                        "torch": torch.__version__, "seeds": list(SEEDS), "images_per_seed": IMAGES,
                        "steps": STEPS}, "quality": {}}
    for model in args.models:
        runner = CountingPipeline(model, STEPS)
        pipe = runner.pipe

        def generate(seed: int, count: int = IMAGES) -> torch.Tensor:
            return runner.generate(seed, count)

        dense = torch.cat([generate(seed) for seed in SEEDS])
        rows = results["quality"][model] = {}
        for recipe, overrides in CONFIGURATIONS:
            for space in ("prediction", "clean"):
                accelerate_dit(pipe, recipe, forecast_space=space, **overrides)
                generate(CALIBRATION_SEED, 2)  # the calibration generation (dense)
                runner.calls = 0
                images = torch.cat([generate(seed) for seed in SEEDS])
                remove_acceleration(pipe)
                name = recipe + "".join(f" {k}={v}" for k, v in overrides.items())
                rows.setdefault(name, {})[space] = {
                    "psnr": psnr(images, dense), "computed_steps": runner.computed_steps(len(SEEDS))}
                print(model, name, space, rows[name][space], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "magcache-space-cpu.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, args.out / "magcache-space-cpu.md")


def write_markdown(results: dict, path: Path) -> None:
    meta = results["meta"]
    lines = ["# magcache's forecast space on calibration seeds (CPU)", "",
             f"`python benchmarks/magcache_space_cpu.py -o benchmarks/results`; {meta['machine']}, torch "
             f"{meta['torch']}. Calibration seeds {', '.join(map(str, meta['seeds']))} ({meta['images_per_seed']} "
             f"images each: where magcache's defaults and the turbo level are chosen; nothing here is a reported "
             f"result), {meta['steps']} steps. PSNR against dense, pooled over all images; computed steps per "
             "generation and CFG branch."]
    for model, rows in results["quality"].items():
        lines += ["", f"## zoo:{model}", "",
                  "| configuration | computed steps | PSNR dB, prediction | PSNR dB, clean | clean - prediction |",
                  "|---|---|---|---|---|"]
        for name, r in rows.items():
            p, c = r["prediction"], r["clean"]
            lines.append(f"| {name} | {c['computed_steps']:.1f} | {p['psnr']:.2f} | {c['psnr']:.2f} | "
                         f"{c['psnr'] - p['psnr']:+.2f} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
