"""Triton kernels on a CUDA GPU: 8-bit attention and block-sparse attention against torch SDPA (flash backend).

(a) Kernels, bf16, B = 1, H · D = 3072 (FLUX.1's width: 24 heads of 128, or 48 of 64), S = 4k ... 32k by default:
    * SDPA with the flash backend (the baseline);
    * ``int8_attention`` (quantization and the K mean included in its time), cosine against exact FP32 attention
      (memory-efficient SDPA in FP32 on the first two heads) on DiT-like inputs (K with a per-channel bias, three
      outlier channels);
    * ``block_sparse_attention`` keeping 25 % of the key blocks of every query block (random, blocks 64 x 64 and
      128 x 64), checked against the dense masked reference up to S = 4096 on one head.
    TOPS = attention FLOPs (4 · B · H · S² · D, times the kept fraction for block-sparse) / time.
(b) int8 on FLUX-shaped activations: q/k/v of a random-init FLUX.1 double-stream block at a 64 x 64 token grid plus
    512 text tokens (``dit_accel.bench.attention.flux_block_activations``), bf16, cosine against FP32.
(c) SageAttention (``sageattention.sageattn``, its Triton INT8 kernel), where installed: the same inputs, time and
    cosine, as the library users would otherwise reach for.
Per-step costs of whole transformers (FLUX.1-dev- and Wan-14B-sized) are ``benchmarks/models_gpu.py``; both run
from ``benchmarks/gpu_suite.py``.

Goals (H100): int8 >= 1.5x SDPA at S >= 4096 with cosine >= 0.999; block-sparse at 25 % >= 3x dense SDPA.
Timing: ``triton.testing.do_bench`` (median). Writes ``kernels-gpu.md`` / ``.json`` with the device name.

    python benchmarks/kernels_gpu.py -o benchmarks/results
    TRITON_INTERPRET=1 python benchmarks/kernels_gpu.py --device cpu --seqs 128 --dims 64 --width 128 -o /tmp/k
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def dit_like(heads: int, length: int, dim: int, device: str, seed: int = 0):
    """bf16 q, k, v (1, H, S, D): Gaussian, K with a per-channel bias (sigma 4), 3 outlier channels (2x Q, 4x K)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, heads, length, dim, generator=g, device=device)
    k = torch.randn(1, heads, length, dim, generator=g, device=device)
    k += 4 * torch.randn(heads, 1, dim, generator=g, device=device)
    v = torch.randn(1, heads, length, dim, generator=g, device=device)
    outliers = torch.randperm(dim, generator=torch.Generator().manual_seed(seed))[:3].to(device)
    q[..., outliers] *= 2
    k[..., outliers] *= 4
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), 0).item()


def exact_fp32(q, k, v, heads: int = 2) -> torch.Tensor:
    """Exact attention of the first ``heads`` heads in FP32 (memory-efficient SDPA: O(S) memory)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.EFFICIENT_ATTENTION if q.is_cuda else SDPBackend.MATH
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(*(t[:, :heads].float() for t in (q, k, v)))


def random_lut(heads: int, q_blocks: int, k_blocks: int, keep: float, device: str, seed: int = 0):
    """Exactly ``round(keep · k_blocks)`` random key blocks per (head, query block), sorted."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    kept = max(1, round(keep * k_blocks))
    scores = torch.rand(heads, q_blocks, k_blocks, generator=g)
    indices = scores.topk(kept, -1).indices.sort(-1).values.to(torch.int32)
    counts = torch.full((heads, q_blocks), kept, dtype=torch.int32)
    return counts.to(device), indices.to(device), kept / k_blocks


def sageattention():
    """``sageattention.sageattn`` when it is installed and usable here (CUDA), else None."""
    try:
        from sageattention import sageattn
    except Exception:  # not installed, or built against another torch/triton
        return None
    return sageattn if torch.cuda.is_available() else None


