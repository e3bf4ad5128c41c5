"""MagCache settings on CALIBRATION seeds (100-103), where the magcache recipes' knobs are chosen, never reported.

Two measurements on the zoo models through their pipelines (50 steps):

* quality: PSNR against dense of our magcache variants and diffusers' MagCache (calibrated on its own seed), with
  the number of computed steps (calls of one attention module per generation);
* cost (zoo:dit, 2 images): the median time of a computed and of a skipped transformer call, ours against
  diffusers' at the same setting, next to a dense call.

    python benchmarks/magcache_calibration_cpu.py -o benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

from dit_accel import accelerate_dit, remove_acceleration
from dit_accel.bench.baselines import apply_baseline, calibrate_magcache
from dit_accel.bench.metrics import psnr
from dit_accel.pipelines import zoo

SEEDS = (100, 101, 102, 103)
CALIBRATION_SEED = 10_000
STEPS = 50
RESIDUAL = {"forecast_target": "residual"}
VARIANTS = [("magcache-max", {}), ("magcache-max", RESIDUAL), ("magcache-max", {"bounded_forecast": False}),
            ("magcache-max", {"last_steps": 0}), ("magcache-max", {"forecast_order": 0}),
            ("magcache-max", {"forecast_order": 0, **RESIDUAL}), ("magcache-ultra", {}), ("magcache-ultra", RESIDUAL),
            ("magcache-fast", {}), ("magcache-fast", RESIDUAL), ("magcache", {}), ("magcache", RESIDUAL),
            ("magcache-cfg-max", {}), ("magcache-cfg-max", {"magcache__forecast_target": "residual"}),
            ("magcache-cfg-ultra", {}), ("magcache-cfg-ultra", {"magcache__forecast_target": "residual"})]
# The forecaster and its reach, with the output target.
VARIANTS += [(recipe, change) for recipe in ("magcache-max", "magcache-ultra")
             for change in ({"forecaster": "foca"}, {"forecaster": "hermite"}, {"horizon": 2.0}, {"horizon": 0.5})]
ANCHORS = [(0.24, 4), (0.06, 3)]


def probe_module(transformer: torch.nn.Module) -> torch.nn.Module:
    block = transformer.transformer_blocks[1]
    return block.attn1 if hasattr(block, "attn1") else block.attn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["dit", "mmdit"])
    parser.add_argument("--repeats", type=int, default=6, help="timed generations per configuration (cost)")
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    results = {"meta": {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU",
                        "torch": torch.__version__, "seeds": list(SEEDS), "steps": STEPS}, "quality": {}, "cost": {}}
    for model in args.models:
        pipe = zoo.load(model)
        calls = []
        probe_module(pipe.transformer).register_forward_hook(lambda *_: calls.append(1))

        def generate(seed: int, count: int = 4) -> torch.Tensor:
            return pipe(class_labels=[(seed + i) % 10 for i in range(count)], num_inference_steps=STEPS,
                        generator=torch.Generator().manual_seed(seed), output_type="pt").images

        dense = {seed: generate(seed) for seed in SEEDS}

        def evaluate(run=lambda f: f()) -> dict:
            calls.clear()
            images = {seed: run(lambda seed=seed: generate(seed)) for seed in SEEDS}
            return {"psnr": statistics.mean(psnr(images[s], dense[s]) for s in SEEDS),
                    "attention_calls_per_generation": len(calls) / len(SEEDS)}

        rows = results["quality"][model] = {}
        for recipe, overrides in VARIANTS:
            accelerate_dit(pipe, recipe, **overrides)
            generate(CALIBRATION_SEED, 2)  # the calibration generation (dense)
            rows[recipe + "".join(f" {k}={v}" for k, v in overrides.items())] = evaluate()
            remove_acceleration(pipe)
        ratios = calibrate_magcache(pipe, lambda: generate(CALIBRATION_SEED, 2), STEPS)
        for threshold, skips in ANCHORS:
            applied = apply_baseline("diffusers:magcache", pipe, num_steps=STEPS, calibration=None,
                                     setting={"threshold": threshold, "max_skip_steps": skips,
                                              "retention_ratio": 0.2, "mag_ratios": ratios})
            rows[f"diffusers:magcache {threshold}/K{skips}"] = evaluate(applied.run)
            applied.remove()
        for name, row in rows.items():
            print(model, name, row, flush=True)
        if model == "dit":
            results["cost"] = cost(pipe, generate, ratios, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "magcache-calibration-cpu.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, args.out / "magcache-calibration-cpu.md")


def cost(pipe, generate, ratios, repeats: int) -> dict:
    """Median times of computed and skipped transformer calls (2 images, seed 100) per configuration."""
    transformer = pipe.transformer
    fired, records, start = [0], [], {}
    probe_module(transformer).register_forward_hook(lambda *_: fired.__setitem__(0, fired[0] + 1))

    def before(*_):
        start["time"], start["fired"] = time.perf_counter(), fired[0]

    def after(*_):
        records.append((fired[0] > start["fired"], time.perf_counter() - start["time"]))

    handles = [transformer.register_forward_pre_hook(before, prepend=True), transformer.register_forward_hook(after)]

    def measure(run=lambda f: f()) -> dict:
        records.clear()
        totals = []
        for _ in range(repeats):
            began = time.perf_counter()
            run(lambda: generate(100, 2))
            totals.append(time.perf_counter() - began)
        computed = [t for c, t in records if c]
        skipped = [t for c, t in records if not c]
        return {"generation_ms": statistics.median(totals) * 1e3, "computed_calls": len(computed) // repeats,
                "computed_call_ms": statistics.median(computed) * 1e3, "skipped_calls": len(skipped) // repeats,
                "skipped_call_ms": statistics.median(skipped) * 1e3 if skipped else None}

    rows = {"dense": measure()}
    for target in ("output", "residual"):
        accelerate_dit(pipe, "magcache-max", last_steps=0, forecast_target=target)
        generate(CALIBRATION_SEED, 2)
        rows[f"magcache-max last_steps=0 forecast_target={target}"] = measure()
        remove_acceleration(pipe)
    applied = apply_baseline("diffusers:magcache", pipe, num_steps=STEPS, calibration=None,
                             setting={"threshold": 0.24, "max_skip_steps": 4, "retention_ratio": 0.2,
                                      "mag_ratios": ratios})
    rows["diffusers:magcache 0.24/K4"] = measure(applied.run)
    applied.remove()
    rows["dense (after)"] = measure()
    for handle in handles:
        handle.remove()
    for name, row in rows.items():
        print("cost", name, row, flush=True)
    return rows


def write_markdown(results: dict, path: Path) -> None:
    meta = results["meta"]
    lines = ["# MagCache on calibration seeds (CPU)", "",
             f"`python benchmarks/magcache_calibration_cpu.py -o benchmarks/results`; {meta['machine']}, torch "
             f"{meta['torch']}. Calibration seeds {', '.join(map(str, meta['seeds']))} (4 images each, the seeds the "
             f"magcache recipes' knobs are chosen on; nothing here is a reported result), {meta['steps']} steps "
             "through the zoo pipelines. PSNR: mean over the seeds against dense; attention calls: calls of one "
             "attention module per generation (computed steps, times two with separate CFG calls). Cost (zoo:dit, "
             "2 images, seed 100): median wall time of computed and skipped transformer calls."]
    for model, rows in results["quality"].items():
        lines += ["", f"## zoo:{model}", "", "| configuration | PSNR dB | attention calls / generation |", "|---|---|---|"]
        lines += [f"| {name} | {r['psnr']:.2f} | {r['attention_calls_per_generation']:.1f} |" for name, r in rows.items()]
    if results["cost"]:
        lines += ["", "## Cost per transformer call (zoo:dit)", "",
                  "| configuration | generation ms | computed calls | ms each | skipped calls | ms each |",
                  "|---|---|---|---|---|---|"]
        for name, r in results["cost"].items():
            skipped = "–" if r["skipped_call_ms"] is None else f"{r['skipped_call_ms']:.2f}"
            lines.append(f"| {name} | {r['generation_ms']:.1f} | {r['computed_calls']} | {r['computed_call_ms']:.2f} | "
                         f"{r['skipped_calls']} | {skipped} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
