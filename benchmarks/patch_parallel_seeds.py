"""patch-parallel's PSNR over several seeds: per-seed runs of ``patch_parallel_cpu.py`` pooled.

One seed is two images, and on zoo:mmdit (8x8 tokens) the PSNR of one setting moves by several dB from seed to seed
(DistriFusion with 4 processes: 32 to 39 dB). This reads the JSON files of runs that differ only in ``--seed`` and
writes, per model, process count and mode, every seed's PSNR, the pooled PSNR (the mean squared error of all the
seeds' images, as one number: images are in [0, 1], so ``-10 log10(mean 10^(-PSNR/10))``), the worst seed and the
bytes per step (which do not depend on the seed).

    python benchmarks/patch_parallel_seeds.py benchmarks/results/patch-parallel-growth-cpu.json \\
        benchmarks/results/patch-parallel-growth-seed{1,2,3}-cpu.json --name patch-parallel-growth-seeds-cpu
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

GOAL_BYTES, GOAL_PSNR = 0.35, 30.0


def pooled_psnr(values: list[float]) -> float:
    """The PSNR of the pooled mean squared error of runs with these PSNRs (equal image counts, peak 1)."""
    mse = [10.0 ** (-value / 10.0) for value in values]
    return -10.0 * math.log10(sum(mse) / len(mse))


def pool(runs: list[dict]) -> list[dict]:
    seeds = [run["meta"]["seed"] for run in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"the runs share a seed ({seeds}); pass one run per seed")
    groups: dict[tuple, dict] = {}
    for run in runs:
        for row in run["rows"]:
            key = (row["model"], row["world"], row["mode"])
            group = groups.setdefault(key, {"model": row["model"], "world": row["world"], "mode": row["mode"],
                                            "psnr_by_seed": {}, "bytes_per_step": row["bytes_per_step"]})
            group["psnr_by_seed"][run["meta"]["seed"]] = row["psnr"]
    rows = []
    for group in groups.values():
        if sorted(group["psnr_by_seed"]) != sorted(seeds):
            continue  # a setting some run lacks: not pooled
        values = list(group["psnr_by_seed"].values())
        group["pooled_psnr"], group["worst_psnr"] = pooled_psnr(values), min(values)
        rows.append(group)
    for row in rows:
        reference = next(r for r in rows if (r["model"], r["world"], r["mode"]) == (row["model"], row["world"],
                                                                                    "distrifusion"))
        row["bytes_vs_distrifusion"] = row["bytes_per_step"] / reference["bytes_per_step"]
    return rows


def write_markdown(rows: list[dict], files: list[str], seeds: list[int], path: Path) -> None:
    lines = [f"# patch-parallel over seeds {', '.join(map(str, seeds))} (CPU, gloo)", "",
             "Pooled from " + ", ".join(f"`{Path(f).name}`" for f in files)
             + " (the same command but `--seed`; see each for the settings and the machine). Pooled PSNR: the mean "
             "squared error of every seed's images against the single-process run; worst: the worst seed. Bytes "
             "per step after warm-up, all ranks together (counted, not timed).", "",
             "| model | processes | mode | " + " | ".join(f"seed {s}" for s in seeds)
             + " | pooled PSNR | worst | bytes vs DistriFusion |", "|---|---|---|" + "---|" * (len(seeds) + 3)]
    for row in rows:
        cells = " | ".join(f"{row['psnr_by_seed'][s]:.2f}" for s in seeds)
        lines.append(f"| {row['model']} | {row['world']} | {row['mode']} | {cells} | {row['pooled_psnr']:.2f} | "
                     f"{row['worst_psnr']:.2f} | {row['bytes_vs_distrifusion']:.0%} |")
    lines.append("")
    for row in rows:
        if row["mode"] == "distrifusion":
            continue
        pooled = row["bytes_vs_distrifusion"] <= GOAL_BYTES and row["pooled_psnr"] >= GOAL_PSNR
        every = row["bytes_vs_distrifusion"] <= GOAL_BYTES and row["worst_psnr"] >= GOAL_PSNR
        lines.append(f"Goal (<= {GOAL_BYTES:.0%} of DistriFusion's bytes per step at PSNR >= {GOAL_PSNR:.0f} dB), "
                     f"{row['model']}, {row['world']} processes, {row['mode']}: pooled {'met' if pooled else 'not met'}"
                     f"; on every seed {'met' if every else 'not met'}.")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="JSON files of patch_parallel_cpu.py runs, one per seed")
    parser.add_argument("--name", required=True, help="output file stem")
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    runs = [json.loads(Path(f).read_text()) for f in args.runs]
    rows = pool(runs)
    seeds = [run["meta"]["seed"] for run in runs]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"files": args.runs, "seeds": seeds, "rows": rows},
                                                           indent=2))
    write_markdown(rows, args.runs, seeds, args.out / f"{args.name}.md")


if __name__ == "__main__":
    main()
