"""Caching through a custom loop on the evaluation-only model: zoo:flowdit's bare transformer driven by a
hand-written flow-matching Euler loop (no scheduler, no pipeline; CFG batched, conditional rows first), dit_accel's
recipes declared with ``handle.generation`` against diffusers' hooks on the same loop.

    python benchmarks/custom_loop_cpu.py -o benchmarks/results --samples 16 --repeats 3

Quality: PSNR of the final samples against the dense loop's, same seeds. Speed: each configuration timed
alternately with the dense loop (``repeats`` pairs after a warm-up pair), median of the pairs' ratios. magcache calibrates
once on a seed that is never measured; diffusers' MagCache likewise (its own calibration mode).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

from dit_accel.bench.runner import pair_speedup
from dit_accel import accelerate_dit, load_recipe, remove_acceleration
from dit_accel.bench.harness import TAYLORSEER_IDENTIFIERS
from dit_accel.pipelines import zoo
from dit_accel.pipelines.zoo.calibrations import with_shipped_calibration

STEPS = 50
RECIPES = ["fora", "taylorseer", "taylorseer-foca", "taylorseer-cfg", "fbcache", "fbcache-fast", "magcache",
           "magcache-fast", "magcache-max", "magcache-ultra", "cfg-cache", "magcache-cfg-max", "magcache-cfg-ultra"]


def euler(transformer, labels: torch.Tensor, seed: int, guidance: float = 2.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(len(labels), 3, 32, 32, generator=generator)
    null = torch.full_like(labels, 10)
    sigmas = torch.linspace(1.0, 1.0 / STEPS, STEPS).tolist() + [0.0]
    with torch.no_grad():
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            out = transformer(torch.cat([x, x]), timestep=torch.full((2 * len(labels),), sigma * 1000),
                              class_labels=torch.cat([labels, null])).sample
            cond, uncond = out.chunk(2)
            x = x + (sigma_next - sigma) * (uncond + guidance * (cond - uncond))
    return ((x + 1) / 2).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a - b) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-12)
    return float((10 * torch.log10(1 / mse)).mean())


class Diffusers:
    """diffusers' hooks on the bare transformer: one cache context for the whole loop, state reset after it."""

    def __init__(self, transformer, name: str, setting: dict, calibrate) -> None:
        import diffusers
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        self.t, self.registry = transformer, HookRegistry.check_if_exists_or_initialize(transformer)
        self._set, self._context = _set_cache_context, CacheContext
        if name == "magcache":
            diffusers.apply_mag_cache(transformer, diffusers.MagCacheConfig(calibrate=True, num_inference_steps=STEPS))
            self.registry.invalidate_child_registries_cache()
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                self.run(calibrate)
            self.remove()
            ratios = [line for line in printed.getvalue().splitlines() if line.strip().startswith("[")][-1]
            setting = dict(setting, mag_ratios=json.loads(ratios), num_inference_steps=STEPS)
            diffusers.apply_mag_cache(transformer, diffusers.MagCacheConfig(**setting))
        elif name == "fbcache":
            diffusers.apply_first_block_cache(transformer, diffusers.FirstBlockCacheConfig(**setting))
        else:
            diffusers.apply_taylorseer_cache(transformer, diffusers.TaylorSeerCacheConfig(
                taylor_factors_dtype=torch.float32, cache_identifiers=TAYLORSEER_IDENTIFIERS, **setting))
        self.registry.invalidate_child_registries_cache()

    def run(self, loop):
        self._set(self.t, self._context("cond"))
        try:
            return loop()
        finally:
            self._set(self.t, None)
            self.registry.reset_stateful_hooks()

    def remove(self) -> None:
        from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
        from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK
        from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

        for name in (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK, _MAG_CACHE_BLOCK_HOOK,
                     _TAYLORSEER_CACHE_HOOK):
            self.registry.remove_hook(name, recurse=True)
        self.registry.invalidate_child_registries_cache()


