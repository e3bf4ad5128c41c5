"""Per-step costs on full-size transformers: dense against each recipe's computed and skipped steps, on a GPU.

Two random-init transformers in bf16, each driven by a flow-matching Euler loop declared with
``handle.generation(num_steps=N)`` (no pipeline, no text encoder):

* ``flux``: a FLUX.1-dev-shaped ``FluxTransformer2DModel`` (19 dual + 38 single blocks, 24 heads x 128, guidance
  embedding) at a 1024 x 1024 image: 64 x 64 = 4096 packed image tokens + 512 text tokens;
* ``wan``: a Wan-2.1-14B-shaped ``WanTransformer3DModel`` (40 blocks, 40 heads x 128, FFN 13824) at a short
  480 x 832 video of 17 frames: a 5 x 60 x 104 latent, 5 x 30 x 52 = 7800 tokens, 512 text tokens.

Every transformer call is timed alone (CUDA events, synchronized) and classified by the FLOPs the stats account to
it: a *full* call computes everything (fraction 1), the *cheapest* calls are the recipe's skipped or forecast
steps. Per recipe: the median full and cheapest call against the median dense call, the generation's accounted
FLOPs fraction (ideal speedup = 1 / fraction) against its achieved speedup (the dense per-call median times the
calls, over the recipe's total), the memory the caches hold at the end of the generation (allocator, over the
memory before it) and the peak, and cosines against the dense loop: the first call's output (the attention
recipes approximate it; the caching recipes compute it exactly) and the final latent.

Adaptive recipes (``fbcache``, ``magcache``) are forced to skip (threshold 10): random weights give no meaningful
skip decisions, and what is measured here is what a skip costs. ``magcache`` calibrates in a first, untimed
generation; recipes with Triton kernels also run one untimed generation first (compilation). Attention recipes
act from step 0 (``start=0``).

    python benchmarks/models_gpu.py -o benchmarks/results --models flux,wan
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

# (label, recipe, overrides, needs an untimed first generation, CFG as two calls per step)
CASES: list[tuple[str, str, dict, bool, bool]] = [
    ("fora", "fora", {}, False, False),
    ("fora-max", "fora-max", {}, False, False),
    ("toca", "toca", {}, False, False),
    ("delta-dit", "delta-dit", {}, False, False),
    ("taylorseer", "taylorseer", {}, False, False),
    ("taylorseer-max", "taylorseer-max", {}, False, False),
    ("fbcache (forced skips)", "fbcache", {"threshold": 10.0, "warmup_steps": 1}, False, False),
    ("fbcache-taylorseer (forced skips)", "fbcache-taylorseer", {"threshold": 10.0, "warmup_steps": 1}, False, False),
    ("magcache (forced skips)", "magcache", {"threshold": 10.0, "retention": 0.1}, True, False),
    ("cfg-share (CFG as two calls)", "cfg-share", {"start": 0.0}, False, True),
    ("fora-todo", "fora-todo", {}, True, False),
    ("taylorseer-hilbert", "taylorseer-hilbert", {}, True, False),
    ("int8", "int8", {}, True, False),
    ("hilbert (start 0)", "hilbert", {"start": 0.0}, True, False),
    ("hilbert-fast", "hilbert-fast", {}, True, False),
    ("proxy (start 0)", "proxy", {"start": 0.0}, True, False),
    ("proxy-fast (start 0)", "proxy-fast", {"start": 0.0}, True, False),
    ("todo", "todo", {}, True, False),
    ("todo-max (start 0)", "todo-max", {"start": 0.0}, True, False),
    ("window-residual", "window-residual", {}, True, False),
]
FULL = 0.999  # a call whose accounted FLOPs fraction is at least this computed everything


@dataclass
class LoopModel:
    """A transformer and how an Euler loop calls it: ``velocity(x, sigma, cond)``."""

    name: str
    description: str
    transformer: torch.nn.Module
    x0: torch.Tensor
    velocity: Callable[[torch.Tensor, float, bool], torch.Tensor]
    tokens: int
    extra: dict = field(default_factory=dict)


def _build(factory: Callable[[], torch.nn.Module], device: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = factory()
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def flux(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, side: int = 64, text: int = 512,
         **config: Any) -> LoopModel:
    """FLUX.1-dev's shape by default (``config`` overrides it: the CPU smoke test builds a tiny one)."""
    from diffusers import FluxTransformer2DModel

    config = {"guidance_embeds": True, **config}
    model = _build(lambda: FluxTransformer2DModel(**config), device, dtype)
    c = model.config
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.zeros(side, side, 3, device=device)
    ids[..., 1] += torch.arange(side, device=device)[:, None]
    ids[..., 2] += torch.arange(side, device=device)[None, :]
    fixed = {
        "pooled_projections": torch.randn(1, c.pooled_projection_dim, generator=g, device=device).to(dtype),
        "guidance": torch.full((1,), 3.5, device=device, dtype=dtype),
        "img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(text, 3, device=device), "return_dict": False,
    }
    prompts = {True: torch.randn(1, text, c.joint_attention_dim, generator=g, device=device).to(dtype),
               False: torch.zeros(1, text, c.joint_attention_dim, device=device, dtype=dtype)}

    def velocity(x: torch.Tensor, sigma: float, cond: bool) -> torch.Tensor:
        t = torch.full((1,), sigma, device=device, dtype=dtype)
        return model(hidden_states=x, encoder_hidden_states=prompts[cond], timestep=t, **fixed)[0]

    x0 = torch.randn(1, side * side, c.in_channels, generator=g, device=device).to(dtype)
    return LoopModel("flux", f"FluxTransformer2DModel, {sum(p.numel() for p in model.parameters()) / 1e9:.1f} B "
                     f"parameters, {side * side} image + {text} text tokens", model, x0, velocity, side * side + text)


