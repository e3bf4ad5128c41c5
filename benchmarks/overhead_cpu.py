"""What the dit_accel machinery costs when it changes nothing, per pipeline family, on CPU.

Three variants run side by side, interleaved round-robin on the same pipeline object and seeds:

* ``bare``: the pipeline as diffusers ships it;
* ``none``: ``accelerate_dit(pipe, "none")`` -- the tracker, stats and attention hooks, no plugin;
* ``intercept``: an identity attention plugin routed on every attention layer, i.e. the cost of the scoped SDPA
  interception itself (what every attention plugin pays before it saves anything).

Reported: median and IQR of the transformer-only time per generation (sum of transformer forward wall times,
measured outside our hooks) and the ratio to ``bare``. Tiny random-init pipelines are the worst case for
relative overhead: their transformer calls take well under a millisecond, so per-call Python work weighs most.

    python benchmarks/overhead_cpu.py --repeats 30 -o benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dit_accel import Recipe, accelerate_dit, remove_acceleration
from dit_accel.core.plugin import Plugin, register_plugin
from dit_accel.pipelines import tiny
from dit_accel.recipe import PluginConfig, register_config


@register_config("bench-identity-attention")
@dataclass(frozen=True)
class IdentityAttentionConfig(PluginConfig):
    kind = "attention"


@register_plugin(IdentityAttentionConfig)
class IdentityAttention(Plugin):
    kind = "attention"

    def install(self) -> None:
        self.target.route_attention(self, lambda q, k, v, call: call.dense(q, k, v))

    def remove(self) -> None:
        self.target.attention.unroute(self)


class TransformerTimer:
    """Sums the wall time of the transformer's forward, measured by outer torch hooks (outside ours)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.total = 0.0
        self._start = 0.0
        transformer.register_forward_pre_hook(self._pre)
        transformer.register_forward_hook(self._post)

    def _pre(self, *args) -> None:
        self._start = time.perf_counter()

    def _post(self, *args) -> None:
        self.total += time.perf_counter() - self._start


VARIANTS = {
    "bare": None,
    "none": Recipe(),
    "intercept": Recipe((IdentityAttentionConfig(),), name="intercept"),
}


def measure(name: str, repeats: int, steps: int) -> dict:
    pipe = tiny.build(name)
    timer = TransformerTimer(pipe.transformer)
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    kwargs = tiny.default_call_kwargs(name, steps=steps)
    with torch.no_grad():
        for round_index in range(repeats + 2):
            for variant, recipe in VARIANTS.items():
                remove_acceleration(pipe)
                if recipe is not None:
                    accelerate_dit(pipe, recipe)
                kwargs["generator"] = torch.Generator().manual_seed(0)
                timer.total = 0.0
                pipe(**kwargs)
                if round_index >= 2:  # warm-up rounds
                    times[variant].append(timer.total)
    remove_acceleration(pipe)
    result = {}
    for variant, values in times.items():
        q1, median, q3 = statistics.quantiles(values, n=4)
        result[variant] = {"median_ms": median * 1e3, "iqr_ms": (q3 - q1) * 1e3}
    for variant in VARIANTS:
        result[variant]["ratio_to_bare"] = result[variant]["median_ms"] / result["bare"]["median_ms"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = {name: measure(name, args.repeats, args.steps) for name in tiny.list()}
    meta = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), CPU",
        "torch": torch.__version__,
        "steps": args.steps,
        "repeats": args.repeats,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead-cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "# Machinery overhead on CPU (tiny random-init pipelines)",
        "",
        f"`python benchmarks/overhead_cpu.py --repeats {args.repeats} --steps {args.steps} --threads {args.threads}`; "
        f"{meta['machine']}, torch {meta['torch']}. Transformer-only time per generation ({args.steps} steps), "
        "median (IQR) over interleaved repeats; ratio = median / bare median.",
        "",
        "| pipeline | bare ms | `none` ms | ratio | identity interception ms | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        bare, none, intercept = row["bare"], row["none"], row["intercept"]
        lines.append(
            f"| {name} | {bare['median_ms']:.2f} ({bare['iqr_ms']:.2f}) | {none['median_ms']:.2f} ({none['iqr_ms']:.2f}) "
            f"| {none['ratio_to_bare']:.3f} | {intercept['median_ms']:.2f} ({intercept['iqr_ms']:.2f}) "
            f"| {intercept['ratio_to_bare']:.3f} |"
        )
    (args.out / "overhead-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
