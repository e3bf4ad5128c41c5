"""Where a magcache generation's time goes: computed calls, skipped calls, and the pipeline outside the model.

For each zoo model, dense and ``magcache-ultra`` / ``magcache-turbo`` generations (2 images, 50 steps) alternate,
with the model's shipped calibration as the other benchmarks use it (its searched schedules where it holds them),
and ``magcache-turbo`` once more with ``schedule = "rule"`` (the same number of computed steps where the rule puts
them), and ``magcache-cfg-turbo`` (turbo with cfg-cache: some computed calls run the conditional rows alone on
batched-CFG models, or skip a separate unconditional call);
hooks on the transformer time every call and split it by whether a block ran. The rest of the generation (the
sampler's step, CFG concatenation and guidance, the progress bar) is the same work per step in every
configuration, so it bounds the wall speedup at ``dense / (computed + skipped + rest)`` however few steps compute:
it is why achieved/ideal (wall speedup over FLOPs speedup) falls as fewer steps compute.

    python benchmarks/step_overhead_cpu.py -o benchmarks/results
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

from dit_accel import accelerate_dit, load_recipe, remove_acceleration
from dit_accel.pipelines import zoo
from dit_accel.pipelines.zoo.calibrations import with_shipped_calibration

RECIPES = {"magcache-ultra": {}, "magcache-turbo": {}, "magcache-turbo (rule)": {"schedule": "rule"},
           "magcache-cfg-turbo": {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["dit", "mmdit", "flowdit"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    results = {"meta": {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU",
                        "torch": torch.__version__, "repeats": args.repeats}, "models": {}}
    for model in args.models:
        pipe = zoo.load(model)
        transformer = pipe.transformer
        fired, records, start = [0], [], {}
        first = transformer.transformer_blocks[0]
        first.register_forward_pre_hook(lambda *_: fired.__setitem__(0, fired[0] + 1))

        def before(*_):
            start["time"], start["fired"] = time.perf_counter(), fired[0]

        def after(*_):
            records.append((fired[0] > start["fired"], time.perf_counter() - start["time"]))

        transformer.register_forward_pre_hook(before, prepend=True)
        transformer.register_forward_hook(after)

        def generate(seed: int = 100) -> float:
            began = time.perf_counter()
            pipe(class_labels=[1, 2], num_inference_steps=50, generator=torch.Generator().manual_seed(seed),
                 output_type="pt")
            return time.perf_counter() - began

        samples = {name: [] for name in ("dense", *RECIPES)}
        for _ in range(args.repeats):
            for name in samples:
                if name != "dense":
                    recipe = load_recipe(name.split(" ")[0], **RECIPES[name])
                    accelerate_dit(pipe, with_shipped_calibration(recipe, model)[0])
                    generate(10_000)  # warm-up, untimed
                records.clear()
                total = generate()
                computed = [t for ran, t in records if ran]
                skipped = [t for ran, t in records if not ran]
                samples[name].append({"total": total, "computed": sum(computed), "computed_calls": len(computed),
                                      "skipped": sum(skipped), "skipped_calls": len(skipped)})
                if name != "dense":
                    remove_acceleration(pipe)
        rows = {}
        for name, runs in samples.items():
            median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            median["rest"] = statistics.median(run["total"] - run["computed"] - run["skipped"] for run in runs)
            rows[name] = median
        dense = rows["dense"]["total"]
        for name, row in rows.items():
            row["wall_speedup"] = dense / row["total"]
            row["flops_speedup"] = rows["dense"]["computed_calls"] / row["computed_calls"]
            print(model, name, {k: round(v, 4) for k, v in row.items()}, flush=True)
        results["models"][model] = rows
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step-overhead-cpu.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, args.out / "step-overhead-cpu.md")


def write_markdown(results: dict, path: Path) -> None:
    meta = results["meta"]
    lines = ["# Where a magcache generation's time goes (CPU)", "",
             f"`python benchmarks/step_overhead_cpu.py -o benchmarks/results`; {meta['machine']}, torch "
             f"{meta['torch']}; 2 images, 50 steps, medians of {meta['repeats']} generations per configuration, "
             "configurations alternating, the shipped calibrations (searched schedules where kept; `(rule)`: the "
             "rule's schedule). computed / skipped: time inside transformer calls that ran blocks / ran "
             "none; rest: the generation outside the transformer (sampler step, CFG batching and guidance, progress "
             "bar). Call speedup: computed calls of dense over those of the configuration (the FLOPs speedup of "
             "whole calls; a call that runs the conditional rows alone, cfg-cache on batched CFG as on zoo:dit and "
             "zoo:flowdit, counts as computed, so there it is below the FLOPs speedup, 5.0x for magcache-cfg-turbo, "
             "and achieved/ideal above)."]
    for model, rows in results["models"].items():
        lines += ["", f"## zoo:{model}", "",
                  "| configuration | generation ms | computed calls | computed ms | skipped calls | skipped ms | "
                  "rest ms | wall × | call × | achieved/ideal |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in rows.items():
            lines.append(f"| {name} | {r['total'] * 1e3:.1f} | {r['computed_calls']:.0f} | {r['computed'] * 1e3:.1f} | "
                         f"{r['skipped_calls']:.0f} | {r['skipped'] * 1e3:.1f} | {r['rest'] * 1e3:.1f} | "
                         f"{r['wall_speedup']:.2f} | {r['flops_speedup']:.2f} | "
                         f"{r['wall_speedup'] / r['flops_speedup']:.2f} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
