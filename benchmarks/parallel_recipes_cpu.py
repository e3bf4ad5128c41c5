"""The shipped recipes under sequence and patch parallelism, on the tiny pipelines (2 gloo processes).

    python benchmarks/parallel_recipes_cpu.py -o benchmarks/results

A sweep for defects, not a quality benchmark. Two parts:

* ``stacked``: on the tiny DiT, PixArt-Sigma and SD3 pipelines (split by dit_accel's own plans), every named recipe
  (but ``none`` and the patch-parallel ones) plus ``patch-parallel`` and plus ``patch-parallel-pcpp-refresh``, one
  8-step generation: ``ok`` when it ran, its output is finite and both ranks gathered the same output, ``refused``
  with the ValueError's text (attention plugins and cfg-share compute the attention patch-parallel replaces),
  ``error`` otherwise.
* ``one_process``: every caching recipe (plugins that skip or reuse work, cfg-cache included, cfg-share not) on
  every family patch-parallel splits, under patch-parallel with a synchronous warm-up over every step (so the
  attention is exact), and on Flux and Wan under diffusers' Ulysses attention: the largest difference of the second
  10-step generation's output (the first calibrates magcache) from the same recipe on one process. Equal to ~1e-6
  is what a plugin that decides alike on every rank gives; clusca differs by design (each rank clusters its shard).
  diffusers' own Ulysses attention fails on the tiny LTX-Video and Qwen-Image pipelines, so they run under patch
  only.

Writes ``parallel-recipes-cpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import torch

STACKED_FAMILIES = ("dit", "pixart-sigma", "sd3")
PATCH_RECIPES = ("patch-parallel", "patch-parallel-pcpp-refresh")
ONE_PROCESS = {"flux": ("ulysses", "patch"), "wan": ("ulysses", "patch"), "ltx": ("patch",),
               "qwen-image": ("patch",), "dit": ("patch",), "pixart-sigma": ("patch",), "sd3": ("patch",)}
NAME = "parallel-recipes-cpu"
EQUAL = 1e-5


def _outcome(error: Exception) -> tuple[str, str]:
    if isinstance(error, ValueError):
        return "refused", str(error)
    return "error", f"{type(error).__name__}: {error}"


def stacked(dist, steps: int) -> list[dict]:
    from dit_accel import accelerate_dit
    from dit_accel.pipelines import tiny
    from dit_accel.recipe import list_recipes, load_recipe

    names = [r.name for r in list_recipes() if not r.name.startswith("patch-parallel") and r.name != "none"]
    rows = []
    for family in STACKED_FAMILIES:
        for name in names:
            for patch in PATCH_RECIPES:
                row = {"family": family, "recipe": name, "patch": patch, "outcome": "ok", "detail": ""}
                try:
                    pipe = tiny.build(family)
                    handle = accelerate_dit(pipe, load_recipe(name) + load_recipe(patch))
                    image = tiny.output_of(family, pipe(**tiny.default_call_kwargs(family, steps=steps)))
                    handle.remove()
                    sums = [None] * dist.get_world_size()
                    dist.all_gather_object(sums, float(image.double().sum()))
                    finite = bool(torch.isfinite(image).all())
                    if not finite or len(set(sums)) != 1:
                        row["outcome"], row["detail"] = "error", f"finite={finite}, sums by rank {sums}"
                except Exception as error:  # noqa: BLE001 - a sweep records whatever broke
                    row["outcome"], row["detail"] = _outcome(error)
                dist.barrier()
                rows.append(row)
    return rows


def _generate(family: str, recipe, kind: str | None, steps: int) -> torch.Tensor:
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    from dit_accel import accelerate_dit
    from dit_accel.pipelines import tiny
    from dit_accel.recipe import load_recipe

    pipe = tiny.build(family)
    if kind == "ulysses":
        mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("ring", "ulysses"))
        pipe.transformer.enable_parallelism(config=ContextParallelConfig(mesh=mesh, ulysses_degree=2))
    elif kind == "patch":  # first in the recipe, so its split hooks are registered before the caches' hooks
        recipe = load_recipe("patch-parallel", warmup_steps=1000) + recipe
    handle = accelerate_dit(pipe, recipe)
    for _ in range(2):
        image = tiny.output_of(family, pipe(**tiny.default_call_kwargs(family, steps=steps)))
    handle.remove()
    return image


def one_process(dist, steps: int) -> list[dict]:
    from dit_accel.recipe import list_recipes

    torch.accelerator.device_count = lambda: 1  # diffusers places rank % device_count, 0 on the CPU
    caching = [r for r in list_recipes() if r.plugins and r.name != "cfg-share"
               and all(p.kind in ("schedule", "guidance") for p in r.plugins)]
    rows = []
    for family, kinds in ONE_PROCESS.items():
        for recipe in caching:
            single = _generate(family, recipe, None, steps)
            for kind in kinds:
                row = {"family": family, "recipe": recipe.name, "kind": kind, "outcome": "ok", "detail": ""}
                try:
                    row["max_abs_diff"] = float((_generate(family, recipe, kind, steps) - single).abs().max())
                except Exception as error:  # noqa: BLE001
                    row["outcome"], row["detail"] = _outcome(error)
                dist.barrier()
                rows.append(row)
    return rows


def worker(out: str, steps: int, parts: list[str]) -> None:
    import torch.distributed as dist

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    result = {}
    if "stacked" in parts:
        result["stacked"] = stacked(dist, steps)
    if "one_process" in parts:
        result["one_process"] = one_process(dist, max(steps, 10))
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def launch(steps: int, parts: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = Path(folder) / "rows.json"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_SIZE", "LOCAL_"))}
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                 f"--master_port={port}", __file__, "--worker", str(out), "--steps", str(steps),
                                 "--parts", *parts], env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"torchrun failed:\n{result.stderr[-4000:]}")
        return json.loads(out.read_text())


def markdown(result: dict, steps: int) -> str:
    lines = ["# The shipped recipes under parallelism (tiny pipelines, 2 gloo processes)", "",
             f"`python benchmarks/parallel_recipes_cpu.py -o benchmarks/results`; torch {torch.__version__}."]
    rows = result.get("stacked", [])
    if rows:
        counts = Counter((r["family"], r["outcome"]) for r in rows)
        lines += ["", f"## Every recipe + patch-parallel ({steps} steps)", "",
                  "ok: ran, finite, both ranks gathered the same output; refused: a ValueError; error: anything else.",
                  "", "| family | ok | refused | error |", "|---|---|---|---|"]
        lines += [f"| {f} | {counts[f, 'ok']} | {counts[f, 'refused']} | {counts[f, 'error']} |"
                  for f in STACKED_FAMILIES]
        refused = sorted({r["recipe"] for r in rows if r["outcome"] == "refused"})
        lines += ["", "Refused: " + ", ".join(f"`{name}`" for name in refused) + "."]
        errors = [r for r in rows if r["outcome"] == "error"]
        lines += ["", "Errors: " + ("none." if not errors else "")]
        lines += [f"- {r['family']} `{r['recipe']}+{r['patch']}`: {r['detail'][:300]}" for r in errors]
    rows = result.get("one_process", [])
    if rows:
        lines += ["", f"## Caching recipes against one process ({max(steps, 10)} steps, second generation)", "",
                  f"equal: within {EQUAL:g} of the same recipe on one process; patch: a synchronous warm-up over "
                  "every step.", "", "| family | setting | recipes | equal | largest difference (recipe) | errors |",
                  "|---|---|---|---|---|---|"]
        for family, kinds in ONE_PROCESS.items():
            for kind in kinds:
                group = [r for r in rows if r["family"] == family and r["kind"] == kind]
                ran = [r for r in group if r["outcome"] == "ok"]
                worst = max(ran, key=lambda r: r["max_abs_diff"], default=None)
                equal = sum(r["max_abs_diff"] <= EQUAL for r in ran)
                lines.append(f"| {family} | {kind} | {len(group)} | {equal} | "
                             + (f"{worst['max_abs_diff']:.2g} ({worst['recipe']})" if worst else "–")
                             + f" | {len(group) - len(ran)} |")
        differing = sorted({(r["recipe"], r["family"], r["kind"]) for r in rows
                            if r["outcome"] == "ok" and r["max_abs_diff"] > EQUAL})
        lines += ["", "Differing: " + (", ".join(f"`{n}` ({f}, {k})" for n, f, k in differing) or "none") + "."]
        errors = [r for r in rows if r["outcome"] != "ok"]
        lines += ["", "Errors: " + ("none." if not errors else "")]
        lines += [f"- {r['family']} {r['kind']} `{r['recipe']}`: {r['detail'][:300]}" for r in errors]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--parts", nargs="+", default=["stacked", "one_process"], choices=("stacked", "one_process"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.steps, args.parts)
    result = launch(args.steps, args.parts)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{NAME}.json").write_text(json.dumps({"steps": args.steps, "torch": torch.__version__, **result},
                                                       indent=1))
    (args.out / f"{NAME}.md").write_text(markdown(result, args.steps))
    print(markdown(result, args.steps))


if __name__ == "__main__":
    main()
