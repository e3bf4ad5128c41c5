"""benchmarks/kernels_gpu.py, run end to end on tiny shapes under Triton's CPU interpreter, so that a session that
gets a GPU for a few minutes spends them measuring, not debugging the script."""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path

import pytest
import torch

from dit_accel.kernels import triton_importable

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not triton_importable(), reason="Triton is not installed")


@pytest.fixture
def script(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    spec = importlib.util.spec_from_file_location("kernels_gpu", ROOT / "benchmarks" / "kernels_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timer(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=64, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(16, 24, 24)).eval()


def test_every_part_of_the_gpu_benchmark_runs_on_tiny_shapes(script, tmp_path: Path) -> None:
    kernels = script.bench_kernels([128], [64], 0.25, timer, device="cpu", width=128)
    row = kernels[0]
    assert (row["D"], row["H"], row["S"]) == (64, 2, 128)
    assert row["int8_cos"] > 0.99 and row["sdpa_cos"] > 0.999
    assert row["bs64x64_err"] < 2e-2 and row["bs128x64_err"] < 2e-2  # bf16 kernel vs the masked reference
    flux_act = script.bench_flux_activations(8, device="cpu", heads=2, head_dim=64, text_tokens=8)
    assert flux_act["tokens"] == 8 * 8 + 8 and flux_act["int8_cos"] > 0.99
    model = tiny_flux()
    e2e = script.bench_end_to_end(timer, model=model, inputs=script.flux_inputs(model, side=8, text=8))
    assert [r["method"] for r in e2e] == ["dense (SDPA)", "int8", "hilbert", "proxy"]
    assert all("error" not in r and math.isfinite(r["ms"]) and r["cos"] > 0.9 for r in e2e), e2e
    out = tmp_path / "kernels-gpu.md"
    script.write_markdown(out, kernels, flux_act, e2e, 1.0, "CPU interpreter (smoke test)")
    text = out.read_text()
    assert "Device: **CPU interpreter (smoke test)**" in text and "| int8 |" in text