WAN_14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def wan(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, latent: tuple[int, int, int] = (5, 60, 104),
        text: int = 512, **config: Any) -> LoopModel:
    """Wan 2.1 14B's shape by default at a 17-frame 480 x 832 video (``config`` overrides the architecture)."""
    from diffusers import WanTransformer3DModel

    model = _build(lambda: WanTransformer3DModel(**{**WAN_14B, **config}), device, dtype)
    c = model.config
    g = torch.Generator(device=device).manual_seed(0)
    prompts = {True: torch.randn(1, text, c.text_dim, generator=g, device=device).to(dtype),
               False: torch.randn(1, text, c.text_dim, generator=g, device=device).to(dtype)}

    def velocity(x: torch.Tensor, sigma: float, cond: bool) -> torch.Tensor:
        t = torch.full((1,), sigma * 1000, device=device)
        return model(hidden_states=x, timestep=t, encoder_hidden_states=prompts[cond], return_dict=False)[0]

    x0 = torch.randn(1, c.in_channels, *latent, generator=g, device=device).to(dtype)
    p = c.patch_size
    tokens = (latent[0] // p[0]) * (latent[1] // p[1]) * (latent[2] // p[2])
    return LoopModel("wan", f"WanTransformer3DModel, {sum(q.numel() for q in model.parameters()) / 1e9:.1f} B "
                     f"parameters, latent {latent[0]}x{latent[1]}x{latent[2]} = {tokens} video tokens, {text} text "
                     "tokens (cross attention)", model, x0, velocity, tokens)


MODELS = {"flux": flux, "wan": wan}
# The CPU smoke test's shapes: every code path of the script in seconds.
TINY = {
    "flux": dict(side=8, text=8, patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                 attention_head_dim=64, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                 axes_dims_rope=(16, 24, 24)),
    "wan": dict(latent=(2, 8, 8), text=8, num_attention_heads=2, attention_head_dim=12, text_dim=32, ffn_dim=32,
                num_layers=2, rope_max_seq_len=32),
}


def _timer(device: str) -> Callable[[Callable[[], Any]], tuple[Any, float]]:
    def timed(fn):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return out, start.elapsed_time(end)
        begin = time.perf_counter()
        out = fn()
        return out, (time.perf_counter() - begin) * 1e3

    return timed


def _flops(handle) -> tuple[Any, float, float]:
    """(generation object, FLOPs spent, dense FLOPs) of the running generation of ``handle``'s transformer."""
    if handle is None:
        return None, 0.0, 0.0
    current = handle.transformers[0].stats.current
    return (current, current.flops, current.dense_flops) if current is not None else (None, 0.0, 0.0)


def euler(m: LoopModel, steps: int, handle=None, separate_cfg: bool = False, device: str = "cuda") -> dict:
    """One generation; per call: milliseconds and accounted FLOPs fraction (1 without ``handle``)."""
    timed = _timer(device)
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    calls, first, x = [], None, m.x0.clone()
    with torch.inference_mode():
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            outs = []
            for cond in ((True, False) if separate_cfg else (True,)):
                before = _flops(handle)
                out, ms = timed(lambda: m.velocity(x, sigma, cond))
                after = _flops(handle)
                same = before[0] is not None and before[0] is after[0]
                spent, dense = (after[1] - before[1], after[2] - before[2]) if same else after[1:]
                calls.append({"ms": ms, "fraction": spent / dense if dense else 1.0})
                first = out.float().clone() if first is None else first
                outs.append(out)
            v = outs[0] if len(outs) == 1 else outs[1] + 3.0 * (outs[0] - outs[1])
            x = x + (sigma_next - sigma) * v
    return {"calls": calls, "first": first, "final": x.float()}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), 0).item()


