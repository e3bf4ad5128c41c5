"""Caching recipes against the anchors on the zoo models, side by side in one process, same seeds.

For each zoo model: the dense run, every dit_accel caching recipe at its aggressiveness levels, and diffusers'
First-Block-Cache / TaylorSeer / MagCache and cache-dit's DBCache (with and without its TaylorSeer calibrator)
wherever they apply. Reported per configuration: wall speedup (end-to-end and transformer-only, medians of
the ratios of ``--repeats`` interleaved pairs of timing runs), FLOPs speedup (dit_accel's estimate; anchors report none), PSNR/SSIM against the dense
output of the same seeds, fd to real data and class consistency. Writes ``caching-cpu.md``, ``.json`` and a
speedup-vs-PSNR plot.

    python benchmarks/caching_cpu.py --samples 40 --steps 50 -o benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
import time
from pathlib import Path

import torch

from dit_accel.bench.runner import pair_speedup
from dit_accel import accelerate_dit, load_recipe, remove_acceleration
from dit_accel.bench.harness import DEFAULT_BASELINE_SETTINGS, TAYLORSEER_IDENTIFIERS
from dit_accel.bench.baselines import BaselineUnavailable, apply_baseline, calibrate_magcache
from dit_accel.bench.metrics import psnr, ssim
from dit_accel.bench.quality import class_change
from dit_accel.bench.report import class_consistency_cell, format_number
from dit_accel.bench.runner import needs_calibration
from dit_accel.bench.timing import TransformerTimer
from dit_accel.pipelines import zoo
from dit_accel.pipelines.zoo.calibrations import with_shipped_calibration

# Every caching family at the rungs that reach a speed-quality front (the other rungs: earlier tables in git
# history and the `ditaccel bench` runs).
RECIPES = ["fora", "taylorseer", "taylorseer-foca", "fbcache", "fbcache-fast", "fbcache-max", "delta-dit", "cfg-share",
           "cfg-cache", "magcache", "magcache-fast", "magcache-max", "magcache-ultra", "magcache-cfg",
           "magcache-cfg-max", "magcache-cfg-ultra", "speca", "speca-cfg", "speca-cfg-max", "clusca", "freqca"]
ANCHORS = [
    ("diffusers:fbcache", {"threshold": 0.05}),
    ("diffusers:fbcache", {"threshold": 0.1}),
    ("diffusers:fbcache", {"threshold": 0.2}),
    # diffusers' default identifiers name Flux's modules only: without ours it caches nothing on the zoo models.
    ("diffusers:taylorseer", {"cache_interval": 3, "max_order": 1, "disable_cache_before_step": 3,
                              "cache_identifiers": TAYLORSEER_IDENTIFIERS}),
    ("diffusers:taylorseer", {"cache_interval": 5, "max_order": 1, "disable_cache_before_step": 3,
                              "cache_identifiers": TAYLORSEER_IDENTIFIERS}),
    ("diffusers:magcache", {"threshold": 0.06}),
    ("diffusers:magcache", {"threshold": 0.12}),
    ("diffusers:magcache", {"threshold": 0.24, "max_skip_steps": 4}),
    ("cache-dit:dbcache", {"residual_diff_threshold": 0.08, "max_warmup_steps": 2}),
    ("cache-dit:dbcache", {"residual_diff_threshold": 0.16, "max_warmup_steps": 2}),
    ("cache-dit:dbcache+taylorseer", {"residual_diff_threshold": 0.16, "max_warmup_steps": 2}),
] + [(name, DEFAULT_BASELINE_SETTINGS[name]) for name in ("cache-dit:dbcache+foca", "cache-dit:dbcache+dmd",
                                                          "cache-dit:dbcache+scm", "diffusers:fastercache",
                                                          "diffusers:pab")]
REAL_SEED = 3_000_000_019


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=40, help="images per configuration (balanced classes)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3, help="timing runs of --timing-batch images")
    parser.add_argument("--timing-batch", type=int, default=2)
    parser.add_argument("--models", nargs="*", default=list(zoo.MODELS))
    parser.add_argument("--recipes", nargs="*", default=RECIPES)
    parser.add_argument("--no-anchors", action="store_true")
    parser.add_argument("--anchors", nargs="*", default=None,
                        help="only the anchors of these names (diffusers:magcache, cache-dit:dbcache, ...)")
    parser.add_argument("--merge", action="store_true",
                        help="update the rows of an existing caching-cpu.json instead of starting a new one")
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    evaluator = zoo.evaluator()
    labels = [i % 10 for i in range(args.samples)]
    timing_labels = labels[: args.timing_batch]
    real, _ = zoo.dataset(max(args.samples, 100), seed=REAL_SEED)
    results = {"meta": {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU",
                        "torch": torch.__version__, "samples": args.samples, "steps": args.steps,
                        "repeats": args.repeats, "timing_batch": args.timing_batch}, "models": {}}

    for model in args.models:
        pipe = zoo.load(model)
        timer = TransformerTimer(pipe.transformer)

        def call(class_labels, seed=0):
            return pipe(class_labels=class_labels, num_inference_steps=args.steps, output_type="pt",
                        generator=torch.Generator().manual_seed(seed)).images

        def side_by_side(enable, disable, run=lambda generate: generate()):
            """Dense and configured runs interleaved (after one warm-up each); medians of the pairs' ratios."""
            times = {"dense": ([], []), "config": ([], [])}
            for repeat in range(args.repeats + 1):
                for variant in ("dense", "config"):
                    if variant == "config":
                        enable()
                    runner = run if variant == "config" else (lambda generate: generate())
                    timer.total = 0.0
                    start = time.perf_counter()
                    runner(lambda: call(timing_labels, seed=100 + repeat))
                    if repeat:
                        times[variant][0].append(time.perf_counter() - start)
                        times[variant][1].append(timer.total)
                    if variant == "config":
                        disable()
            return tuple(pair_speedup(d, c) for d, c in zip(times["dense"], times["config"]))

        dense = call(labels)
        rows = {"none": row(dense, dense, (1.0, 1.0), 1.0, evaluator, labels, real, kind="dense")}
        print(model, "none", rows["none"], flush=True)
        for recipe in args.recipes:
            # magcache plugins use the calibration shipped with the zoo model (its curves and searched
            # schedules), as `ditaccel generate` and `ditaccel bench` do.
            resolved = with_shipped_calibration(load_recipe(recipe), model)[0]

            def install(recipe=resolved):
                handle = accelerate_dit(pipe, recipe)
                if needs_calibration(handle):  # that generation would be dense: calibrate untimed, own seed
                    call(timing_labels, seed=999)
                return handle

            speedups = side_by_side(install, lambda: remove_acceleration(pipe))
            handle = install()
            images = call(labels)
            rows[recipe] = row(images, dense, speedups, handle.stats.flops_fraction, evaluator, labels, real,
                               kind="dit_accel")
            remove_acceleration(pipe)
            print(model, recipe, rows[recipe], flush=True)
        anchors = [] if args.no_anchors else [a for a in ANCHORS if args.anchors is None or a[0] in args.anchors]
        for name, setting in anchors:
            label = name + "(" + ", ".join(f"{k}={v}" for k, v in setting.items() if k != "cache_identifiers") + ")"
            setting = dict(setting)
            try:
                if name == "diffusers:magcache":  # calibrate once, on its own seed
                    setting["mag_ratios"] = calibrate_magcache(pipe, lambda: call(timing_labels, seed=999), args.steps)
                applied = []

                def enable(name=name, setting=setting):
                    applied.append(apply_baseline(name, pipe, num_steps=args.steps, setting=setting,
                                                  calibration=lambda: call(timing_labels, seed=999)))

                def disable():
                    applied.pop().remove()

                enable()
                disable()
            except BaselineUnavailable as reason:
                rows[label] = {"kind": "anchor", "unavailable": str(reason)}
                print(model, label, "unavailable:", reason, flush=True)
                continue
            speedups = side_by_side(enable, disable, run=lambda generate: applied[-1].run(generate))
            enable()
            try:
                images = applied[-1].run(lambda: call(labels))
            finally:
                disable()
            rows[label] = row(images, dense, speedups, None, evaluator, labels, real, kind="anchor")
            print(model, label, rows[label], flush=True)
        timer.remove()
        results["models"][model] = rows

    if "mmdit" in args.models:
        results["taylorseer_distance"] = distance_experiment(args, evaluator, labels, real)
    if args.merge and (args.out / "caching-cpu.json").is_file():
        previous = json.loads((args.out / "caching-cpu.json").read_text())
        for model, rows in results["models"].items():
            previous["models"].setdefault(model, {}).update({k: v for k, v in rows.items() if k != "none"})
        previous["taylorseer_distance"] = results.get("taylorseer_distance", previous.get("taylorseer_distance"))
        added = sorted({k for rows in results["models"].values() for k in rows if k != "none"})
        previous["meta"].setdefault("merged", []).append(
            f"`python benchmarks/caching_cpu.py {' '.join(sys.argv[1:])}` ({meta_line(results['meta'])}): "
            + ", ".join(added))
        results = previous
    (args.out / "caching-cpu.json").write_text(json.dumps(results, indent=2, default=str))
    write_markdown(results, args.out / "caching-cpu.md")
    plot(results, args.out / "caching-cpu.png")


