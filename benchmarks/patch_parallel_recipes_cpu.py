"""Every shipped recipe stacked on patch-parallel, on the tiny DiT, PixArt-Sigma and SD3 pipelines (2 gloo processes).

    python benchmarks/patch_parallel_recipes_cpu.py -o benchmarks/results

A sweep for defects, not a quality benchmark: for each family, each named recipe (but ``none`` and the
patch-parallel ones) plus ``patch-parallel`` (DistriFusion) and plus ``patch-parallel-pcpp-refresh``, one 8-step
generation on every rank. A row is ``ok`` when it ran, its output is finite and both ranks gathered the same output
(sum compared exactly), ``refused`` with the ValueError's text when the combination is refused (attention plugins
and cfg-share compute the attention patch-parallel replaces), and ``error`` otherwise. Writes
``patch-parallel-recipes-cpu.json`` and ``.md``.
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

FAMILIES = ("dit", "pixart-sigma", "sd3")
PATCH_RECIPES = ("patch-parallel", "patch-parallel-pcpp-refresh")
NAME = "patch-parallel-recipes-cpu"


def worker(out: str, steps: int) -> None:
    import torch.distributed as dist

    from dit_accel import accelerate_dit
    from dit_accel.pipelines import tiny
    from dit_accel.recipe import list_recipes, load_recipe

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    names = [r.name for r in list_recipes() if not r.name.startswith("patch-parallel") and r.name != "none"]
    rows = []
    for family in FAMILIES:
        for name in names:
            for patch in PATCH_RECIPES:
                row = {"family": family, "recipe": name, "patch": patch}
                try:
                    pipe = tiny.build(family)
                    handle = accelerate_dit(pipe, load_recipe(name) + load_recipe(patch))
                    image = tiny.output_of(family, pipe(**tiny.default_call_kwargs(family, steps=steps)))
                    handle.remove()
                    sums = [None] * dist.get_world_size()
                    dist.all_gather_object(sums, float(image.double().sum()))
                    finite = bool(torch.isfinite(image).all())
                    row["outcome"] = "ok" if finite and len(set(sums)) == 1 else "error"
                    row["detail"] = "" if row["outcome"] == "ok" else f"finite={finite}, sums by rank {sums}"
                except ValueError as error:
                    row["outcome"], row["detail"] = "refused", str(error)
                except Exception as error:  # noqa: BLE001 - a sweep records whatever broke
                    row["outcome"], row["detail"] = "error", f"{type(error).__name__}: {error}"
                dist.barrier()
                rows.append(row)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def launch(steps: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        out = Path(folder) / "rows.json"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_SIZE", "LOCAL_"))}
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                 f"--master_port={port}", __file__, "--worker", str(out), "--steps", str(steps)],
                                env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"torchrun failed:\n{result.stderr[-4000:]}")
        return json.loads(out.read_text())


def markdown(rows: list[dict], steps: int) -> str:
    counts = Counter((r["family"], r["outcome"]) for r in rows)
    lines = [f"# Every shipped recipe + patch-parallel on the tiny DiT, PixArt-Sigma and SD3 (2 gloo processes, "
             f"{steps} steps)", "", f"`python benchmarks/patch_parallel_recipes_cpu.py -o benchmarks/results`; torch "
             f"{torch.__version__}. ok: ran, finite, both ranks gathered the same output; refused: a ValueError; "
             "error: anything else.", "", "| family | ok | refused | error |", "|---|---|---|---|"]
    for family in FAMILIES:
        lines.append(f"| {family} | {counts[family, 'ok']} | {counts[family, 'refused']} | {counts[family, 'error']} |")
    refused = sorted({r["recipe"] for r in rows if r["outcome"] == "refused"})
    lines += ["", "Refused: " + ", ".join(f"`{name}`" for name in refused) + "."]
    errors = [r for r in rows if r["outcome"] == "error"]
    lines += ["", "Errors: " + ("none." if not errors else "")]
    lines += [f"- {r['family']} `{r['recipe']}+{r['patch']}`: {r['detail'][:300]}" for r in errors]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.steps)
    rows = launch(args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{NAME}.json").write_text(json.dumps({"steps": args.steps, "torch": torch.__version__,
                                                        "rows": rows}, indent=1))
    (args.out / f"{NAME}.md").write_text(markdown(rows, args.steps))
    print(markdown(rows, args.steps))


if __name__ == "__main__":
    main()