def _mb(nbytes: float) -> float:
    return round(nbytes / 2**20, 1)


def measure_case(m: LoopModel, case: tuple, steps: int, dense: dict, device: str) -> dict:
    from dit_accel import accelerate_dit

    label, recipe, overrides, warm, separate_cfg = case
    cfg = "separate-cond-first" if separate_cfg else "none"
    handle = accelerate_dit(m.transformer, recipe, **overrides)
    try:
        if warm:
            with handle.generation(num_steps=steps, cfg=cfg):
                euler(m, steps, handle, separate_cfg, device)
        before = torch.cuda.memory_allocated() if device == "cuda" else 0
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with handle.generation(num_steps=steps, cfg=cfg):
            run = euler(m, steps, handle, separate_cfg, device)
            held = (torch.cuda.memory_allocated() - before) if device == "cuda" else 0
            stats_bytes = handle.transformers[0].stats.current.cache_bytes
            fraction = handle.transformers[0].stats.current.flops_fraction
        peak = (torch.cuda.max_memory_allocated() - before) if device == "cuda" else 0
    finally:
        handle.remove()
    calls = run["calls"]
    dense_ms = statistics.median(c["ms"] for c in dense["calls"])
    full = [c["ms"] for c in calls if c["fraction"] >= FULL]
    least = min(c["fraction"] for c in calls)
    cheapest = [c["ms"] for c in calls if c["fraction"] <= least + 1e-6] if least < FULL else []
    total = sum(c["ms"] for c in calls)
    achieved = dense_ms * len(calls) / total
    return {
        "label": label, "recipe": recipe, "overrides": overrides, "calls": len(calls),
        "full_calls": len(full), "full_ms": statistics.median(full) if full else None,
        "cheapest_ms": statistics.median(cheapest) if cheapest else None,
        "cheapest_fraction": least if cheapest else None,
        "cheapest_over_dense": statistics.median(cheapest) / dense_ms if cheapest else None,
        "flops_fraction": fraction, "ideal_speedup": 1 / fraction if fraction > 0 else math.inf,
        "achieved_speedup": achieved, "achieved_over_ideal": achieved * fraction,
        "cache_mb": _mb(held), "stats_cache_mb": _mb(stats_bytes), "peak_extra_mb": _mb(peak),
        "cos_first_call": cosine(run["first"], dense["first"]), "cos_final": cosine(run["final"], dense["final"]),
        "call_ms": [round(c["ms"], 2) for c in calls], "call_fraction": [round(c["fraction"], 3) for c in calls],
    }


