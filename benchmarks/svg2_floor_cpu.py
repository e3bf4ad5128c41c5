"""svg2's cluster floors (``min_q_clusters`` / ``min_k_clusters``): chosen on calibration seeds, checked elsewhere.

Part 1, where the floors were chosen: zoo:dit and zoo:mmdit at their 8x8 = 64-token grids, CALIBRATION seeds
100-103 (2 class labels a seed), 20 steps, recipe ``svg2`` with each floor pair, PSNR of the images against dense
attention and the mean key density svg2 attended. Part 2, never used to choose: the evaluation-only zoo:flowdit
(16x16 = 256 tokens, where the default floors still bind) through its pipeline and through a hand-written Euler
loop on the bare transformer (batched CFG, ``handle.generation``), seeds 0-3, 50 steps, the default floors against
none, for ``svg2``, ``svg2-fast`` and ``svg2-max``.

    python benchmarks/svg2_floor_cpu.py -o benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import warnings
from pathlib import Path

import torch

from dit_accel import accelerate_dit
from dit_accel.bench.metrics import psnr
from dit_accel.pipelines import zoo

CALIBRATION_SEEDS = (100, 101, 102, 103)
EVALUATION_SEEDS = (0, 1, 2, 3)
FLOORS = [(1, 1), (4, 8), (8, 16), (16, 16), (8, 32), (16, 32), (32, 32)]
DEFAULT = (16, 32)


def pipeline_generate(pipe, steps: int):
    def generate(seed: int) -> torch.Tensor:
        return pipe(class_labels=[seed % 10, (seed + 5) % 10], num_inference_steps=steps,
                    generator=torch.Generator().manual_seed(seed), output_type="pt").images
    return generate


def euler_loop(pipe, steps: int, handle_of=lambda: None):
    """zoo:flowdit sampled by hand: flow-matching Euler on the bare transformer, CFG batched (cond rows first)."""
    transformer = pipe.transformer
    null, scale = transformer.config.num_embeds_ada_norm, 2.0  # the guidance of benchmarks/custom_loop_cpu.py
    size, channels = transformer.config.sample_size, transformer.config.in_channels

    def generate(seed: int) -> torch.Tensor:
        labels = torch.tensor([seed % 10, (seed + 5) % 10])
        x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(seed))
        sigmas = torch.cat([torch.linspace(1.0, 1.0 / steps, steps), torch.zeros(1)])
        handle = handle_of()
        scope = handle.generation(num_steps=steps, cfg="batched-cond-first") if handle is not None else None
        with torch.no_grad(), (scope if scope is not None else torch.no_grad()):
            for i in range(steps):
                rows = torch.cat([x, x])
                t = (sigmas[i] * 1000).expand(4)
                v = transformer(rows, timestep=t, class_labels=torch.cat([labels, torch.full_like(labels, null)]),
                                return_dict=False)[0]
                cond, uncond = v.chunk(2)
                x = x + (sigmas[i + 1] - sigmas[i]) * (uncond + scale * (cond - uncond))
        return ((x + 1) / 2).clamp(0, 1)
    return generate


def compare(generate, seeds, install) -> dict:
    dense = {seed: generate(seed) for seed in seeds}
    handle = install()
    try:
        images = {seed: generate(seed) for seed in seeds}
        stats = handle.stats
    finally:
        handle.remove()
    return {"psnr": statistics.mean(psnr(images[s], dense[s]) for s in seeds),
            "flops_speedup": 1.0 / stats.flops_fraction if stats is not None and stats.flops_fraction else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    results = {"meta": {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU",
                        "torch": torch.__version__}, "calibration": {}, "evaluation": {}}
    for model in ("dit", "mmdit"):
        pipe = zoo.load(model)
        generate = pipeline_generate(pipe, 20)
        rows = results["calibration"][model] = {}
        for q, k in FLOORS:
            rows[f"{q}/{k}"] = compare(generate, CALIBRATION_SEEDS,
                                       lambda: accelerate_dit(pipe, "svg2", min_q_clusters=q, min_k_clusters=k))
            print(model, q, k, rows[f"{q}/{k}"], flush=True)
    pipe = zoo.load("flowdit")
    handle_box: list = []
    loops = {"pipeline": pipeline_generate(pipe, 50),
             "custom loop": euler_loop(pipe, 50, lambda: handle_box[-1] if handle_box else None)}
    for loop, generate in loops.items():
        rows = results["evaluation"][loop] = {}
        for recipe in ("svg2", "svg2-fast", "svg2-max"):
            for q, k in (DEFAULT, (1, 1)):
                def install(recipe=recipe, q=q, k=k):
                    handle = accelerate_dit(pipe.transformer if loop == "custom loop" else pipe, recipe,
                                            min_q_clusters=q, min_k_clusters=k)
                    handle_box.append(handle)
                    return handle
                label = f"{recipe} floors {q}/{k}" + (" (default)" if (q, k) == DEFAULT else " (none)")
                rows[label] = compare(generate, EVALUATION_SEEDS, install)
                handle_box.clear()
                print("flowdit", loop, label, rows[label], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "svg2-floor-cpu.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, args.out / "svg2-floor-cpu.md")


def write_markdown(results: dict, path: Path) -> None:
    meta = results["meta"]
    lines = ["# svg2's cluster floors (CPU)", "",
             f"`python benchmarks/svg2_floor_cpu.py -o benchmarks/results`; {meta['machine']}, torch {meta['torch']}. "
             "PSNR: mean over the seeds of the images against dense attention; FLOPs ×: dit_accel's estimate.", "",
             "## Where the floors were chosen: calibration seeds 100-103, 20 steps, 64-token grids", "",
             "| floors (query / key clusters) | zoo:dit PSNR dB | FLOPs × | zoo:mmdit PSNR dB | FLOPs × |",
             "|---|---|---|---|---|"]
    dit, mmdit = results["calibration"]["dit"], results["calibration"]["mmdit"]
    for name in dit:
        lines.append(f"| {name} | {dit[name]['psnr']:.2f} | {_x(dit[name])} | {mmdit[name]['psnr']:.2f} | "
                     f"{_x(mmdit[name])} |")
    lines += ["", "## Checked on the evaluation-only zoo:flowdit (256 tokens), seeds 0-3, 50 steps", "",
              "| configuration | pipeline PSNR dB | FLOPs × | custom Euler loop PSNR dB | FLOPs × |", "|---|---|---|---|---|"]
    pipeline, loop = results["evaluation"]["pipeline"], results["evaluation"]["custom loop"]
    for name in pipeline:
        lines.append(f"| {name} | {pipeline[name]['psnr']:.2f} | {_x(pipeline[name])} | {loop[name]['psnr']:.2f} | "
                     f"{_x(loop[name])} |")
    path.write_text("\n".join(lines) + "\n")


def _x(row: dict) -> str:
    return "–" if row["flops_speedup"] is None else f"{row['flops_speedup']:.2f}"


if __name__ == "__main__":
    main()