BASELINES = [("diffusers:fbcache@0.1", "fbcache", {"threshold": 0.1}),
             ("diffusers:fbcache@0.2", "fbcache", {"threshold": 0.2}),
             ("diffusers:taylorseer", "taylorseer", {"cache_interval": 3, "max_order": 1, "disable_cache_before_step": 3}),
             ("diffusers:magcache@0.06", "magcache", {"threshold": 0.06, "max_skip_steps": 3, "retention_ratio": 0.2}),
             ("diffusers:magcache@0.24", "magcache", {"threshold": 0.24, "max_skip_steps": 4, "retention_ratio": 0.2})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--recipes", nargs="*", default=RECIPES, help="dit_accel recipes to run")
    parser.add_argument("--baselines", nargs="*", default=[label for label, _, _ in BASELINES],
                        help="diffusers baselines to run (labels of BASELINES)")
    parser.add_argument("--shipped-calibration", action="store_true",
                        help="give magcache plugins zoo:flowdit's shipped calibration (its curves and searched "
                             "schedules, measured through the pipeline) instead of calibrating in this loop; rows "
                             "are labelled '<recipe> (shipped calibration)'")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of the previous results file that this run does not measure")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformer = zoo.load("flowdit").transformer
    dense_transformer = copy.deepcopy(transformer)  # the same weights, never hooked: the dense side of the timing
    chunks = [(torch.arange(k, k + args.batch) % 10, 20_000 + k) for k in range(0, args.samples, args.batch)]

    def quality_pass(run=lambda loop: loop()):
        return torch.cat([run(lambda c=c: euler(transformer, *c)) for c in chunks])

    dense = quality_pass()
    timing_chunk = chunks[0]
    rows = []

    for name in args.recipes:
        recipe = name
        if args.shipped_calibration:
            recipe = with_shipped_calibration(load_recipe(name), "flowdit")[0]
            name = f"{name} (shipped calibration)"
        handle = accelerate_dit(transformer, recipe)

        def run(loop, handle=handle):
            with handle.generation(num_steps=STEPS, cfg="batched-cond-first", prediction="flow"):
                return loop()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run(lambda: euler(transformer, torch.arange(args.batch) % 10, 99_999))  # calibration (magcache)
        images = quality_pass(run)
        flops = handle.stats.flops_fraction
        speed = side_by_side_pairs(dense_transformer, transformer, timing_chunk, run, args.repeats)
        remove_acceleration(transformer)
        rows.append({"configuration": name, "kind": "dit_accel", "wall_speedup": round(speed, 3),
                     "psnr": round(psnr(images, dense), 2), "flops_fraction": round(flops, 3)})
        print(rows[-1], flush=True)
    for label, name, setting in (b for b in BASELINES if b[0] in args.baselines):
        baseline = Diffusers(transformer, name, setting,
                             lambda: euler(transformer, torch.arange(args.batch) % 10, 99_999))
        images = quality_pass(baseline.run)
        speed = side_by_side_pairs(dense_transformer, transformer, timing_chunk, baseline.run, args.repeats)
        baseline.remove()
        rows.append({"configuration": label, "kind": "baseline", "wall_speedup": round(speed, 3),
                     "psnr": round(psnr(images, dense), 2), "flops_fraction": None})
        print(rows[-1], flush=True)
    if args.merge and (args.out / "custom-loop-flowdit.json").is_file():  # rows measured earlier, in their order
        measured = {r["configuration"]: r for r in rows}
        previous = json.loads((args.out / "custom-loop-flowdit.json").read_text())["rows"]
        kept = [measured.pop(r["configuration"], r | {"earlier_run": True}) for r in previous]
        rows = kept + list(measured.values())
    write(args, rows)


def side_by_side_pairs(dense_transformer, transformer, chunk, run, repeats: int) -> float:
    """Dense and configured loops alternately (a warm-up pair first); median of the pairs' time ratios."""
    dense_times, times = [], []
    for i in range(repeats + 1):
        start = time.perf_counter()
        euler(dense_transformer, *chunk)
        dense = time.perf_counter() - start
        start = time.perf_counter()
        run(lambda: euler(transformer, *chunk))
        if i:
            dense_times.append(dense)
            times.append(time.perf_counter() - start)
    return pair_speedup(dense_times, times)


def write(args, rows: list[dict]) -> None:
    machine = f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}"
    lines = ["# Caching through a custom loop on zoo:flowdit (evaluation-only)", "",
             f"`python benchmarks/custom_loop_cpu.py {' '.join(sys.argv[1:])}` on {machine}: the bare transformer, "
             f"a hand-written Euler loop with batched CFG, {STEPS} steps; rows marked (earlier run) are kept from the "
             "previous results file (`--merge`); dit_accel recipes declared with `handle.generation(num_steps=50, "
             "cfg='batched-cond-first', prediction='flow')` (earlier runs' rows, without `prediction`, forecast the "
             "prediction itself), diffusers' hooks with one cache context per loop. Nothing was tuned on this "
             "model; rows marked (shipped calibration) use the calibration shipped with zoo:flowdit, whose schedules "
             "were searched through its pipeline on calibration generations (seeds 10001-10006) by `ditaccel "
             "calibrate --search-schedule`, not in this loop.", "",
             "| configuration | kind | wall x | PSNR dB | FLOPs x |", "|---|---|---|---|---|"]
    for r in rows:
        flops = f"{1 / r['flops_fraction']:.2f}" if r["flops_fraction"] else "–"
        name = r["configuration"] + (" (earlier run)" if r.get("earlier_run") else "")
        lines.append(f"| {name} | {r['kind']} | {r['wall_speedup']:.2f} | {r['psnr']:.2f} | {flops} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "custom-loop-flowdit.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    (args.out / "custom-loop-flowdit.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
