"""8-bit attention: Triton kernel (CPU interpreter) vs its PyTorch reference and exact attention; the int8 recipe.

The kernel tests run Triton's interpreter (``TRITON_INTERPRET=1``, set per test; the kernels are wrapped at launch,
see ``dit_accel/kernels/jit.py``) on small shapes, and skip when Triton is not installed. The recipe's CPU fallback needs no
Triton.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import pipelines_for_tests as pipes
from dit_accel import IdlePluginWarning
from dit_accel import accelerate_dit, load_recipe
from dit_accel.attention.int8 import NO_KERNEL, Int8Config
from dit_accel.kernels import triton_importable
from dit_accel.kernels.int8_attention import (int8_attention, int8_attention_reference, key_mean,
                                              quantize_per_block, softmax_multiplier)

needs_triton = pytest.mark.skipif(not triton_importable(), reason="Triton is not installed")
# One output ulp at magnitude 1, twice: the kernel and the reference differ only in FP32 summation order, the
# interpreter's bf16 rounding and (on GPU) exp2's last bits.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-3}


def dit_like(batch, heads, length, dim, dtype, layout="HND", seed=0, k_len=None):
    """q, k, v like DiT activations: a per-channel bias on K (sigma 4) and three outlier channels, 2x in Q and 4x in
    K. (Harsher outliers, 8x in both, bring per-block INT8 to cosine ~0.998-0.999: a limit of one scale per block.)"""
    g = torch.Generator().manual_seed(seed)
    k_len = length if k_len is None else k_len
    q = torch.randn(batch, heads, length, dim, generator=g)
    k = torch.randn(batch, heads, k_len, dim, generator=g) + 4 * torch.randn(heads, 1, dim, generator=g)
    v = torch.randn(batch, heads, k_len, dim, generator=g)
    outliers = torch.randperm(dim, generator=g)[:3]
    q[..., outliers] *= 2
    k[..., outliers] *= 4
    tensors = (q, k, v) if layout == "HND" else tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))
    return tuple(t.to(dtype) for t in tensors)


def exact(q, k, v, layout="HND", scale=None):
    if layout == "NHD":
        return exact(*(t.transpose(1, 2) for t in (q, k, v)), scale=scale).transpose(1, 2)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)


def cosine(a, b) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), 0).item()


# -- the reference's own math -------------------------------------------------------------------------------------
def test_quantization_is_symmetric_int8_per_block():
    x = torch.randn(1, 2, 70, 80)
    x8, scales = quantize_per_block(x, 32, multiplier=0.5)
    assert x8.shape == (1, 2, 96, 128) and scales.shape == (1, 2, 3) and x8.dtype == torch.int8
    assert int(x8.abs().max()) == 127 and bool((x8[:, :, 70:] == 0).all()) and bool((x8[..., 80:] == 0).all())
    restored = x8[:, :, :70, :80].float() * scales.repeat_interleave(32, -1)[:, :, :70, None]
    assert (restored - 0.5 * x).abs().max() <= scales.max() / 2 + 1e-6  # half a step at most
    zeros, zero_scales = quantize_per_block(torch.zeros(1, 1, 8, 64), 16)
    assert bool((zeros == 0).all()) and bool((zero_scales == 0).all())  # no NaN from an all-zero block


def test_reference_matches_exact_attention():
    q, k, v = dit_like(1, 2, 100, 64, torch.float16)
    out = int8_attention_reference(q, k, v, block_q=32, block_k=16)
    assert cosine(out, exact(q, k, v)) >= 0.999
    assert cosine(int8_attention_reference(q, k, v, scale=0.3), exact(q, k, v, scale=0.3)) >= 0.999


# -- Triton kernel vs reference (interpreter) ---------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("layout,dtype,dim", [("HND", torch.float16, 80), ("NHD", torch.bfloat16, 128)])
def test_triton_quantization_is_bit_identical(interpreter, layout, dtype, dim):
    from dit_accel.kernels import _triton_int8

    q, k, _ = dit_like(1, 2, 100, dim, dtype, layout)
    qh, kh = (t if layout == "HND" else t.transpose(1, 2) for t in (q, k))
    multiplier = softmax_multiplier(None, dim)
    for x, block, mult, mean in ((qh, 64, multiplier, None), (kh, 32, 1.0, key_mean(kh))):
        ref_q, ref_s = quantize_per_block(x, block, multiplier=mult, mean=mean)
        tri_q, tri_s = _triton_int8.quantize(x, block, mult, mean)
        assert torch.equal(tri_q, ref_q) and torch.equal(tri_s, ref_s)


@needs_triton
@pytest.mark.parametrize("length,dim,dtype,layout", [
    (64, 64, torch.float16, "HND"), (100, 128, torch.bfloat16, "NHD"), (100, 80, torch.float16, "HND"),
    (37, 8, torch.float32, "NHD"),
])
def test_kernel_matches_reference_and_exact(interpreter, length, dim, dtype, layout):
    q, k, v = dit_like(1, 2, length, dim, dtype, layout)
    originals = [t.clone() for t in (q, k, v)]
    out = int8_attention(q, k, v, layout=layout)
    reference = int8_attention_reference(q, k, v, layout=layout)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), reference.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    assert cosine(out, exact(q, k, v, layout)) >= 0.999
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), originals))  # inputs never modified


@needs_triton
@pytest.mark.parametrize("dtype,pv_bf16", [(torch.float16, False), (torch.bfloat16, True)])
def test_other_blocks_lengths_scale_and_pv_dtype(interpreter, dtype, pv_bf16):
    q, k, v = dit_like(2, 1, 50, 64, dtype, k_len=77)
    kwargs = dict(scale=0.2, block_q=32, block_k=16, pv_bf16=pv_bf16)
    out = int8_attention(q, k, v, **kwargs)
    reference = int8_attention_reference(q, k, v, **kwargs)
    torch.testing.assert_close(out.float(), reference.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    assert cosine(out, exact(q, k, v, scale=0.2)) >= 0.999


@needs_triton
def test_smoothing_keeps_channel_bias_out_of_the_error(interpreter):
    q, k, v = dit_like(1, 2, 128, 64, torch.float16, seed=3)
    smooth = cosine(int8_attention(q, k, v), exact(q, k, v))
    plain = cosine(int8_attention(q, k, v, smooth_k=False), exact(q, k, v))
    assert smooth >= 0.999 and 1 - smooth < 1 - plain


@needs_triton
@pytest.mark.parametrize("model", pipes.ZOO)
def test_zoo_activations(interpreter, model):
    from dit_accel.pipelines.zoo.pipelines import WEIGHTS

    from dit_accel.bench.attention import capture_attention

    if not (WEIGHTS / model.split(":")[1] / "model.safetensors").is_file():
        pytest.skip("zoo weights not exported")
    pipe = pipes.build(model)

    def generate():
        with torch.no_grad():
            pipe(**pipes.call_kwargs(model, steps=2))

    calls = capture_attention(pipe, generate, step=1, layers=2)
    for call in calls[:3]:
        q, k, v = (t.half() for t in (call.query, call.key, call.value))  # the dtype the kernel is for
        out = int8_attention(q, k, v, scale=call.scale)
        assert cosine(out, call.output) >= 0.999, call.layer


@needs_triton
def test_custom_op_traces_under_compile(interpreter):
    q, k, v = dit_like(1, 2, 40, 16, torch.float16)
    args = (q, k, v, None, "HND", 32, 16, True, False)
    torch.library.opcheck(torch.ops.dit_accel.int8_attention.default, args)

    def attend(q, k, v):
        return int8_attention(q * 1.0, k, v, block_q=32, block_k=16) + 1

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), attend(q, k, v), atol=0, rtol=0)


def test_bad_arguments():
    q = torch.randn(1, 2, 8, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="layout 'BHSD' is not allowed"):
        int8_attention_reference(q, q, q, layout="BHSD")
    with pytest.raises(ValueError, match="head dim 300"):
        big = torch.randn(1, 1, 8, 300)
        int8_attention_reference(big, big, big)
    with pytest.raises(ValueError, match="block_q = 100"):
        int8_attention_reference(q, q, q, block_q=100)
    with pytest.raises(ValueError, match="Int8Config.block_k = 48 is not allowed"):
        Int8Config(block_k=48)


# -- the recipe ------------------------------------------------------------------------------------------------------
def generate(pipe, name):
    with torch.no_grad():
        return pipes.output_of(name, pipe(**pipes.call_kwargs(name, steps=1)))


def test_recipe_falls_back_on_plain_cpu_with_one_warning(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pipe = pipes.build("sd3")
    reference = generate(pipe, "sd3")
    handle = accelerate_dit(pipe, "int8")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = generate(pipe, "sd3")
    ours = [w for w in caught if "dit_accel" in str(w.message)]
    assert [str(w.message) for w in ours] == [f"dit_accel int8: {NO_KERNEL}"]
    assert torch.equal(out, reference)
    assert handle.transformers[0].plugins[0].fallbacks[NO_KERNEL] > 0
    handle.remove()
    assert load_recipe("int8").plugins[0] == Int8Config()


def test_without_triton_the_recipe_still_runs(monkeypatch, interpreter):
    import sys

    from dit_accel.kernels import kernel_usable, triton_available

    monkeypatch.setitem(sys.modules, "triton", None)  # "import triton" now raises ImportError
    triton_importable.cache_clear()
    try:
        assert not triton_importable() and not triton_available() and not kernel_usable(torch.zeros(1))
        pipe = pipes.build("sd3")
        handle = accelerate_dit(pipe, "int8")
        with pytest.warns(UserWarning, match="int8 attention needs CUDA \\+ Triton"):
            generate(pipe, "sd3")
        handle.remove()
    finally:
        monkeypatch.undo()
        triton_importable.cache_clear()


@needs_triton
@pytest.mark.slow  # CI runs it with the slow int8 tests (.ci/run)
def test_recipe_runs_the_kernel_under_the_interpreter(interpreter):
    pipe = pipes.build("sd3")
    reference = generate(pipe, "sd3")
    handle = accelerate_dit(pipe, "int8")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="dit_accel")
        warnings.filterwarnings("ignore", category=IdlePluginWarning)  # reported, not hidden
        out = generate(pipe, "sd3")
    plugin = handle.transformers[0].plugins[0]
    assert not plugin.fallbacks
    assert not torch.equal(out, reference)  # the kernel ran
    assert cosine(out, reference) >= 0.9999 and (out - reference).abs().max() < 1e-2
    handle.remove()
    assert math.isfinite(out.sum().item())


# -- the GPU build, without a GPU ----------------------------------------------------------------------------------
@needs_triton
@pytest.mark.slow
def test_kernels_compile_for_hopper():
    """Both kernels compile to sm_90 machine code (Triton's bundled ptxas; no GPU needed), as the GPU path builds
    them: catches GPU-only compile errors the interpreter cannot see."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dit_accel.kernels import _triton_block_sparse, _triton_int8

    def build(fn, types, constexprs, **options):
        jitted = triton.jit(fn)
        signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in jitted.arg_names}
        return triton.compile(ASTSource(jitted, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                              options=options)

    quant = build(_triton_int8._quantize_kernel,
                  {"X": "*bf16", "Mean": "*fp32", "Out": "*i8", "Scale": "*fp32", "multiplier": "fp32"},
                  {"BLOCK": 64, "BLOCK_D": 64, "HAS_MEAN": True}, num_warps=4, enable_fp_fusion=False)
    assert "fma.rn" not in quant.asm["ptx"]  # bit-identical rounding with the reference needs no FMA
    attention = build(_triton_int8._attention_kernel,
                      {"Q8": "*i8", "QScale": "*fp32", "K8": "*i8", "KScale": "*fp32", "V": "*bf16", "O": "*bf16"},
                      {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 128, "BLOCK_DV": 128, "EVEN_K": False,
                       "PV_BF16": False, "UPCAST_BF16": False}, num_warps=8, num_stages=3, enable_fp_fusion=True)
    assert "wgmma" in attention.asm["ptx"]  # Hopper tensor-core MMAs
    types = {n: "*bf16" for n in ("Q", "K", "V", "O", "PK", "PV")}
    types.update({"Counts": "*i32", "Indices": "*i32", "KeyLen": "*i32", "PBias": "*fp32", "PCounts": "*i32",
                  "PIndices": "*i32", "qk_scale": "fp32"})
    sparse = build(_triton_block_sparse._block_sparse_kernel, types,
                   {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 128, "BLOCK_DV": 128, "HAS_KEY_LEN": True,
                    "HAS_POOLED": True, "FP32_DOT": False}, num_warps=8, num_stages=2, enable_fp_fusion=True)
    assert "wgmma" in sparse.asm["ptx"]
