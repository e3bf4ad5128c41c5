"""Where the time goes on a GPU, for the goals ``kernels-gpu.md`` and ``models-gpu.md`` miss.

(a) ``int8_attention`` in stages (bf16, B = 1, H · D = 3072, DiT-like inputs as ``kernels_gpu.py``): Q and K
    quantization, the K mean, the attention kernel alone, the kernel without its P·V product (and V loads), and
    the kernel under other launch settings (key block 64/128, 4/8 warps, 3/4 pipeline stages), against SDPA flash.
(b) One transformer call under ``torch.profiler`` on the FLUX.1-dev-sized model (``models_gpu.flux``) and the
    Wan-14B-sized one: dense, each attention recipe (from step 0), and the cheapest call of the caching recipes (a
    ``fora`` reuse, a ``taylorseer`` forecast, a forced ``fbcache`` skip): GPU time (CUDA events), host time to
    enqueue the call (a host-bound call enqueues about as slowly as the GPU runs it), kernel launches, and the
    kernels that take the most GPU time.

    python benchmarks/profile_gpu.py -o benchmarks/results
    TRITON_INTERPRET=1 python benchmarks/profile_gpu.py --device cpu -o /tmp/p    # smoke test, tiny shapes
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent


def _sibling(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def int8_stages(seqs: list[int], dims: list[int], bench: Callable, device: str, width: int = 3072) -> list[dict]:
    """(a): milliseconds of each stage and launch setting; ``bench(fn)`` returns milliseconds."""
    from dit_accel.kernels import _triton_int8
    from dit_accel.kernels.int8_attention import int8_attention, key_mean, softmax_multiplier

    kernels_gpu = _sibling("kernels_gpu")
    rows = []
    for dim in dims:
        heads = width // dim
        for length in seqs:
            q, k, v = kernels_gpu.dit_like(heads, length, dim, device)
            row: dict[str, Any] = {"D": dim, "S": length, "sdpa_ms": bench(lambda: F.scaled_dot_product_attention(q, k, v))}
            row["int8_ms"] = bench(lambda: int8_attention(q, k, v))
            multiplier = softmax_multiplier(None, dim)
            row["quantize_q_ms"] = bench(lambda: _triton_int8.quantize(q, 128, multiplier, None))
            row["key_mean_ms"] = bench(lambda: key_mean(k))
            mean = key_mean(k)
            row["quantize_k_ms"] = bench(lambda: _triton_int8.quantize(k, 64, 1.0, mean))
            out = torch.empty_like(q)
            for block_k in (64, 128):
                q8, qs = _triton_int8.quantize(q, 128, multiplier, None)
                k8, ks = _triton_int8.quantize(k, block_k, 1.0, mean)
                for warps in (4, 8):
                    for stages in (3, 4):
                        def kernel(skip_pv: bool = False) -> None:
                            _triton_int8.attention(q8, qs, k8, ks, v, out, k_len=length, block_q=128,
                                                   block_k=block_k, pv_bf16=False, num_warps=warps,
                                                   num_stages=stages, skip_pv=skip_pv)
                        name = f"kernel_k{block_k}_w{warps}_s{stages}"
                        try:
                            row[f"{name}_ms"] = bench(kernel)
                        except Exception as error:  # a setting may not fit the shared memory
                            row[f"{name}_ms"] = math.nan
                            row[f"{name}_error"] = f"{type(error).__name__}: {error}"[:160]
                        if block_k == 64 and stages == 3 and warps == (4 if dim <= 64 else 8):
                            row["kernel_default_ms"] = row[f"{name}_ms"]
                            row["kernel_without_pv_ms"] = bench(lambda: kernel(True))
            settings = {key: value for key, value in row.items() if key.startswith("kernel_k") and key.endswith("_ms")}
            best = min(settings, key=lambda key: settings[key] if math.isfinite(settings[key]) else math.inf)
            row["best_setting"], row["best_kernel_ms"] = best[len("kernel_"):-len("_ms")], settings[best]
            rows.append(row)
            print(f"D={dim} S={length}: sdpa {row['sdpa_ms']:.3f}, int8 {row['int8_ms']:.3f} = quant q "
                  f"{row['quantize_q_ms']:.3f} + mean {row['key_mean_ms']:.3f} + quant k {row['quantize_k_ms']:.3f} + "
                  f"kernel {row['kernel_default_ms']:.3f} (without P.V {row['kernel_without_pv_ms']:.3f}); best "
                  f"{row['best_setting']} {row['best_kernel_ms']:.3f} ms", flush=True)
    return rows


def _kernel_table(profile, rows: int) -> list[dict]:
    events = profile.key_averages()
    attr = "device_time_total" if hasattr(events[0], "device_time_total") else "cuda_time_total"
    kernels = [e for e in events if getattr(e, attr, 0) > 0 and getattr(e, "device_type", None) is not None
               and "CUDA" in str(e.device_type)]
    kernels = kernels or [e for e in events if getattr(e, attr, 0) > 0]
    kernels.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [{"name": e.key[:90], "ms": getattr(e, attr) / 1e3, "count": e.count} for e in kernels[:rows]]


def profile_call(call: Callable[[], Any], device: str) -> dict:
    """GPU ms (CUDA events) and host ms to enqueue one ``call()`` (a host-bound call enqueues as slowly as it runs)."""
    if device != "cuda":
        start = time.perf_counter()
        call()
        ms = (time.perf_counter() - start) * 1e3
        return {"gpu_ms": ms, "enqueue_ms": ms}
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin = time.perf_counter()
    start.record()
    call()
    enqueue = (time.perf_counter() - begin) * 1e3
    end.record()
    end.synchronize()
    return {"gpu_ms": start.elapsed_time(end), "enqueue_ms": enqueue}


def kernel_table(call: Callable[[], Any], device: str, rows: int = 8) -> dict:
    """Kernel launches and the ``rows`` kernels with the most GPU time of one ``call()`` under ``torch.profiler``
    (CUDA only; timing is left to :func:`profile_call`, since the profiler slows the host)."""
    if device != "cuda":
        call()
        return {}
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
        return {"launches": int(sum(e.count for e in prof.key_averages())), "top": _kernel_table(prof, rows)}
    except Exception as error:  # the timing stands without the kernel table
        return {"profile_error": f"{type(error).__name__}: {error}"[:200]}


def model_calls(m, device: str, deadline: float = math.inf) -> dict[str, dict]:
    """(b) on one ``models_gpu.LoopModel``: the call each case makes cheapest, profiled after a warm-up."""
    from dit_accel import accelerate_dit

    sigma_of = lambda i, n: 1.0 - i / n  # noqa: E731
    results = {}

    def run(label: str, recipe: str | None, overrides: dict, steps: int, profiled_index: int) -> None:
        if time.time() > deadline:
            results[label] = {"error": "not run: time budget"}
            return
        handle = accelerate_dit(m.transformer, recipe, **overrides) if recipe else None
        try:
            with torch.inference_mode():
                # Pass 0 warms up (Triton compiled, magcache calibrated), pass 1 times the call, pass 2 lists its
                # kernels: each pass is a new generation, so the call at ``profiled_index`` does the same work.
                for pass_ in range(3):
                    context = handle.generation(num_steps=steps) if handle else contextlib.nullcontext()
                    with context:
                        for i in range(steps):
                            call = lambda i=i: m.velocity(m.x0, sigma_of(i, steps), True)  # noqa: E731
                            if pass_ == 1 and i == profiled_index:
                                results[label] = profile_call(call, device)
                            elif pass_ == 2 and i == profiled_index:
                                results[label].update(kernel_table(call, device))
                            else:
                                call()
        except Exception as error:
            results[label] = {"error": f"{type(error).__name__}: {error}"[:300]}
        finally:
            if handle is not None:
                handle.remove()
        print(f"[{m.name}] {label}: {_summary(results[label])}", flush=True)

    run("dense", None, {}, 1, 0)
    run("fora: a reused call", "fora", {"interval": 50, "first_steps": 0, "last_steps": 0}, 3, 1)
    run("taylorseer: a full call", "taylorseer", {"interval": 50, "first_steps": 2, "last_steps": 0}, 5, 2)
    run("taylorseer: a forecast call", "taylorseer", {"interval": 50, "first_steps": 2, "last_steps": 0}, 5, 3)
    run("fbcache: a skipped call", "fbcache", {"threshold": 10.0, "warmup_steps": 1}, 3, 1)
    run("magcache: a skipped call", "magcache", {"threshold": 10.0, "retention": 0.1}, 10, 2)
    for recipe, overrides in (("int8", {}), ("hilbert-fast", {}), ("proxy-fast", {"start": 0.0}), ("todo", {}),
                              ("window-residual", {"first_steps": 1}), ("toca", {})):
        run(recipe, recipe, overrides, 3, 1)
    return results


def _summary(r: dict) -> str:
    if "error" in r:
        return r["error"]
    top = ", ".join(f"{k['name'][:40]} {k['ms']:.1f} ms x{k['count']}" for k in r.get("top", [])[:3])
    return f"gpu {r['gpu_ms']:.2f} ms, enqueue {r['enqueue_ms']:.2f} ms, {r.get('launches', 0)} launches; {top}"


def markdown(stages: list[dict], models: dict[str, dict], device_name: str, versions: str | None = None) -> str:
    """``versions``: the software line of the machine that measured (default: this one's torch)."""
    versions = versions or f"torch {torch.__version__}"
    lines = ["# Where the time goes (GPU)", "",
             f"`python benchmarks/profile_gpu.py` on **{device_name}**, {versions}. (a) int8 attention "
             "in stages, `triton.testing.do_bench` medians; (b) one transformer call: GPU time by CUDA events, host "
             "time to enqueue it, kernel launches and the top kernels by `torch.profiler`."]
    if stages:
        lines += ["", "## (a) int8 attention in stages (ms)", "",
                  "| D | S | SDPA (default backend) | int8 total | quantize Q | K mean | quantize K | kernel | kernel without P·V | "
                  "best launch setting | its kernel ms | best total vs SDPA |", "|" + "---|" * 12]
        for r in stages:
            total = r["quantize_q_ms"] + r["key_mean_ms"] + r["quantize_k_ms"] + r["best_kernel_ms"]
            lines.append(f"| {r['D']} | {r['S']} | {r['sdpa_ms']:.3f} | {r['int8_ms']:.3f} | {r['quantize_q_ms']:.3f} | "
                         f"{r['key_mean_ms']:.3f} | {r['quantize_k_ms']:.3f} | {r['kernel_default_ms']:.3f} | "
                         f"{r['kernel_without_pv_ms']:.3f} | {r['best_setting']} | {r['best_kernel_ms']:.3f} | "
                         f"{r['sdpa_ms'] / total:.2f}x |")
    for model, calls in models.items():
        lines += ["", f"## (b) {model}: one call", "",
                  "| call | GPU ms | host enqueue ms | launches | top kernels (GPU ms, count) |", "|---|---|---|---|---|"]
        for label, r in calls.items():
            if "error" in r:
                lines.append(f"| {label} | error: {r['error']} | | | |")
                continue
            top = "; ".join(f"`{k['name'][:60]}` {k['ms']:.1f} (x{k['count']})" for k in r.get("top", [])[:5])
            lines.append(f"| {label} | {r['gpu_ms']:.2f} | {r['enqueue_ms']:.2f} | {r.get('launches', '–')} | {top} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", default="cuda", help="cpu: tiny shapes under TRITON_INTERPRET=1 (smoke test)")
    parser.add_argument("--models", default="flux,wan")
    parser.add_argument("--budget", type=float, default=math.inf, help="seconds; later calls are skipped")
    args = parser.parse_args()
    deadline = time.time() + args.budget
    models_gpu = _sibling("models_gpu")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("benchmarks/profile_gpu.py profiles on a CUDA GPU; this machine has none (--device cpu: smoke test)")
        from triton.testing import do_bench

        bench = lambda fn: do_bench(fn, warmup=50, rep=200, return_mode="median")  # noqa: E731
        seqs, dims, width, name = [4608, 16384], [64, 128], 3072, torch.cuda.get_device_name()
        build = {n: (lambda n=n: models_gpu.MODELS[n]("cuda")) for n in args.models.split(",")}
    else:
        bench = lambda fn: profile_call(fn, "cpu")["gpu_ms"]  # noqa: E731
        seqs, dims, width, name = [128], [64], 128, "CPU interpreter (smoke test)"
        build = {n: (lambda n=n: models_gpu.MODELS[n]("cpu", torch.float32, **models_gpu.TINY[n]))
                 for n in args.models.split(",")}
    args.out.mkdir(parents=True, exist_ok=True)
    stages, models = [], {}

    def save() -> None:
        (args.out / "profile-gpu.json").write_text(json.dumps({"device": name, "versions": f"torch {torch.__version__}",
                                                               "int8_stages": stages, "models": models}, indent=1))
        (args.out / "profile-gpu.md").write_text(markdown(stages, models, name))

    try:
        stages = int8_stages(seqs, dims, bench, args.device, width)
    except Exception as error:
        print(f"int8 stages failed: {type(error).__name__}: {error}", flush=True)
    save()
    for model, builder in build.items():
        m = builder()
        models[m.description] = model_calls(m, args.device, deadline)
        del m
        if args.device == "cuda":
            torch.cuda.empty_cache()
        save()
    print(f"wrote {args.out / 'profile-gpu.md'}")


if __name__ == "__main__":
    main()
