"""What magcache's ``forecast_target`` costs and saves in wall time, and what a call on fewer rows costs (CPU).

Two measurements on the zoo models through their pipelines (50 steps, 2 images, timing seeds 100+):

* generations interleaved round by round (order reversed every other round): dense, diffusers' MagCache 0.24/K4,
  and magcache-max / magcache-ultra with ``forecast_target`` "output" and "residual"; medians of the per-round
  ratios to dense, and the median wall time of a computed and of a skipped step (the interval between scheduler
  steps, split at 6 ms on zoo:dit and 12 ms on zoo:mmdit, whose steps are two calls);
* the bare transformer called on all rows of a batched-CFG call (2 images: 4 rows) and on the 2 conditional rows
  alone (what cfg-cache runs), medians of 60 calls: how much of a call halving the rows saves.

Nothing here chooses a setting (quality is chosen in magcache_calibration_cpu.py on calibration seeds).

    python benchmarks/magcache_target_cpu.py -o benchmarks/results
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
from dit_accel.pipelines import zoo

STEPS = 50
CONFIGS = [("dense", None), ("diffusers:magcache 0.24/K4", None),
           ("magcache-max", "output"), ("magcache-max", "residual"),
           ("magcache-ultra", "output"), ("magcache-ultra", "residual")]
SPLIT_S = {"dit": 0.006, "mmdit": 0.012}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["dit", "mmdit"])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    results = {"meta": {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU",
                        "torch": torch.__version__, "steps": STEPS, "rounds": args.rounds},
               "generations": {}, "rows": {}}
    for model in args.models:
        results["generations"][model] = generations(model, args.rounds)
    for model in ("dit", "flowdit"):
        results["rows"][model] = row_cost(model)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "magcache-target-cpu.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, args.out / "magcache-target-cpu.md")


def generations(model: str, rounds: int) -> dict:
    pipe = zoo.load(model)

    def call(seed: int):
        return pipe(class_labels=[0, 1], num_inference_steps=STEPS, output_type="pt",
                    generator=torch.Generator().manual_seed(seed)).images

    stamps: list[float] = []
    step = pipe.scheduler.step

    def stamped_step(*a, **k):
        stamps.append(time.perf_counter())
        return step(*a, **k)

    pipe.scheduler.step = stamped_step
    ratios = calibrate_magcache(pipe, lambda: call(999), STEPS)
    names = [name if target is None else f"{name} forecast_target={target}" for name, target in CONFIGS]
    times = {n: {"total": [], "computed": [], "skipped": []} for n in names}
    for r in range(rounds + 1):
        order = list(zip(names, CONFIGS)) if r % 2 else list(zip(names, CONFIGS))[::-1]
        for label, (name, target) in order:
            applied, run = None, (lambda generate: generate())
            if name.startswith("diffusers:"):
                applied = apply_baseline("diffusers:magcache", pipe, num_steps=STEPS, calibration=None,
                                         setting={"threshold": 0.24, "max_skip_steps": 4, "mag_ratios": ratios})
                run = applied.run
            elif name != "dense":
                accelerate_dit(pipe, name, forecast_target=target)
                call(999)  # its calibration generation (dense), untimed
            stamps.clear()
            began = time.perf_counter()
            run(lambda: call(100 + r))
            total = time.perf_counter() - began
            if applied is not None:
                applied.remove()
            elif name != "dense":
                remove_acceleration(pipe)
            if r == 0:
                continue  # warm-up round
            gaps = [b - a for a, b in zip(stamps, stamps[1:])]
            times[label]["total"].append(total)
            times[label]["computed"] += [g for g in gaps if g > SPLIT_S[model]]
            times[label]["skipped"] += [g for g in gaps if g <= SPLIT_S[model]]
    pipe.scheduler.step = step
    dense = times["dense"]["total"]
    rows = {}
    for label, t in times.items():
        rows[label] = {
            "speedup": statistics.median(d / c for d, c in zip(dense, t["total"])),
            "generation_ms": statistics.median(t["total"]) * 1e3,
            "computed_step_ms": statistics.median(t["computed"]) * 1e3 if t["computed"] else None,
            "skipped_step_ms": statistics.median(t["skipped"]) * 1e3 if t["skipped"] else None,
            "computed_steps": round(len(t["computed"]) / rounds) + 1, "skipped_steps": round(len(t["skipped"]) / rounds)}
        print(model, label, rows[label], flush=True)
    return rows


def row_cost(model: str, calls: int = 60) -> dict:
    transformer = zoo.load(model).transformer
    config = transformer.config
    labels = torch.tensor([1, 2, config.num_embeds_ada_norm, config.num_embeds_ada_norm])
    out = {}
    with torch.no_grad():
        for rows in (4, 2):
            x = torch.randn(rows, config.in_channels, config.sample_size, config.sample_size)
            t = torch.full((rows,), 500.0)
            for _ in range(5):
                transformer(x, timestep=t, class_labels=labels[:rows])
            spent = []
            for _ in range(calls):
                began = time.perf_counter()
                transformer(x, timestep=t, class_labels=labels[:rows])
                spent.append(time.perf_counter() - began)
            out[f"{rows}_rows_ms"] = statistics.median(spent) * 1e3
    out["ratio"] = out["2_rows_ms"] / out["4_rows_ms"]
    print(model, "rows", out, flush=True)
    return out


def write_markdown(results: dict, path: Path) -> None:
    meta = results["meta"]
    lines = ["# magcache's forecast target: wall time (CPU)", "",
             f"`python benchmarks/magcache_target_cpu.py -o benchmarks/results`; {meta['machine']}, torch "
             f"{meta['torch']}. {meta['steps']} steps, 2 images, {meta['rounds']} rounds of generations interleaved "
             "(order reversed every other round, after a warm-up round); speedup: median of the per-round ratios to "
             "dense; step times: medians of the intervals between scheduler steps (a zoo:mmdit step is two calls). "
             "Nothing here chooses a setting.", ""]
    for model, rows in results["generations"].items():
        lines += [f"## zoo:{model}", "", "| configuration | wall × | generation ms | computed steps | ms each | "
                  "skipped steps | ms each |", "|---|---|---|---|---|---|---|"]
        for name, r in rows.items():
            skipped = "–" if r["skipped_step_ms"] is None else f"{r['skipped_step_ms']:.2f}"
            lines.append(f"| {name} | {r['speedup']:.2f} | {r['generation_ms']:.1f} | {r['computed_steps']} | "
                         f"{r['computed_step_ms']:.2f} | {r['skipped_steps']} | {skipped} |")
        lines.append("")
    lines += ["## A call on the conditional rows alone (bare transformer, 2 images)", "",
              "| model | 4 rows ms | 2 rows ms | ratio |", "|---|---|---|---|"]
    for model, r in results["rows"].items():
        lines.append(f"| zoo:{model} | {r['4_rows_ms']:.2f} | {r['2_rows_ms']:.2f} | {r['ratio']:.2f} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