def bench_kernels(seqs: list[int], dims: list[int], keep: float, bench, device: str = "cuda",
                  width: int = 3072, sage=None) -> list[dict]:
    """(a) and (c). ``width`` = heads x head_dim (FLUX.1: 3072); ``bench(fn)`` returns milliseconds; ``sage``:
    SageAttention's ``sageattn`` or None."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dit_accel.kernels.block_sparse import block_sparse_attention, block_sparse_reference, num_blocks
    from dit_accel.kernels.int8_attention import int8_attention

    rows = []
    for dim in dims:
        heads = width // dim
        for length in seqs:
            q, k, v = dit_like(heads, length, dim, device)
            flops = 4.0 * heads * length * length * dim
            row = {"D": dim, "H": heads, "S": length}

            def sdpa():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v)

            row["sdpa_ms"] = bench(sdpa)
            row["sdpa_tops"] = flops / row["sdpa_ms"] / 1e9
            # What a user gets without choosing: PyTorch's own backend order (cuDNN before flash on Hopper).
            row["sdpa_default_ms"] = bench(lambda: F.scaled_dot_product_attention(q, k, v))
            exact = exact_fp32(q, k, v)
            row["sdpa_cos"] = cosine(sdpa()[:, :2], exact)

            row["int8_ms"] = bench(lambda: int8_attention(q, k, v))
            row["int8_tops"] = flops / row["int8_ms"] / 1e9
            row["int8_cos"] = cosine(int8_attention(q, k, v)[:, :2], exact)
            if sage is not None and dim in (64, 96, 128):
                row["sage_ms"] = bench(lambda: sage(q, k, v, tensor_layout="HND", is_causal=False))
                row["sage_cos"] = cosine(sage(q, k, v, tensor_layout="HND", is_causal=False)[:, :2], exact)
            del exact

            for block_q, block_k in ((64, 64), (128, 64)):
                counts, indices, kept = random_lut(heads, num_blocks(length, block_q), num_blocks(length, block_k),
                                                   keep, device)

                def sparse():
                    return block_sparse_attention(q, k, v, counts, indices, block_q=block_q, block_k=block_k)

                name = f"bs{block_q}x{block_k}"
                row[f"{name}_ms"] = bench(sparse)
                row[f"{name}_tops"] = flops * kept / row[f"{name}_ms"] / 1e9
                row[f"{name}_kept"] = kept
                if length <= 4096:  # dense masked reference: O(S^2) memory, one head
                    one = (q[:, :1], k[:, :1], v[:, :1])
                    ref = block_sparse_reference(*one, counts[:1], indices[:1], block_q=block_q, block_k=block_k)
                    row[f"{name}_err"] = (sparse()[:, :1].float() - ref.float()).abs().max().item()
            rows.append(row)
            print(f"D={dim} S={length}: sdpa {row['sdpa_ms']:.3f} ms, int8 {row['int8_ms']:.3f} ms "
                  f"({row['sdpa_ms'] / row['int8_ms']:.2f}x, cos {row['int8_cos']:.5f}), sage "
              f"{row.get('sage_ms', math.nan):.3f} ms, block-sparse 64x64 "
                  f"{row['bs64x64_ms']:.3f} ms ({row['sdpa_ms'] / row['bs64x64_ms']:.2f}x)", flush=True)
    return rows


def bench_flux_activations(side: int = 64, device: str = "cuda", **block) -> dict:
    """(b). ``block``: passed to ``flux_block_activations`` (heads, head_dim, text_tokens)."""
    from dit_accel.bench.attention import flux_block_activations
    from dit_accel.kernels.int8_attention import int8_attention

    call = flux_block_activations(side, **block)
    q, k, v = (getattr(call, name).to(device).bfloat16() for name in ("query", "key", "value"))
    exact = call.output.to(device)
    sdpa = F.scaled_dot_product_attention(q, k, v)
    return {"tokens": q.shape[2], "int8_cos": cosine(int8_attention(q, k, v), exact), "sdpa_bf16_cos": cosine(sdpa,
                                                                                                            exact)}


def write_markdown(path: Path, kernels: list[dict], flux_act: dict | None, elapsed: float, device_name: str,
                   sage_version: str | None = None) -> None:
    import triton

    lines = ["# Triton kernels on GPU", "",
             f"Device: **{device_name}**; torch {torch.__version__}, triton {triton.__version__}, "
             f"CUDA {torch.version.cuda}, Python {platform.python_version()}"
             + (f", SageAttention {sage_version}" if sage_version else ", SageAttention not installed")
             + f". Produced by `benchmarks/kernels_gpu.py` in {elapsed / 60:.1f} min. Times: "
             "`triton.testing.do_bench`, median.", ""]
    if kernels:
        lines += ["## Kernels (bf16, B = 1, H · D = 3072, DiT-like inputs)", "",
                  "int8 time includes quantization and the K mean. Block-sparse keeps 25 % of the key blocks of every "
                  "query block (random); its TOPS count only the kept blocks. cos: against exact FP32 attention.", "",
                  "Speedups are against SDPA's flash backend; *vs default* against SDPA as PyTorch picks its backend.",
                  "",
                  "| D | S | SDPA flash ms | SDPA TOPS | SDPA default ms | int8 ms | int8 TOPS | int8 speedup | "
                  "int8 vs default | int8 cos | SDPA bf16 cos | Sage ms | Sage speedup | Sage cos | BS 64x64 ms | "
                  "BS 64x64 speedup | BS 128x64 ms | BS 128x64 speedup | BS max err vs ref |",
                  "|" + "---|" * 19]
        for r in kernels:
            err = max((r[key] for key in ("bs64x64_err", "bs128x64_err") if key in r), default=None)
            sage = (f"{r['sage_ms']:.3f} | {r['sdpa_ms'] / r['sage_ms']:.2f}x | {r['sage_cos']:.5f}"
                    if "sage_ms" in r else "– | – | –")
            default = (f"{r['sdpa_default_ms']:.3f} | " if "sdpa_default_ms" in r else "– | ")
            versus = (f"{r['sdpa_default_ms'] / r['int8_ms']:.2f}x | " if "sdpa_default_ms" in r else "– | ")
            lines.append(
                f"| {r['D']} | {r['S']} | {r['sdpa_ms']:.3f} | {r['sdpa_tops']:.0f} | {default}{r['int8_ms']:.3f} | "
                f"{r['int8_tops']:.0f} | {r['sdpa_ms'] / r['int8_ms']:.2f}x | {versus}{r['int8_cos']:.5f} | "
                f"{r['sdpa_cos']:.5f} | {sage} | {r['bs64x64_ms']:.3f} | {r['sdpa_ms'] / r['bs64x64_ms']:.2f}x | "
                f"{r['bs128x64_ms']:.3f} | {r['sdpa_ms'] / r['bs128x64_ms']:.2f}x | "
                f"{'-' if err is None else f'{err:.1e}'} |")
        long = [r for r in kernels if r["S"] >= 4096]
        if long:
            int8_speed = min(r["sdpa_ms"] / r["int8_ms"] for r in long)
            int8_cos = min(r["int8_cos"] for r in long)
            bs_speed = min(max(r["sdpa_ms"] / r["bs64x64_ms"], r["sdpa_ms"] / r["bs128x64_ms"]) for r in long)
            lines += ["", f"Goal int8 >= 1.5x SDPA at S >= 4096 with cos >= 0.999: "
                      f"**{'met' if int8_speed >= 1.5 and int8_cos >= 0.999 else 'not met'}** "
                      f"(min speedup {int8_speed:.2f}x, min cos {int8_cos:.5f}).",
                      f"Goal block-sparse at 25 % >= 3x dense SDPA at S >= 4096 (best block shape): "
                      f"**{'met' if bs_speed >= 3 else 'not met'}** (min speedup {bs_speed:.2f}x)."]
    if flux_act:
        lines += ["", "## int8 on FLUX-shaped activations", "",
                  f"Random-init FLUX.1 double-stream block, {flux_act['tokens']} tokens, bf16: int8 cos "
                  f"**{flux_act['int8_cos']:.5f}**, SDPA bf16 cos {flux_act['sdpa_bf16_cos']:.5f} (against the FP32 "
                  "output)."]
    path.write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps({"device": device_name, "kernels": kernels,
                                                     "flux_activations": flux_act}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--seqs", default="4096,8192,16384,32768")
    parser.add_argument("--dims", default="64,128")
    parser.add_argument("--width", type=int, default=3072, help="heads x head_dim")
    parser.add_argument("--keep", type=float, default=0.25, help="block-sparse: kept fraction of key blocks")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only as a smoke test under TRITON_INTERPRET=1")
    args = parser.parse_args()

    from dit_accel.kernels import interpret_mode, triton_importable

    if not triton_importable():
        sys.exit("benchmarks/kernels_gpu.py needs Triton (pip install triton); nothing was measured.")
    start = time.time()
    if args.device == "cpu":
        if not interpret_mode():
            sys.exit("--device cpu is a smoke test of this script: set TRITON_INTERPRET=1.")

        def bench(fn):
            begin = time.perf_counter()
            fn()
            return (time.perf_counter() - begin) * 1e3

        side, block, name = 8, {"heads": 2, "head_dim": 64, "text_tokens": 8}, "CPU interpreter (smoke test)"
    else:
        if not torch.cuda.is_available():
            sys.exit("benchmarks/kernels_gpu.py measures the Triton kernels on a CUDA GPU; this machine has no CUDA "
                     "device, so nothing was measured (the CPU tests cover correctness: tests/test_kernels_*.py).")
        if interpret_mode():
            sys.exit("TRITON_INTERPRET is set: unset it to measure compiled kernels on the GPU.")
        from triton.testing import do_bench

        def bench(fn):
            return do_bench(fn, warmup=100, rep=400, return_mode="median")

        side, block, name = 64, {}, torch.cuda.get_device_name()
    sage = sageattention()
    sage_version = None
    if sage is not None:
        from importlib.metadata import version

        sage_version = version("sageattention")
    kernels = bench_kernels([int(s) for s in args.seqs.split(",")], [int(d) for d in args.dims.split(",")],
                            args.keep, bench, device=args.device, width=args.width, sage=sage)
    flux_act = bench_flux_activations(side, device=args.device, **block)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "kernels-gpu.md"
    write_markdown(path, kernels, flux_act, time.time() - start, name, sage_version)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