def measure_model(m: LoopModel, steps: int, cases: list[tuple], device: str = "cuda",
                  deadline: float = math.inf, log=print) -> dict:
    """Dense (one untimed generation first) then every case; cases past ``deadline`` (time.time()) are skipped."""
    euler(m, steps, device=device)  # warm-up: cuBLAS handles, allocator
    before = torch.cuda.memory_allocated() if device == "cuda" else 0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dense = euler(m, steps, device=device)
    peak = (torch.cuda.max_memory_allocated() - before) if device == "cuda" else 0
    dense_ms = statistics.median(c["ms"] for c in dense["calls"])
    result = {"model": m.name, "description": m.description, "tokens": m.tokens, "steps": steps,
              "dense_ms": dense_ms, "dense_peak_extra_mb": _mb(peak),
              "weights_mb": _mb(sum(p.numel() * p.element_size() for p in m.transformer.parameters())),
              "dense_call_ms": [round(c["ms"], 2) for c in dense["calls"]], "rows": []}
    log(f"[{m.name}] dense {dense_ms:.2f} ms per call ({m.description})")
    dense_cfg = None
    for case in cases:
        if time.time() > deadline:
            result["rows"].append({"label": case[0], "recipe": case[1], "skipped": "time budget"})
            continue
        reference = dense
        if case[4]:  # two calls per step: its own dense loop, so that the latents compare
            dense_cfg = dense_cfg or euler(m, steps, separate_cfg=True, device=device)
            reference = {**dense_cfg, "calls": dense["calls"]}
        try:
            row = measure_case(m, case, steps, reference, device)
        except Exception as error:  # one failing recipe must not hide the others
            row = {"label": case[0], "recipe": case[1], "error": f"{type(error).__name__}: {error}"[:300]}
        result["rows"].append(row)
        log(f"[{m.name}] {_line(row, dense_ms)}")
        if device == "cuda":
            torch.cuda.empty_cache()
    return result


def _fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:{spec}}{suffix}"


def _line(row: dict, dense_ms: float) -> str:
    if "error" in row or "skipped" in row:
        return f"{row['label']}: {row.get('error') or 'not run: ' + row['skipped']}"
    return (f"{row['label']}: full {_fmt(row['full_ms'])} ms, cheapest {_fmt(row['cheapest_ms'])} ms "
            f"({_fmt(row['cheapest_over_dense'], '.1%')} of dense {dense_ms:.2f}), achieved "
            f"{row['achieved_speedup']:.2f}x of ideal {row['ideal_speedup']:.2f}x, cache {row['cache_mb']} MB, "
            f"cos first {row['cos_first_call']:.4f} final {row['cos_final']:.4f}")


