"""Triton kernels on a CUDA GPU: 8-bit attention and block-sparse attention against torch SDPA (flash backend).

(a) Kernels, bf16, B = 1, H · D = 3072 (FLUX.1's width: 24 heads of 128, or 48 of 64), S = 1k ... 32k:
    * SDPA with the flash backend (the baseline);
    * ``int8_attention`` (quantization and the K mean included in its time), cosine against exact FP32 attention
      (memory-efficient SDPA in FP32 on the first two heads) on DiT-like inputs (K with a per-channel bias, three
      outlier channels);
    * ``block_sparse_attention`` keeping 25 % of the key blocks of every query block (random, blocks 64 x 64 and
      128 x 64), checked against the dense masked reference up to S = 4096 on one head.
    TOPS = attention FLOPs (4 · B · H · S² · D, times the kept fraction for block-sparse) / time.
(b) int8 on FLUX-shaped activations: q/k/v of a random-init FLUX.1 double-stream block at a 64 x 64 token grid plus
    512 text tokens (``dit_accel.bench.attention.flux_block_activations``), bf16, cosine against FP32.
(c) End to end: one forward of a random-init full-size FLUX.1 transformer (19 + 38 blocks, 24 x 128 heads, bf16) at
    the token count of a 1024 x 1024 image (64 x 64 = 4096 image tokens + 512 text tokens): dense (SDPA), the
    ``int8`` recipe, ``hilbert`` and ``proxy`` (acting on every step, ``start=0``) on their CUDA kernel path;
    cosine of the output against dense.

Goals (H100): int8 >= 1.5x SDPA at S >= 4096 with cosine >= 0.999; block-sparse at 25 % >= 3x dense SDPA.
Timing: ``triton.testing.do_bench`` (median). Writes ``kernels-gpu.md`` with the device name.

    python benchmarks/kernels_gpu.py -o benchmarks/results
"""

from __future__ import annotations

import argparse
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


def bench_kernels(seqs: list[int], dims: list[int], keep: float, bench, device: str = "cuda",
                  width: int = 3072) -> list[dict]:
    """(a). ``width`` = heads x head_dim (FLUX.1: 3072); ``bench(fn)`` returns milliseconds."""
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
            exact = exact_fp32(q, k, v)
            row["sdpa_cos"] = cosine(sdpa()[:, :2], exact)

            row["int8_ms"] = bench(lambda: int8_attention(q, k, v))
            row["int8_tops"] = flops / row["int8_ms"] / 1e9
            row["int8_cos"] = cosine(int8_attention(q, k, v)[:, :2], exact)
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
                  f"({row['sdpa_ms'] / row['int8_ms']:.2f}x, cos {row['int8_cos']:.5f}), block-sparse 64x64 "
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


def full_size_flux(device: str = "cuda"):
    """A random-init FLUX.1-dev-shaped transformer in bf16, built directly on the GPU (about 24 GB)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(guidance_embeds=True)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def flux_inputs(model, side: int = 64, text: int = 512) -> dict:
    """``model``'s inputs for a ``side x side`` packed latent (64 = a 1024 x 1024 image) and ``text`` T5 tokens."""
    config, device = model.config, model.device
    dtype = next(model.parameters()).dtype
    g = torch.Generator(device=device).manual_seed(0)
    img_ids = torch.zeros(side, side, 3, device=device)
    img_ids[..., 1] += torch.arange(side, device=device)[:, None]
    img_ids[..., 2] += torch.arange(side, device=device)[None, :]
    return {
        "hidden_states": torch.randn(1, side * side, config.in_channels, generator=g, device=device).to(dtype),
        "encoder_hidden_states": torch.randn(1, text, config.joint_attention_dim, generator=g, device=device).to(dtype),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=g, device=device).to(dtype),
        "timestep": torch.full((1,), 0.5, device=device, dtype=dtype),
        "guidance": torch.full((1,), 3.5, device=device, dtype=dtype) if config.guidance_embeds else None,
        "img_ids": img_ids.reshape(-1, 3), "txt_ids": torch.zeros(text, 3, device=device),
        "return_dict": False,
    }


def bench_end_to_end(bench_long, model=None, inputs=None) -> list[dict]:
    """Dense vs the recipes on ``model`` (default: :func:`full_size_flux`) with ``inputs`` (default:
    :func:`flux_inputs`, 1024 x 1024)."""
    from dit_accel import accelerate_dit

    model = full_size_flux() if model is None else model
    inputs = flux_inputs(model) if inputs is None else inputs

    def forward():
        with torch.inference_mode():
            return model(**inputs)[0]

    reference = forward()
    rows = [{"method": "dense (SDPA)", "ms": bench_long(forward), "cos": 1.0}]
    for recipe, overrides in (("int8", {}), ("hilbert", {"start": 0.0}), ("proxy", {"start": 0.0})):
        handle = accelerate_dit(model, recipe, **overrides)
        try:
            out = forward()
            rows.append({"method": recipe, "ms": bench_long(forward), "cos": cosine(out, reference)})
        except Exception as error:  # report and go on: one failing method must not hide the others
            rows.append({"method": recipe, "ms": math.nan, "cos": math.nan, "error": repr(error)[:200]})
        finally:
            handle.remove()
        print(rows[-1], flush=True)
    rows[0]["speedup"] = 1.0
    for row in rows[1:]:
        row["speedup"] = rows[0]["ms"] / row["ms"]
    return rows


