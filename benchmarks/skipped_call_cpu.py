"""Where a zoo:dit ``magcache-turbo`` transformer call's time goes: the parts of a skipped call, and computed calls
by their place in the schedule against the dense run's.

Part 1: timers wrapped around the functions a skipped call runs (the step tracker's reading of the call, magcache's
decision, the forecast, its conversion from the clean-sample estimate back to a prediction, the statistics, the
output's packaging) and around the whole call, over generations of 2 images at 50 steps with the shipped
calibration; each timer adds well under a microsecond. Part 2: dense and turbo generations alternate in one
process, every computed call timed; the medians of the computed calls by their index in the schedule, beside the
dense run's calls at the same steps.

    python benchmarks/skipped_call_cpu.py -o benchmarks/results
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

from dit_accel import accelerate_dit, load_recipe, remove_acceleration
from dit_accel.caching import magcache, output_forecast
from dit_accel.caching.forecasters import Forecaster
from dit_accel.core.context import StepTracker
from dit_accel.core.stats import StatsRecorder
from dit_accel.pipelines import zoo
from dit_accel.pipelines.zoo.calibrations import with_shipped_calibration

# (owner, attribute, part of the call it is charged to)
PARTS = [(StepTracker, "enter", "step tracker"), (magcache.MagCachePlugin, "decide", "decision"),
         (Forecaster, "predict", "forecast"), (output_forecast, "from_clean", "conversion to a prediction"),
         (StatsRecorder, "on_call", "statistics"), (StatsRecorder, "record_skipped", "statistics"),
         (StatsRecorder, "end_call", "statistics"), (output_forecast, "with_sample", "output packaging")]


def timed(owner, name: str, part: str, totals: dict, counts: dict) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        began = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[part] += time.perf_counter() - began
            counts[part] += 1

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    pipe = zoo.load("dit")
    recipe = with_shipped_calibration(load_recipe("magcache-turbo"), "dit")[0]
    blocks_ran, calls, began = [0], [], {}
    pipe.transformer.transformer_blocks[0].register_forward_pre_hook(lambda *_: blocks_ran.__setitem__(0, 1))

    def before(*_):
        blocks_ran[0], began["t"] = 0, time.perf_counter()

    def after(*_):
        calls.append((bool(blocks_ran[0]), time.perf_counter() - began["t"]))

    pipe.transformer.register_forward_pre_hook(before, prepend=True)
    pipe.transformer.register_forward_hook(after)

    def generate(seed: int = 100) -> None:
        pipe(class_labels=[1, 2], num_inference_steps=50, generator=torch.Generator().manual_seed(seed),
             output_type="pt")

    # Part 2 first, without the part timers: computed calls by index, dense and turbo alternating.
    by_index = {"dense": collections.defaultdict(list), "turbo": collections.defaultdict(list)}
    for _ in range(args.repeats):
        for name in by_index:
            if name == "turbo":
                accelerate_dit(pipe, recipe)
                generate(10_000)  # warm-up, untimed
            calls.clear()
            generate()
            for index, seconds in enumerate(s for ran, s in calls if ran):
                by_index[name][index].append(seconds * 1e3)
            if name == "turbo":
                remove_acceleration(pipe)
    handle = accelerate_dit(pipe, recipe)
    generate()
    schedule = [d[0] for d in handle.transformers[0].plugins[0].last_decisions if not d[3]]
    dense_ms = {i: statistics.median(v) for i, v in by_index["dense"].items()}
    computed = [{"step": step, "turbo_ms": statistics.median(by_index["turbo"][i]), "dense_ms": dense_ms[step]}
                for i, step in enumerate(schedule)]

    # Part 1: the parts of a skipped call.
    totals, counts = collections.defaultdict(float), collections.Counter()
    for owner, name, part in PARTS:
        timed(owner, name, part, totals, counts)
    calls.clear()
    for _ in range(args.repeats):
        generate()
    skipped = [s for ran, s in calls if not ran]
    computed_count = sum(ran for ran, _ in calls)
    remove_acceleration(pipe)
    results = {"meta": {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU",
                        "torch": torch.__version__, "repeats": args.repeats},
               "skipped_call_us": statistics.mean(skipped) * 1e6, "skipped_calls": len(skipped),
               "computed_calls": computed_count, "computed": computed,
               "parts": {part: {"us_each": seconds / counts[part] * 1e6,
                                "per_generation": counts[part] / args.repeats} for part, seconds in totals.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "skipped-call-cpu.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, args.out / "skipped-call-cpu.md")
    print(json.dumps(results, indent=1))


def write_markdown(results: dict, path: Path) -> None:
    meta = results["meta"]
    lines = ["# Where a zoo:dit magcache-turbo call's time goes (CPU)", "",
             f"`python benchmarks/skipped_call_cpu.py -o benchmarks/results`; {meta['machine']}, torch {meta['torch']}; "
             f"{meta['repeats']} generations of 2 images at 50 steps per part, the shipped calibration.", "",
             f"A skipped call: {results['skipped_call_us']:.0f} µs on average ({results['skipped_calls']} skipped, "
             f"{results['computed_calls']} computed calls timed). Its parts, timed in every call that runs them (the "
             "forecast and the conversion run in skipped calls only; the decision once more in a computed call, at "
             "its first block):", "",
             "| part | µs each | runs per generation |", "|---|---|---|"]
    lines += [f"| {part} | {p['us_each']:.1f} | {p['per_generation']:.0f} |" for part, p in results["parts"].items()]
    lines += ["", "Computed calls by their place in turbo's schedule (medians over the generations, dense and turbo "
              "alternating in one process), beside the dense run's call at the same step:", "",
              "| step | turbo ms | dense ms | turbo - dense |", "|---|---|---|---|"]
    lines += [f"| {c['step']} | {c['turbo_ms']:.2f} | {c['dense_ms']:.2f} | {c['turbo_ms'] - c['dense_ms']:+.2f} |"
              for c in results["computed"]]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
