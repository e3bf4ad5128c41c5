"""The GPU benchmark scripts (``benchmarks/kernels_gpu.py``, ``benchmarks/models_gpu.py``), run end to end on tiny
shapes on the CPU (Triton kernels in the interpreter), so that a session that gets a GPU for a few minutes spends them
measuring, not debugging the scripts."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch

from dit_accel.kernels import triton_importable

ROOT = Path(__file__).resolve().parent.parent


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def timer(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


@pytest.mark.skipif(not triton_importable(), reason="Triton is not installed")
def test_every_part_of_the_kernel_benchmark_runs_on_tiny_shapes(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    script = load("kernels_gpu")
    kernels = script.bench_kernels([128], [64], 0.25, timer, device="cpu", width=128)
    row = kernels[0]
    assert (row["D"], row["H"], row["S"]) == (64, 2, 128)
    assert row["int8_cos"] > 0.99 and row["sdpa_cos"] > 0.999
    assert row["bs64x64_err"] < 2e-2 and row["bs128x64_err"] < 2e-2  # bf16 kernel vs the masked reference
    flux_act = script.bench_flux_activations(8, device="cpu", heads=2, head_dim=64, text_tokens=8)
    assert flux_act["tokens"] == 8 * 8 + 8 and flux_act["int8_cos"] > 0.99
    out = tmp_path / "kernels-gpu.md"
    script.write_markdown(out, kernels, flux_act, 1.0, "CPU interpreter (smoke test)")
    text = out.read_text()
    assert "Device: **CPU interpreter (smoke test)**" in text and "| 64 | 128 |" in text
    assert (tmp_path / "kernels-gpu.json").is_file()


@pytest.mark.slow
def test_the_model_benchmark_times_every_recipe_on_tiny_flux_and_wan(tmp_path: Path) -> None:
    script = load("models_gpu")
    results = script.run(["flux", "wan"], 8, tmp_path, device="cpu", log=lambda line: None)
    assert [r["model"] for r in results] == ["flux", "wan"]
    for result in results:
        assert "error" not in result, result
        rows = {row["label"]: row for row in result["rows"]}
        assert list(rows) == [case[0] for case in script.CASES]
        failed = {label: row["error"] for label, row in rows.items() if "error" in row}
        assert not failed, failed
        for label in ("fora", "magcache (forced skips)", "fbcache (forced skips)", "taylorseer"):
            row = rows[label]  # a skipped step happened and costs less, by the accounting, than a full one
            # (on these tiny models the embeddings and final layers, which every call runs, are a large share)
            assert row["cheapest_fraction"] is not None and row["cheapest_fraction"] < 0.7, (label, row)
            assert row["full_calls"] >= 1 and row["flops_fraction"] < 1
            assert row["cos_first_call"] > 0.9999  # caching computes the first step exactly
        cfg = rows["cfg-share (CFG as two calls)"]
        assert cfg["calls"] == 16 and cfg["cheapest_fraction"] < 1
    text = (tmp_path / "models-gpu.md").read_text()
    assert "## flux" in text and "## wan" in text and "| fora |" in text


@pytest.mark.skipif(not triton_importable(), reason="Triton is not installed")
@pytest.mark.slow
def test_the_profile_script_runs_every_stage_and_call_on_tiny_shapes(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    script = load("profile_gpu")
    stages = script.int8_stages([128], [64], timer, "cpu", width=128)
    row = stages[0]
    assert row["kernel_default_ms"] > 0 and row["kernel_without_pv_ms"] > 0 and row["best_setting"].startswith("k")
    assert not [key for key in row if key.endswith("_error")], row
    models_gpu = load("models_gpu")
    m = models_gpu.flux("cpu", torch.float32, **models_gpu.TINY["flux"])
    calls = script.model_calls(m, "cpu")
    assert not {label: r["error"] for label, r in calls.items() if "error" in r}
    assert {"dense", "fora: a reused call", "taylorseer: a forecast call", "int8"} <= set(calls)
    text = script.markdown(stages, {m.description: calls}, "CPU interpreter (smoke test)")
    assert "| 64 | 128 |" in text and "| fora: a reused call |" in text