def split_rows(names: str) -> list[str]:
    """Row names joined by ", " (an anchor's name holds ", " inside its parentheses)."""
    rows, depth, start = [], 0, 0
    for i, char in enumerate(names):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0 and names.startswith(", ", i):
            rows.append(names[start:i])
            start = i + 2
    return rows + [names[start:]]


def later_runs(merged: list[str]) -> str:
    """The runs merged after the first one, each with the rows it is the newest measurement of on some model it ran
    (a run whose rows were all measured again later is left out)."""
    seen, parts = set(), []
    for entry in reversed(merged):  # "`command` (settings): row, row, ..."
        run, names = entry.split("): ", 1)
        found = re.search(r"--models ((?:\w+ ?)+)", run)
        models = found.group(1).split() if found else list(zoo.MODELS)
        rows = [name for name in split_rows(names) if any((model, name) not in seen for model in models)]
        seen.update((model, name) for model in models for name in rows)
        if rows:
            parts.append(f" {run}): {', '.join(rows)}.")
    return (" Rows measured again later, each by its newest run:" + "".join(reversed(parts))) if parts else ""


def distance_experiment(args, evaluator, labels, real) -> dict:
    """TaylorSeer's distance in timesteps vs in step indices on a non-uniform schedule: zoo:mmdit with the
    flow-matching shift of 3 that FLUX-style schedules use (uniform schedules make the two identical)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = zoo.load("mmdit")
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)

    def call():
        return pipe(class_labels=labels, num_inference_steps=args.steps, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    dense = call()
    rows = {}
    for recipe in ("taylorseer", "taylorseer-fast", "taylorseer-max"):
        for distance in ("timestep", "step"):
            accelerate_dit(pipe, recipe, distance=distance)
            images = call()
            remove_acceleration(pipe)
            rows[f"{recipe} distance={distance}"] = {"psnr": psnr(images, dense), "ssim": ssim(images, dense),
                                                     "fd": evaluator.fd(images, real[: len(images)])}
            print("distance", recipe, distance, rows[f"{recipe} distance={distance}"], flush=True)
    return rows


def row(images, dense, speedups, flops_fraction, evaluator, labels, real, kind):
    return {
        "kind": kind,
        "wall_speedup": speedups[0],
        "transformer_speedup": speedups[1],
        "flops_speedup": None if flops_fraction is None else 1.0 / flops_fraction,
        "psnr": psnr(images, dense),
        "ssim": ssim(images, dense),
        "fd": evaluator.fd(images, real[: len(images)]),
        "class_consistency": evaluator.class_consistency(images, labels),
        **({} if kind == "dense" else class_change(evaluator, images, dense, labels)),
    }


def achieved(r: dict) -> float | None:
    """Wall speedup over FLOPs speedup: how much of the work saved shows up as time saved (None for anchors)."""
    if r.get("flops_speedup") is None or r.get("wall_speedup") is None:
        return None
    return r["wall_speedup"] / r["flops_speedup"]


def meta_line(meta: dict) -> str:
    return f"{meta['machine']}, torch {meta['torch']}, {meta['samples']} samples, {meta['steps']} steps"


def write_markdown(results: dict, path: Path) -> None:
    meta = results["meta"]
    lines = [
        "# Caching recipes vs. anchors on the zoo models (CPU)",
        "",
        f"`python benchmarks/caching_cpu.py --samples {meta['samples']} --steps {meta['steps']} --repeats "
        f"{meta['repeats']}`; {meta['machine']}, torch {meta['torch']}. Speedups are medians of the ratios of "
        f"{meta['repeats']} pairs of timed runs of {meta['timing_batch']} images, each configured run interleaved with "
        "a dense run in the same process; quality on "
        f"{meta['samples']} images (same seeds as dense): PSNR/SSIM against the dense images, fd against as many real "
        f"images, class consistency (one image moves it by {1 / meta['samples']:.3f}; `class-consistency-cpu.md` "
        "measures the goal recipes' on 400 images). FLOPs speedup is dit_accel's estimate over the transformer blocks (anchors do not "
        "report one); achieved/ideal is wall × over FLOPs ×." + later_runs(meta.get("merged", [])),
    ]
    for model, rows in results["models"].items():
        lines += ["", f"## zoo:{model}", "",
                  "| configuration | wall × | transformer × | FLOPs × | achieved/ideal | PSNR dB | SSIM | fd | class consistency |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in rows.items():
            if "unavailable" in r:
                lines.append(f"| {name} | not applicable: {r['unavailable']} |||||||| ")
                continue
            lines.append(
                f"| {name} | {format_number(r['wall_speedup'], '.2f')} | {format_number(r['transformer_speedup'], '.2f')} | "
                f"{format_number(r['flops_speedup'], '.2f')} | {format_number(achieved(r), '.2f')} | "
                f"{format_number(r['psnr'], '.2f')} | {format_number(r['ssim'], '.3f')} | "
                f"{format_number(r['fd'], '.3f')} | {class_consistency_cell(r)} |"
            )
    if "taylorseer_distance" in results:
        lines += ["", "## TaylorSeer: distance in timesteps or in steps, on a non-uniform schedule", "",
                  "zoo:mmdit with a shifted flow-matching schedule (shift 3, as FLUX uses), same seeds; quality "
                  "against its own dense output.", "", "| configuration | PSNR dB | SSIM | fd |", "|---|---|---|---|"]
        for name, r in results["taylorseer_distance"].items():
            lines.append(f"| {name} | {format_number(r['psnr'], '.2f')} | {format_number(r['ssim'], '.3f')} | {format_number(r['fd'], '.3f')} |")
    lines += ["", "![speedup vs PSNR](caching-cpu.png)"]
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    figure, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for axis, model in zip(axes[0], models):
        for name, r in results["models"][model].items():
            if "unavailable" in r or r["kind"] == "dense" or math.isinf(r["psnr"]):
                continue
            marker, color = ("o", "tab:blue") if r["kind"] == "dit_accel" else ("s", "tab:red")
            axis.scatter(r["transformer_speedup"], r["psnr"], marker=marker, color=color)
            axis.annotate(name.split("(")[0].replace("diffusers:", "d:") + ("" if "(" not in name else "*"),
                          (r["transformer_speedup"], r["psnr"]), fontsize=6)
        axis.set_title(f"zoo:{model} (blue: dit_accel, red: anchors)")
        axis.set_xlabel("transformer wall speedup (×)")
        axis.set_ylabel("PSNR vs dense (dB)")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=130)


if __name__ == "__main__":
    main()
