"""patch-parallel on CPU: DistriFusion against PCPP, 2 and 4 gloo processes, against the single-process dense run.

    python benchmarks/patch_parallel_cpu.py -o benchmarks/results            # the full run (2 and 4 processes)
    python benchmarks/patch_parallel_cpu.py -o /tmp/pp --smoke               # 2 processes, 4 steps, smallest sizes
    python benchmarks/patch_parallel_cpu.py -o out --device cuda --worlds 2 4  # one GPU per process (NCCL): real times

For each world size the script launches itself under ``torchrun --nproc_per_node=N`` (gloo). Every rank first runs
the dense pipeline alone (the reference), then the same generation under ``patch-parallel`` (DistriFusion: every
row of every patch exchanged, one step stale) and ``patch-parallel-pcpp`` (``band`` rows next to each patch exact,
the rest as ``pool x pool`` mean tiles; by default two settings, ``--pcpp 1:4 1:8``), each with the cached
correction (``correction="residual"``: exact minus pooled attention measured on the synchronous steps, added on
the others) and without (``--corrections``), and optionally with periodic synchronous refreshes
(``--refresh K ...``, ``refresh_interval``). Reported per model, world size and mode:

* PSNR of the generated images (in [0, 1]) against the single-process dense images, same seeds;
* bytes exchanged per step after warm-up, summed over all ranks, *counted* (the payloads handed to
  ``all_to_all_single``), not timed; and the PCPP / DistriFusion ratio (goal: <= 35 % at PSNR >= 30 dB);
* wall time per generation, labelled as what it is: a CPU simulation (N processes share this machine's cores and
  gloo's loopback transport; it says nothing about GPU speed-ups).

Models: the tiny random-init Flux pipeline (``--size`` pixels, 16x16 tokens at 64), zoo:mmdit (trained, Flux
architecture, 8x8 tokens, true CFG as two calls) and ``zoo:mmdit-64`` (the same model sampled at 64 px = 16x16
tokens, outside its 32 px training resolution: RoPE takes any position, but rows and columns 8-15 were never seen in
training, so its images are no real samples; PSNR against the single process still measures the parallelism),
zoo:dit (trained DiT, 8x8 tokens, batched CFG) and zoo:flowdit (the evaluation-only model: trained flow-matching DiT,
16x16 tokens, batched CFG); the DiT models are split with dit_accel's own plan (diffusers gives them no
``_cp_plan``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODELS = ("flux", "zoo:mmdit", "zoo:mmdit-64", "zoo:dit", "zoo:flowdit")
NAME = "patch-parallel-cpu"
CORRECTIONS = ("residual", "detail", "none")
CORRECTION_LABELS = {"residual": "residual correction", "detail": "detail correction", "none": "no correction"}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.clamp(0, 1) - b.clamp(0, 1)) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(1 / mse)).mean())


# ------------------------------------------------------------------------------------------------- worker side
@contextlib.contextmanager
def _zoo_image_size(size: int):
    """The zoo pipelines read their image side from module globals: sample at ``size`` px while inside."""
    from dit_accel.pipelines.zoo import models, pipelines

    saved = models.IMAGE_SIZE, pipelines.IMAGE_SIZE
    models.IMAGE_SIZE = pipelines.IMAGE_SIZE = size
    try:
        yield
    finally:
        models.IMAGE_SIZE, pipelines.IMAGE_SIZE = saved


def _generate(model: str, recipe: str | None, args, settings: dict) -> tuple[torch.Tensor, float, object]:
    if model == "zoo:mmdit-64":
        with _zoo_image_size(64):
            return _generate("zoo:mmdit", recipe, args, settings)
    from dit_accel import accelerate_dit

    if model.startswith("zoo:"):
        from dit_accel.pipelines import zoo

        pipe = zoo.load(model[len("zoo:"):])
        call = {"class_labels": [3, 7], "num_inference_steps": args.steps, "output_type": "pt"}
    else:
        from dit_accel.pipelines import tiny

        pipe = tiny.build("flux", num_layers=2)
        call = tiny.default_call_kwargs("flux", steps=args.steps)
        call.update(height=args.size, width=args.size)
    pipe.to(_device(args))
    handle = None
    if args.cache:  # the cache alone (the reference), or the cache plus patch-parallel
        from dit_accel.pipelines.zoo.calibrations import with_shipped_calibration
        from dit_accel.recipe import load_recipe

        cached = load_recipe(args.cache)
        if model.startswith("zoo:"):
            cached = with_shipped_calibration(cached, model[len("zoo:"):].split("-")[0])[0]
        handle = accelerate_dit(pipe, cached + load_recipe(recipe, **settings) if recipe else cached)
    elif recipe:
        handle = accelerate_dit(pipe, recipe, **settings)
    call["generator"] = torch.Generator().manual_seed(args.seed)  # CPU noise: the same on every device
    _synchronize(args)
    start = time.perf_counter()
    with torch.no_grad():
        output = pipe(**call)
    _synchronize(args)
    wall = time.perf_counter() - start
    images = (output.images if model.startswith("zoo:") else tiny.output_of("flux", output)).float().cpu()
    plugin = next((p for p in handle.transformers[0].plugins if p.name == "patch-parallel"), None) if (
        handle is not None) else None
    stats = None if plugin is None else {"bytes_per_step": plugin.bytes_per_step,
                                         "bytes_by_step": dict(plugin.bytes_by_step),
                                         "fallbacks": sum(plugin.fallbacks.values()),
                                         "corrected_calls": plugin.corrections.applied}
    if handle is not None:
        handle.remove()
    return images, wall, stats


def _device(args) -> torch.device:
    return torch.device(f"cuda:{torch.cuda.current_device()}" if args.device == "cuda" else "cpu")


def _synchronize(args) -> None:
    if args.device == "cuda":
        torch.cuda.synchronize()


def worker(args) -> None:
    import torch.distributed as dist

    if args.device == "cuda":  # one GPU per process, NCCL: the wall times are real
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:  # processes share this machine's cores over gloo's loopback: the wall times are a simulation
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    for model in args.models:
        reference, dense_wall, _ = _generate(model, None, args, {})  # --cache: the cache on one process
        modes = {"distrifusion": ("patch-parallel", {"warmup_steps": args.warmup})}
        for band, pool, fixed_correction, fixed_refresh, growth in args.pcpp:
            for correction in [fixed_correction] if fixed_correction else args.corrections:
                for refresh in [fixed_refresh] if fixed_refresh is not None else args.refresh:
                    name = f"pcpp band {band} pool {pool}, {CORRECTION_LABELS[correction]}" + (
                        f", refresh {refresh}" if refresh else "") + (f" growth {growth}" if growth else "")
                    modes[name] = ("patch-parallel-pcpp", {"warmup_steps": args.warmup, "band": band, "pool": pool,
                                                           "correction": correction, "refresh_interval": refresh,
                                                           **({"refresh_growth": growth} if growth else {})})
        if args.plain:  # each mode again with the remote keys and values used as exchanged (one step stale)
            modes.update({f"{mode}, not extrapolated": (recipe, {**settings, "extrapolate": False})
                          for mode, (recipe, settings) in list(modes.items())})
        for mode, (recipe, settings) in modes.items():
            images, wall, stats = _generate(model, recipe, args, settings)
            every = [None] * world
            dist.all_gather_object(every, stats)
            rows.append({"model": model, "world": world, "mode": mode, "settings": settings, "cache": args.cache,
                         "psnr": psnr(images, reference), "dense_wall_s": dense_wall, "wall_s": wall,
                         "bytes_per_step": sum(s["bytes_per_step"] for s in every),
                         "bytes_per_step_with_warmup": sum(sum(s["bytes_by_step"].values())
                                                           for s in every) / args.steps,
                         "bytes_per_step_by_rank": [s["bytes_per_step"] for s in every],
                         "bytes_by_step_rank0": every[0]["bytes_by_step"],
                         "fallbacks": sum(s["fallbacks"] for s in every),
                         "corrected_calls": sum(s["corrected_calls"] for s in every)})
    if rank == 0:
        Path(args.worker_out).write_text(json.dumps(rows))
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------- launcher side
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "rows.json"
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
                   f"--master_port={_free_port()}", __file__, "--worker", "--worker-out", str(out),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--size", str(args.size),
                   "--seed", str(args.seed), "--pcpp", *map(_spec, args.pcpp), "--models", *args.models,
                   "--corrections", *args.corrections, "--refresh", *map(str, args.refresh)] + (
                       ["--plain"] if args.plain else []) + (["--cache", args.cache] if args.cache else []) + [
                       "--device", args.device]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_SIZE", "LOCAL_"))}
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"torchrun with {world} processes failed:\n{result.stderr[-4000:]}")
        return json.loads(out.read_text())


def _base(rows: list[dict], row: dict) -> dict:
    return next(r for r in rows if r["model"] == row["model"] and r["world"] == row["world"]
                and r["mode"] == "distrifusion")


def markdown(rows: list[dict], args) -> str:
    tokens = args.size // 4
    gpu = getattr(args, "device", "cpu") == "cuda"
    lines = [f"# patch-parallel on {'GPUs (NCCL)' if gpu else 'CPU (gloo)'}{' - SMOKE RUN' if args.smoke else ''}"
             f"{args.title}", "",
             f"{args.steps} steps, the first {args.warmup} synchronous (exact). PCPP: `band` rows next to each patch "
             "exact, the rest of the other patches as `pool` x `pool` mean tiles. Models: tiny Flux (random init, "
             f"{args.size} px = {tokens}x{tokens} tokens; its images depend little on attention, so its PSNR says "
             "little), zoo:mmdit (trained, Flux architecture, 8x8 tokens, 2 images, true CFG) and zoo:mmdit-64 (the "
             "same model at 64 px = 16x16 tokens, OUTSIDE its 32 px training resolution: no real samples, but the "
             "PSNR against the single process still measures the parallelism), zoo:dit (trained DiT, 8x8 tokens, "
             "2 images, batched CFG) and zoo:flowdit (the evaluation-only model, never tuned on: trained "
             "flow-matching DiT, 16x16 tokens, 2 images, batched CFG). Corrections, learned on the synchronous "
             "steps (warm-up, refreshes), where every rank receives the other patches whole, and used on the PCPP "
             "steps after them, no extra bytes: `detail` keeps the far rows less their tile's mean and expands the "
             "received tiles back to tokens (tile + detail; DistriFusion's memory and attention cost); `residual` "
             "keeps exact minus PCPP attention output and adds it. `refresh K`: every K-th step after warm-up is "
             "synchronous (full bytes, counted; the step before it sends nothing). Seed " + str(args.seed) + ".", "",
             ("PSNR: images against the single-process dense run, same seed." if not args.cache else
              f"Every mode is `{args.cache}` + patch-parallel (the zoo models' shipped magcache calibrations); PSNR: "
              f"images against `{args.cache}` on one process, same seed (its own PSNR against dense is not "
              "here); the bytes per step average every step after warm-up, the skipped ones (nothing exchanged) "
              "included.") + " Bytes: all ranks together, counted (the "
             "payloads handed to all_to_all_single), not timed; per step after warm-up (steps that post an "
             "exchange), and averaged over every step including the synchronous warm-up and the last step. Wall "
             + (f"time is a CPU simulation: every process shares this machine's {os.cpu_count()} cores and gloo's "
                "loopback; it says nothing about GPU speed." if not gpu else
                "time: one GPU per process, NCCL, synchronized around each generation (one run each, not a "
                "median)."), "",
             "| model | processes | mode | PSNR (dB) | bytes / step | vs DistriFusion | bytes / step incl. warm-up "
             f"| wall s ({'GPU' if gpu else 'CPU sim.'}) | dense wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        base = _base(rows, row)
        share = row["bytes_per_step"] / base["bytes_per_step"] if base["bytes_per_step"] else float("nan")
        lines.append(f"| {row['model']} | {row['world']} | {row['mode']} | {row['psnr']:.2f} | "
                     f"{row['bytes_per_step']:,.0f} | {share:.0%} | {row['bytes_per_step_with_warmup']:,.0f} | "
                     f"{row['wall_s']:.2f} | {row['dense_wall_s']:.2f} |")
    lines.append("")
    if args.cache:  # the goal is about DistriFusion without a cache; say what the cache saves against that instead
        for row in rows:
            # a full exchange (DistriFusion's every step) is the largest step; every rank sends as much
            full = max(row["bytes_by_step_rank0"].values()) * row["world"]
            lines.append(f"{row['model']}, {row['world']} processes, {row['mode']}: "
                         f"{row['bytes_per_step'] / full:.0%} of DistriFusion's bytes per step without the cache "
                         f"({full:,.0f}).")
        lines.append("")
        return "\n".join(lines)
    for mode in sorted({r["mode"] for r in rows} - {"distrifusion"}):
        met = [r["psnr"] >= 30 and r["bytes_per_step"] <= 0.35 * _base(rows, r)["bytes_per_step"]
               for r in rows if r["mode"] == mode]
        lines.append(f"Goal (<= 35 % of DistriFusion's bytes per step at PSNR >= 30 dB), {mode}: met on "
                     f"{sum(met)} of {len(met)} rows.")
    lines.append("")
    return "\n".join(lines)


def _band_pool(text: str) -> tuple[int, int, str | None, int | None, float | None]:
    """``BAND:POOL[:CORRECTION[:REFRESH[:GROWTH]]]``; what is left out comes from --corrections and --refresh
    (growth: 1)."""
    fields = text.split(":")
    try:
        if not 2 <= len(fields) <= 5 or (len(fields) > 2 and fields[2] not in CORRECTIONS):
            raise ValueError
        return (int(fields[0]), int(fields[1]), fields[2] if len(fields) > 2 else None,
                int(fields[3]) if len(fields) > 3 else None, float(fields[4]) if len(fields) > 4 else None)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not BAND:POOL[:CORRECTION[:REFRESH[:GROWTH]]] (e.g. 1:4, 0:2:detail:6, 0:4:detail:2:1.5; "
            f"corrections: {', '.join(CORRECTIONS)})") from None


def _spec(item: tuple) -> str:
    band, pool, correction, refresh, growth = item
    return ":".join(str(x) for x in (band, pool, correction, refresh, growth) if x is not None) if correction else (
        f"{band}:{pool}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--smoke", action="store_true", help="2 processes, 4 steps, 32 px: checks the script runs")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--pcpp", type=_band_pool, nargs="+",
                        default=[(1, 4, None, None, None), (1, 8, None, None, None)],
                        metavar="BAND:POOL[:CORRECTION[:REFRESH[:GROWTH]]]",
                        help="PCPP settings to compare with DistriFusion (default: 1:4 1:8, each with every "
                             "--corrections and --refresh)")
    parser.add_argument("--size", type=int, default=64, help="tiny Flux image side in pixels (tokens: size / 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plain", action="store_true",
                        help="also run every mode without extrapolating the remote keys/values (extrapolate=false)")
    parser.add_argument("--models", nargs="+", default=["flux", "zoo:mmdit"], choices=MODELS,
                        help="default: flux zoo:mmdit (zoo:mmdit-64: 16x16 tokens, outside the training size; "
                             "zoo:dit 8x8 and zoo:flowdit 16x16 tokens, DiT)")
    parser.add_argument("--corrections", nargs="+", default=["residual", "none"], choices=CORRECTIONS,
                        help="PCPP correction settings to run (default: residual none)")
    parser.add_argument("--refresh", type=int, nargs="+", default=[0], metavar="K",
                        help="PCPP refresh_interval settings to run (default: 0, never)")
    parser.add_argument("--cache", default=None, metavar="RECIPE",
                        help="compose every mode with this caching recipe (the zoo models' shipped magcache "
                             "calibrations applied); the reference is then the cache on one process")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cpu: gloo processes sharing this machine (default); cuda: one GPU per process, NCCL "
                             "(the wall times are then real speedups)")
    parser.add_argument("--name", default=NAME, help=f"output file stem (default {NAME})")
    parser.add_argument("--title", default="", help="appended to the markdown title (e.g. a calibration note)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.smoke:
        args.worlds, args.steps, args.size = [2], 4, 32
    rows = [row for world in args.worlds for row in launch(world, args)]
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"steps": args.steps, "warmup": args.warmup, "pcpp": args.pcpp, "size": args.size, "cache": args.cache,
            "seed": args.seed, "smoke": args.smoke, "corrections": args.corrections, "refresh": args.refresh,
            "models": args.models, "torch": torch.__version__, "machine": platform.machine(),
            "cpus": os.cpu_count(), "device": args.device,
            "wall": "CPU simulation (processes share this machine's cores; gloo loopback)" if args.device == "cpu"
            else f"{torch.cuda.get_device_name()}, one per process, NCCL"}
    (args.out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / f"{args.name}.md").write_text(markdown(rows, args))
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
