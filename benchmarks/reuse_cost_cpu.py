"""What a reused step costs: a transformer call where ``fora`` serves every sub-layer, against a dense call.

    python benchmarks/reuse_cost_cpu.py -o benchmarks/results --threads 2 --repeats 15

Bare transformers at >= 1024 image tokens, random init: Flux (4 dual + 8 single blocks, 8 heads x 64, 1024 image +
128 text tokens: the configuration of issue 13), DiT (12 blocks, 8 x 64, 32x32 tokens), SD3 (8 joint blocks,
8 x 64, 1024 + 128 tokens), PixArt (12 blocks, 8 x 64, 32x32 tokens, 128 caption tokens), Wan, CogVideoX and LTX-Video
(12 blocks, 8 x 64, 4 x 16 x 16 = 1024 video tokens, 128 text tokens), Qwen-Image (12 blocks, 8 x 64, 32x32 tokens,
128 text tokens) and HunyuanVideo (4 dual + 8 single blocks, 8 x 64, 1024 video + 128 text tokens). Each repeat times one dense call (no acceleration), one reused call (``fora`` with an
interval longer than the run, inside a declared generation, after its computed first step) and one forecast call
(``taylorseer``, order 1, after its full steps), alternately; the ratios are of medians. The goal is <= 5 % of a dense call; the stats' FLOPs of a reused call are printed beside it
(0 % while time is still spent means the accounting misses what runs: modulation, gates, embeddings).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from dit_accel import accelerate_dit, remove_acceleration


def flux():
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=4, num_single_layers=8,
                                   attention_head_dim=64, num_attention_heads=8, joint_attention_dim=512,
                                   pooled_projection_dim=256, axes_dims_rope=(16, 24, 24)).eval()
    g = torch.Generator().manual_seed(0)
    rows, cols = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    inputs = dict(hidden_states=torch.randn(1, 1024, 64, generator=g),
                  encoder_hidden_states=torch.randn(1, 128, 512, generator=g),
                  pooled_projections=torch.randn(1, 256, generator=g),
                  img_ids=torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float(),
                  txt_ids=torch.zeros(128, 3))
    return model, inputs, lambda t: torch.tensor([t])


def dit():
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(num_attention_heads=8, attention_head_dim=64, in_channels=4, out_channels=4,
                                  num_layers=12, sample_size=64, patch_size=2, num_embeds_ada_norm=1000,
                                  norm_type="ada_norm_zero", norm_elementwise_affine=False).eval()
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 4, 64, 64, generator=g), class_labels=torch.tensor([3]))
    return model, inputs, lambda t: torch.tensor([t * 1000])


def sd3():
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=8,
                                  attention_head_dim=64, num_attention_heads=8, joint_attention_dim=512,
                                  caption_projection_dim=512, pooled_projection_dim=256, pos_embed_max_size=64).eval()
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 64, 64, generator=g),
                  encoder_hidden_states=torch.randn(1, 128, 512, generator=g),
                  pooled_projections=torch.randn(1, 256, generator=g))
    return model, inputs, lambda t: torch.tensor([t * 1000])


def pixart():
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel(num_attention_heads=8, attention_head_dim=64, in_channels=4, out_channels=8,
                                     num_layers=12, sample_size=64, patch_size=2, caption_channels=512,
                                     cross_attention_dim=512, norm_type="ada_norm_single", num_embeds_ada_norm=1000,
                                     norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=True,
                                     activation_fn="gelu-approximate").eval()
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 4, 64, 64, generator=g),
                  encoder_hidden_states=torch.randn(1, 128, 512, generator=g),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return model, inputs, lambda t: torch.tensor([t * 1000])


def wan():
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=8, attention_head_dim=64, in_channels=16,
                                  out_channels=16, text_dim=512, freq_dim=256, ffn_dim=2048, num_layers=12,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=256).eval()
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 4, 32, 32, generator=g),
                  encoder_hidden_states=torch.randn(1, 128, 512, generator=g))
    return model, inputs, lambda t: torch.tensor([t * 1000])


def cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    model = CogVideoXTransformer3DModel(num_attention_heads=8, attention_head_dim=64, in_channels=16, out_channels=16,
                                        time_embed_dim=512, text_embed_dim=512, num_layers=12, sample_width=32,
                                        sample_height=32, sample_frames=13, patch_size=2, max_text_seq_length=128).eval()
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 4, 16, 32, 32, generator=g),
                  encoder_hidden_states=torch.randn(1, 128, 512, generator=g))
    return model, inputs, lambda t: torch.tensor([int(t * 999)])


def ltx():
    from diffusers import LTXVideoTransformer3DModel

    model = LTXVideoTransformer3DModel(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1,
                                       num_attention_heads=8, attention_head_dim=64, cross_attention_dim=512,
                                       num_layers=12, caption_channels=512).eval()
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 4 * 16 * 16, 128, generator=g),
                  encoder_hidden_states=torch.randn(1, 128, 512, generator=g),
                  encoder_attention_mask=torch.ones(1, 128), num_frames=4, height=16, width=16)
    return model, inputs, lambda t: torch.tensor([t * 1000])


def qwen_image():
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=12,
                                        attention_head_dim=64, num_attention_heads=8, joint_attention_dim=512,
                                        axes_dims_rope=(16, 24, 24)).eval()
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 32 * 32, 64, generator=g),
                  encoder_hidden_states=torch.randn(1, 128, 512, generator=g),
                  encoder_hidden_states_mask=torch.ones(1, 128, dtype=torch.long), img_shapes=[(1, 32, 32)])
    return model, inputs, lambda t: torch.tensor([t])


def hunyuan_video():
    from diffusers import HunyuanVideoTransformer3DModel

    model = HunyuanVideoTransformer3DModel(in_channels=16, out_channels=16, num_attention_heads=8, attention_head_dim=64,
                                           num_layers=4, num_single_layers=8, num_refiner_layers=1, patch_size=2,
                                           patch_size_t=1, text_embed_dim=512, pooled_projection_dim=256,
                                           rope_axes_dim=(16, 24, 24)).eval()
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 4, 32, 32, generator=g),
                  encoder_hidden_states=torch.randn(1, 128, 512, generator=g),
                  encoder_attention_mask=torch.ones(1, 128), pooled_projections=torch.randn(1, 256, generator=g),
                  guidance=torch.tensor([3500.0]))
    return model, inputs, lambda t: torch.tensor([t * 1000])


FAMILIES = {"flux": flux, "dit": dit, "sd3": sd3, "pixart": pixart, "wan": wan, "cogvideox": cogvideox, "ltx": ltx,
            "qwen-image": qwen_image, "hunyuan-video": hunyuan_video}


def measure(name: str, repeats: int) -> dict:
    model, inputs, timestep = FAMILIES[name]()
    dense_model = copy.deepcopy(model)  # the same weights, never accelerated: timed alternately with the others
    forecast_model = copy.deepcopy(model)
    steps = repeats + 5  # < 50: after the first full steps every call is reused (forecast)

    def call(transformer, t: float) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            transformer(**inputs, timestep=timestep(t))
        return time.perf_counter() - start

    for _ in range(2):
        call(dense_model, 1.0), call(model, 1.0), call(forecast_model, 1.0)  # warm-up
    handle = accelerate_dit(model, "fora", interval=50, first_steps=0, last_steps=0)
    forecaster = accelerate_dit(forecast_model, "taylorseer", interval=50, order=1, first_steps=2, last_steps=0)
    dense_times, reused_times, forecast_times = [], [], []
    with handle.generation(num_steps=steps), forecaster.generation(num_steps=steps):
        for i in range(3):  # fora: step 0 fills the cache; taylorseer: its full steps (two, then one to check)
            call(model, 1.0 - i / steps), call(forecast_model, 1.0 - i / steps)
        forecast_before = forecaster.stats.totals()["forecast"]
        for i in range(3, repeats + 4):
            t = 1.0 - i / steps
            reused_times.append(call(model, t))
            forecast_times.append(call(forecast_model, t))
            dense_times.append(call(dense_model, t))
        totals = handle.stats.totals()
        fraction = handle.stats.flops_fraction
        forecasts = forecaster.stats.totals()["forecast"] - forecast_before
        expected = (repeats + 1) * len(forecaster.stats.sublayers)
    remove_acceleration(model), remove_acceleration(forecast_model)
    calls_each = repeats + 1
    if forecasts != expected:
        raise RuntimeError(f"{name}: {forecasts} forecast sub-layer calls of {expected}: not every timed call forecast")
    dense, reused = statistics.median(dense_times[1:]), statistics.median(reused_times[1:])
    forecast = statistics.median(forecast_times[1:])
    calls = calls_each + 3
    # The fora run's FLOPs fraction with one computed call (step 0) of ``calls``: what a reused call costs by the stats.
    per_reused = (fraction * calls - 1) / (calls - 1)
    return {"family": name, "dense_ms": round(dense * 1e3, 2), "reused_ms": round(reused * 1e3, 2),
            "ratio": round(reused / dense, 4), "forecast_ms": round(forecast * 1e3, 2),
            "forecast_ratio": round(forecast / dense, 4), "flops_fraction_of_reused_call": round(per_reused, 4),
            "reused_sublayer_calls": totals["reused"], "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--families", default=",".join(FAMILIES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(name, args.repeats) for name in args.families.split(",")]
    machine = f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}"
    lines = ["# Cost of a reused step (CPU)", "", f"`python benchmarks/reuse_cost_cpu.py --threads {args.threads} "
             f"--repeats {args.repeats}` on {machine}. A call where `fora` serves every sub-layer, against a dense "
             "call of the same transformer, and a `taylorseer` (order 1) forecast call, medians of interleaved calls. "
             "Goal: <= 5 %.", "",
             "| family | dense ms | reused ms | reused / dense | forecast ms | forecast / dense | FLOPs of a reused call "
             "(accounting) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['family']} | {r['dense_ms']} | {r['reused_ms']} | {r['ratio']:.1%} | {r['forecast_ms']} | "
              f"{r['forecast_ratio']:.1%} | {r['flops_fraction_of_reused_call']:.1%} |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reuse-cost-cpu.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    (args.out / "reuse-cost-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
