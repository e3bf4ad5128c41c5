"""What a computed and a skipped transformer call cost under magcache, against diffusers' MagCache and a bare call.

Five copies of a zoo model's transformer (same weights) are called in turn, call by call, on the inputs of one real
pipeline call (timestep stepped down each round): bare; ours computing every call (``magcache`` at threshold 0);
ours skipping every call after the first (an unreachable budget); diffusers' MagCache in the same two modes.
Interleaving call by call puts every configuration under the same machine state, so medians over a few hundred
calls resolve differences of a tenth of a millisecond that generation-level timings on this machine do not.

    python benchmarks/call_cost_cpu.py -o benchmarks/results
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

from dit_accel import accelerate_dit
from dit_accel.pipelines import zoo

CALLS = 300


def captured_call(pipe) -> dict:
    """The keyword arguments of the transformer's first call in a 2-image, 2-step generation."""
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args, kwargs)) if not seen else None, with_kwargs=True)
    pipe(class_labels=[1, 2], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    handle.remove()
    args, kwargs = seen[0]
    bound = inspect.signature(pipe.transformer.forward).bind_partial(*args, **kwargs)
    return dict(bound.arguments)


def configurations(transformer: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from diffusers import MagCacheConfig, apply_mag_cache
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    ratios = [1.0] + [0.99] * (CALLS - 1)
    common = {"ratios": ratios, "retention": 0.0, "last_steps": 0}
    models = {"bare": copy.deepcopy(transformer)}
    for name, threshold, skips in (("compute", 0.0, 1), ("skip", 100.0, 1000)):
        model = copy.deepcopy(transformer)
        handle = accelerate_dit(model, "magcache", threshold=threshold, max_skips=skips, **common)
        handle.begin(num_steps=CALLS)
        models[f"dit_accel {name}"] = model
        model = copy.deepcopy(transformer)
        apply_mag_cache(model, MagCacheConfig(mag_ratios=ratios, num_inference_steps=CALLS, threshold=threshold,
                                              max_skip_steps=skips, retention_ratio=0.0))
        HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
        _set_cache_context(model, CacheContext("cond"))
        models[f"diffusers {name}"] = model
    return models


def measure(model_name: str) -> dict:
    pipe = zoo.load(model_name)
    kwargs = captured_call(pipe)
    models = configurations(pipe.transformer)
    batch = kwargs["hidden_states"].shape[0]
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for index, value in enumerate(torch.linspace(999.0, 1.0, CALLS)):
            call = dict(kwargs, timestep=value.reshape(1).expand(batch).to(kwargs["timestep"].dtype))
            for name, model in models.items():
                began = time.perf_counter()
                model(**call)
                if index >= 5:  # the first calls compute in every configuration and warm up
                    times[name].append(time.perf_counter() - began)
    medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    return {"batch_rows": batch, "calls": CALLS - 5, "median_ms": medians}


def write_markdown(results: dict, path: Path) -> None:
    meta = results["meta"]
    lines = ["# Cost of a computed and a skipped call: magcache against diffusers' MagCache (CPU)", "",
             f"`python benchmarks/call_cost_cpu.py -o benchmarks/results`; {meta['machine']}, torch {meta['torch']}. "
             "Five copies of each zoo transformer called in turn, call by call, on one real pipeline call's inputs "
             "(2 images with CFG); medians over the calls after 5 warm-up rounds. Overhead: over the bare call.", "",
             "| model | rows | bare ms | ours computed ms | diffusers computed ms | ours skipped ms | diffusers skipped ms "
             "| ours overhead (computed) | diffusers overhead (computed) |", "|---|---|---|---|---|---|---|---|---|"]
    for model, row in results["models"].items():
        m = row["median_ms"]
        bare = m["bare"]
        lines.append(f"| zoo:{model} | {row['batch_rows']} | {bare:.2f} | {m['dit_accel compute']:.2f} | "
                     f"{m['diffusers compute']:.2f} | {m['dit_accel skip']:.2f} | {m['diffusers skip']:.2f} | "
                     f"{m['dit_accel compute'] - bare:+.2f} ms | {m['diffusers compute'] - bare:+.2f} ms |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["dit", "mmdit"])
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    results = {"meta": {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU",
                        "torch": torch.__version__}, "models": {}}
    for model in args.models:
        results["models"][model] = measure(model)
        print(model, results["models"][model], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "call-cost-cpu.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, args.out / "call-cost-cpu.md")


if __name__ == "__main__":
    main()