def write_markdown(path: Path, kernels: list[dict], flux_act: dict | None, e2e: list[dict] | None,
                   elapsed: float, device_name: str) -> None:
    import triton

    lines = ["# Triton kernels on GPU", "",
             f"Device: **{device_name}**; torch {torch.__version__}, triton {triton.__version__}, "
             f"CUDA {torch.version.cuda}, Python {platform.python_version()}. Produced by "
             f"`benchmarks/kernels_gpu.py` in {elapsed / 60:.1f} min. Times: `triton.testing.do_bench`, median.", ""]
    if kernels:
        lines += ["## Kernels (bf16, B = 1, H · D = 3072, DiT-like inputs)", "",
                  "int8 time includes quantization and the K mean. Block-sparse keeps 25 % of the key blocks of every "
                  "query block (random); its TOPS count only the kept blocks. cos: against exact FP32 attention.", "",
                  "| D | S | SDPA flash ms | SDPA TOPS | int8 ms | int8 TOPS | int8 speedup | int8 cos | SDPA bf16 cos "
                  "| BS 64x64 ms | BS 64x64 speedup | BS 128x64 ms | BS 128x64 speedup | BS max err vs ref |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in kernels:
            err = max((r[key] for key in ("bs64x64_err", "bs128x64_err") if key in r), default=None)
            lines.append(
                f"| {r['D']} | {r['S']} | {r['sdpa_ms']:.3f} | {r['sdpa_tops']:.0f} | {r['int8_ms']:.3f} | "
                f"{r['int8_tops']:.0f} | {r['sdpa_ms'] / r['int8_ms']:.2f}x | {r['int8_cos']:.5f} | "
                f"{r['sdpa_cos']:.5f} | {r['bs64x64_ms']:.3f} | {r['sdpa_ms'] / r['bs64x64_ms']:.2f}x | "
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
                  f"Random-init FLUX.1 double-stream block, 64 x 64 grid + 512 text tokens ({flux_act['tokens']} "
                  f"tokens), bf16: int8 cos **{flux_act['int8_cos']:.5f}**, SDPA bf16 cos "
                  f"{flux_act['sdpa_bf16_cos']:.5f} (against the FP32 output)."]
    if e2e:
        lines += ["", "## End to end: random-init full-size FLUX.1 transformer, one forward, 4096 + 512 tokens", "",
                  "| method | ms | speedup | cos vs dense |", "|---|---|---|---|"]
        for r in e2e:
            lines.append(f"| {r['method']} | {r['ms']:.1f} | {r['speedup']:.2f}x | {r['cos']:.5f} |"
                         + (f" error: {r['error']}" if "error" in r else ""))
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--seqs", default="1024,2048,4096,8192,16384,32768")
    parser.add_argument("--dims", default="64,128")
    parser.add_argument("--keep", type=float, default=0.25, help="block-sparse: kept fraction of key blocks")
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    args = parser.parse_args()

    from dit_accel.kernels import interpret_mode, triton_importable

    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels_gpu.py measures the Triton kernels on a CUDA GPU; this machine has no CUDA "
                 "device, so nothing was measured (the CPU tests cover correctness: tests/test_kernels_*.py).")
    if not triton_importable():
        sys.exit("benchmarks/kernels_gpu.py needs Triton (pip install triton); nothing was measured.")
    if interpret_mode():
        sys.exit("TRITON_INTERPRET is set: unset it to measure compiled kernels on the GPU.")
    from triton.testing import do_bench

    def bench(fn):
        return do_bench(fn, warmup=100, rep=500, return_mode="median")

    def bench_long(fn):
        return do_bench(fn, warmup=2000, rep=6000, return_mode="median")

    start = time.time()
    kernels = [] if args.skip_kernels else bench_kernels([int(s) for s in args.seqs.split(",")],
                                                         [int(d) for d in args.dims.split(",")], args.keep, bench)
    flux_act = None if args.skip_kernels else bench_flux_activations()
    e2e = None if args.skip_e2e else bench_end_to_end(bench_long)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "kernels-gpu.md"
    write_markdown(path, kernels, flux_act, e2e, time.time() - start, torch.cuda.get_device_name())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
