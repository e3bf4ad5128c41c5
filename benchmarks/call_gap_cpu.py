"""Why a computed call after skipped steps costs more than one in a dense run: a bare transformer call after a gap.

``step-overhead-cpu.md`` finds magcache's computed calls slower than dense's, and in one process the first three
(back to back) cost what dense's do while the later ones, each after a stretch of skipped steps, cost 0.4-0.6 ms
more. This calls the bare zoo:dit transformer (no dit_accel, 4 rows as under CFG) in a loop and puts a gap of each
kind before every timed call: nothing (the dense run), a sleep (the CPU idles), a busy spin (the thread stays
awake, no memory traffic), small tensor operations (what skipped steps and the sampler do) and a sweep over 64 MB
(the model's 8.5 MB of weights leave the caches). Kinds alternate call by call; medians of every timed call.

    python benchmarks/call_gap_cpu.py -o benchmarks/results
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

from dit_accel.pipelines import zoo

KINDS = ("none", "sleep", "spin", "small ops", "64 MB sweep")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gaps-ms", nargs="*", type=float, default=[0.5, 2.0, 8.0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    transformer = zoo.load("dit").transformer
    latent, labels = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 10, 10])
    timestep = torch.full((4,), 500.0)
    sweep = torch.randn(16_000_000)
    small = [torch.randn(4, 6, 32, 32) for _ in range(2)]

    def call() -> float:
        began = time.perf_counter()
        transformer(latent, timestep=timestep, class_labels=labels)
        return time.perf_counter() - began

    def gap(kind: str, seconds: float) -> None:
        end = time.perf_counter() + seconds
        if kind == "sleep":
            time.sleep(seconds)
        elif kind == "spin":
            while time.perf_counter() < end:
                pass
        elif kind == "small ops":
            while time.perf_counter() < end:
                small[0] * 0.5 + small[1]
        elif kind == "64 MB sweep":
            sweep.add_(1.0)

    results = {"meta": {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU",
                        "torch": torch.__version__, "rounds": args.rounds}, "gaps": {}}
    with torch.no_grad():
        for _ in range(20):
            call()
        began = time.perf_counter()
        sweep.add_(1.0)
        results["meta"]["sweep_ms"] = (time.perf_counter() - began) * 1e3
        for gap_ms in args.gaps_ms:
            times = {kind: [] for kind in KINDS}
            for _ in range(args.rounds):
                for kind in KINDS:
                    gap(kind, gap_ms / 1000)
                    times[kind].append(call())
            results["gaps"][str(gap_ms)] = {kind: statistics.median(v) * 1e3 for kind, v in times.items()}
            print(gap_ms, results["gaps"][str(gap_ms)], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "call-gap-cpu.json").write_text(json.dumps(results, indent=2))
    lines = ["# A bare zoo:dit transformer call after a gap (CPU)", "",
             f"`python benchmarks/call_gap_cpu.py -o benchmarks/results`; {results['meta']['machine']}, torch "
             f"{results['meta']['torch']}; 4 rows, medians of {args.rounds} calls per cell, kinds alternating. "
             f"The 64 MB sweep is one pass whatever the gap column says ({results['meta']['sweep_ms']:.1f} ms here).", "",
             "| gap | " + " | ".join(KINDS) + " |", "|---|" + "---|" * len(KINDS)]
    for gap_ms, row in results["gaps"].items():
        base = row["none"]
        lines.append(f"| {gap_ms} ms | " + " | ".join(
            f"{row[k]:.2f} ms" + ("" if k == "none" else f" ({row[k] - base:+.2f})") for k in KINDS) + " |")
    (args.out / "call-gap-cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