def markdown(results: list[dict], device_name: str, command: str, versions: str | None = None) -> str:
    """``versions``: the software line of the machine that measured (default: this one's torch and CUDA)."""
    versions = versions or f"torch {torch.__version__}, CUDA {torch.version.cuda}"
    lines = ["# Per-step costs on full-size transformers (GPU)", "",
             f"`{command}` on **{device_name}**, {versions}. Random-init "
             "bf16 transformers driven by an Euler loop declared with `handle.generation`; every call timed alone "
             "(CUDA events). *cheapest* = the recipe's skipped/forecast call (the lowest accounted FLOPs), "
             "*achieved / ideal* = achieved speedup of the generation over 1 / its accounted FLOPs fraction. "
             "Adaptive recipes forced to skip (threshold 10); attention recipes act from step 0. Cache MB: what the "
             "allocator holds at the end of the generation beyond what it held before it."]
    for r in results:
        if "error" in r:
            lines += ["", f"## {r['model']}", "", f"Not measured: {r['error']}"]
            continue
        lines += ["", f"## {r['model']}: {r['description']}", "",
                  f"{r['steps']} steps; dense call **{r['dense_ms']:.1f} ms** (median), weights "
                  f"{r['weights_mb'] / 1024:.1f} GiB, dense activations peak {r['dense_peak_extra_mb']:.0f} MB.", "",
                  "| recipe | full call ms | cheapest call ms | cheapest / dense | its FLOPs (accounting) | "
                  "generation FLOPs | achieved × | ideal × | achieved / ideal | cache MB | peak extra MB | "
                  "cos first call | cos final |", "|" + "---|" * 13]
        for row in r["rows"]:
            if "error" in row or "skipped" in row:
                lines.append(f"| {row['label']} | {row.get('error') or 'not run: ' + row['skipped']} |"
                             + " |" * 11)
                continue
            lines.append(
                f"| {row['label']} | {_fmt(row['full_ms'], '.1f')} | {_fmt(row['cheapest_ms'], '.1f')} | "
                f"{_fmt(row['cheapest_over_dense'], '.1%')} | {_fmt(row['cheapest_fraction'], '.1%')} | "
                f"{row['flops_fraction']:.1%} | {row['achieved_speedup']:.2f} | {row['ideal_speedup']:.2f} | "
                f"{row['achieved_over_ideal']:.2f} | {row['cache_mb']:.0f} | {row['peak_extra_mb']:.0f} | "
                f"{row['cos_first_call']:.4f} | {row['cos_final']:.4f} |")
    return "\n".join(lines) + "\n"


def run(models: list[str], steps: int, out: Path, device: str = "cuda", budget_s: float = math.inf,
        builders: dict | None = None, log=print, cases: list[str] | None = None) -> list[dict]:
    """Measure ``models`` (names in :data:`MODELS`, or ``builders``: name -> () -> LoopModel) and write
    ``models-gpu.json`` / ``.md`` into ``out`` after each model (what finished survives a later failure).
    ``cases``: labels or recipe names of :data:`CASES` to run (default: all)."""
    selected = [c for c in CASES if cases is None or c[0] in cases or c[1] in cases]
    if cases is not None and not selected:
        raise ValueError(f"no case matches {cases}; cases: {', '.join(c[0] for c in CASES)}")
    deadline = time.time() + budget_s
    if builders is None:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        shapes = {} if device == "cuda" else TINY
        builders = {name: (lambda name=name: MODELS[name](device, dtype, **shapes.get(name, {}))) for name in models}
    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke test)"
    command = f"python benchmarks/models_gpu.py --models {','.join(models)} --steps {steps}"
    results = []
    out.mkdir(parents=True, exist_ok=True)
    for name in models:
        m = None
        try:
            start = time.time()
            m = builders[name]()
            log(f"[{name}] built in {time.time() - start:.1f} s")
            results.append(measure_model(m, steps, selected, device, deadline, log))
        except Exception as error:
            results.append({"model": name, "error": f"{type(error).__name__}: {error}"[:300]})
            log(f"[{name}] failed: {results[-1]['error']}")
        finally:
            del m
            if device == "cuda":
                torch.cuda.empty_cache()
        (out / "models-gpu.json").write_text(json.dumps({"device": device_name, "command": command,
                                                         "python": platform.python_version(),
                                                         "versions": f"torch {torch.__version__}, CUDA "
                                                                     f"{torch.version.cuda}",
                                                         "results": results}, indent=1))
        (out / "models-gpu.md").write_text(markdown(results, device_name, command))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--models", default="flux,wan")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--budget", type=float, default=math.inf, help="seconds; later recipes are skipped")
    parser.add_argument("--device", default="cuda", help="cuda; cpu runs tiny shapes (a smoke test of the script)")
    parser.add_argument("--cases", default=None, help="comma-separated labels or recipes (default: every case)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/models_gpu.py times full-size transformers on a CUDA GPU; this machine has none "
                 "(--device cpu runs it on tiny shapes as a smoke test).")
    run(args.models.split(","), args.steps, args.out, device=args.device, budget_s=args.budget,
        cases=args.cases.split(",") if args.cases else None)


if __name__ == "__main__":
    main()
