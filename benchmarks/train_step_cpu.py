"""Zoo training step time on the CPU: fp32 against ``--precision bf16`` (and ``--compile`` for mmdit).

One optimizer step (forward, backward, AdamW) of each preset at batch 64 on fixed data, the configurations
interleaved round by round after a warm-up (compilation included there), median and IQR per configuration.

    python benchmarks/train_step_cpu.py --threads 1 -o benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from dit_accel.pipelines.zoo import models, train
from dit_accel.pipelines.zoo.shapes import dataset

CONFIGS = [("dit", "fp32", False), ("dit", "bf16", False), ("mmdit", "fp32", False), ("mmdit", "bf16", True)]


def make_step(preset: str, precision: str, compiled: bool, batch: int):
    nets = train.build(preset)
    forward = dict(nets)
    if compiled:
        forward["transformer"] = torch.compile(nets["transformer"])
    objective = train.FlowObjective(models.patch_of(nets["transformer"])) if preset == "mmdit" else train.DiTObjective()
    optimizer = torch.optim.AdamW([p for net in nets.values() for p in net.parameters()], lr=1e-4)
    images, labels = dataset(batch, seed=0)

    def step(seed: int) -> float:
        start = time.perf_counter()
        with train.precision_context(precision, torch.device("cpu")):
            loss = objective.loss(forward, images, labels, torch.Generator().manual_seed(seed))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = {config: make_step(*config, args.batch) for config in CONFIGS}
    times: dict = {config: [] for config in CONFIGS}
    for round_ in range(args.warmup + args.rounds):
        for config, step in steps.items():
            seconds = step(round_)
            if round_ >= args.warmup:
                times[config].append(seconds)
    rows = []
    for (preset, precision, compiled), values in times.items():
        q1, _, q3 = statistics.quantiles(values, n=4)
        rows.append({"preset": preset, "precision": precision, "compile": compiled,
                     "median_s": statistics.median(values), "iqr_s": q3 - q1})
    meta = {"machine": f"{platform.machine()}, {args.threads} thread(s), CPU", "torch": torch.__version__,
            "batch": args.batch, "rounds": args.rounds}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train-step-cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    fp32 = {r["preset"]: r["median_s"] for r in rows if r["precision"] == "fp32"}
    lines = ["# Zoo training step on the CPU", "",
             f"`python benchmarks/train_step_cpu.py --threads {args.threads}`; {meta['machine']}, torch {meta['torch']}. "
             f"One optimizer step at batch {args.batch}, configurations interleaved over {args.rounds} rounds after "
             f"{args.warmup} warm-up rounds; median (IQR) seconds, speedup against the same preset in fp32.", "",
             "| preset | precision | torch.compile | s / step | speedup × |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['precision']} | {'yes' if r['compile'] else 'no'} | "
                     f"{r['median_s']:.3f} ({r['iqr_s']:.3f}) | {fp32[r['preset']] / r['median_s']:.2f} |")
    (args.out / "train-step-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
