"""patch-parallel: the pure geometry and attention math in one process, the plugin under torchrun with 2 gloo
processes (tests/distributed/patch_parallel_run.py)."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dit_accel.parallel.patch import PatchParallelConfig, environment_problem, image_plan
from dit_accel.parallel.patches import (PatchGrid, attend_patches, exchange_bytes, payload, pool_rows, share, shares,
                                        tile_bias, tile_index, tokens_sent)
from dit_accel.recipe import load_recipe

SCRIPT = Path(__file__).parent / "distributed" / "patch_parallel_run.py"


# ------------------------------------------------------------------------------------------- geometry
def test_patch_grid_owns_whole_rows_and_refuses_uneven_splits():
    grid = PatchGrid(rows=8, width=6, world=4)
    assert [grid.patch(r) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert grid.tokens_per_patch == 12
    with pytest.raises(ValueError, match="5 token rows do not split into 2 equal patches.*run 5 processes"):
        PatchGrid(rows=5, width=8, world=2)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("band", [0, 1, 2, 7])
@pytest.mark.parametrize("pool", [0, 2, 3])
def test_shares_send_the_band_exact_and_the_rest_as_tiles(world, band, pool):
    grid = PatchGrid(rows=4 * world, width=5, world=world)
    for src in range(world):
        start, end = grid.patch(src)
        for dst in range(world):
            item = share(grid, src, dst, band, pool)
            if src == dst:
                assert item.tokens == 0
                continue
            dst_start, dst_end = grid.patch(dst)
            distance = lambda row: dst_start - row if row < dst_start else row - dst_end + 1  # noqa: E731
            exact = range(start + item.exact[0], start + item.exact[1])
            far = range(start + item.far[0], start + item.far[1])
            assert all(distance(row) <= band for row in exact)
            rest = set(range(start, end)) - set(exact)
            assert all(distance(row) > band for row in rest)
            assert set(far) == (rest if pool else set())
            assert item.tiles == (math.ceil(len(far) / pool) * math.ceil(5 / pool) if far else 0)
            full = share(grid, src, dst, None)
            assert full.exact == (0, end - start) and full.tiles == 0
    assert tokens_sent(grid, None) == world * (world - 1) * grid.tokens_per_patch


def test_pool_rows_means_partial_tiles_and_counts_them():
    rows, width, pool = 3, 5, 2
    x = torch.arange(rows * width * 2, dtype=torch.float64).view(rows * width, 2)
    tiles, counts = pool_rows(x, rows, width, pool)
    grid = x.view(rows, width, 2)
    expected, expected_counts = [], []
    for r in range(0, rows, pool):
        for c in range(0, width, pool):
            block = grid[r:r + pool, c:c + pool].reshape(-1, 2)
            expected.append(block.mean(0))
            expected_counts.append(block.shape[0])
    torch.testing.assert_close(tiles, torch.stack(expected))
    assert counts.tolist() == expected_counts == [4, 4, 2, 2, 2, 1]
    assert tile_index(rows, width, pool)[0].tolist()[:5] == [0, 0, 1, 1, 2]
    torch.testing.assert_close(tile_bias(counts), torch.tensor(expected_counts, dtype=torch.float64).log())


def _tokens(n: int, batch: int = 2, heads: int = 3, dim: int = 8, generator=None) -> torch.Tensor:
    return torch.randn(n, batch, heads, 2 * dim, dtype=torch.float64, generator=generator)


@pytest.mark.parametrize("text_first", [True, False])
def test_every_patch_exact_is_dense_attention_with_text_and_padding(text_first):
    generator = torch.Generator().manual_seed(0)
    grid, dim, text = PatchGrid(rows=6, width=4, world=3), 8, 5
    patches = [_tokens(grid.tokens_per_patch, generator=generator) for _ in range(3)]
    text_key, text_value = (torch.randn(2, 3, text, dim, dtype=torch.float64, generator=generator) for _ in range(2))
    keep_text = torch.tensor([[True] * text, [True, True, False, True, False]])
    image = torch.cat(patches).permute(1, 2, 0, 3)
    keys = torch.cat([text_key, image[..., :dim]] if text_first else [image[..., :dim], text_key], 2)
    values = torch.cat([text_value, image[..., dim:]] if text_first else [image[..., dim:], text_value], 2)
    keep = torch.ones(2, keys.shape[2], dtype=torch.bool)
    keep[:, slice(0, text) if text_first else slice(-text, None)] = keep_text
    for rank in range(3):
        query = torch.randn(2, 3, text + grid.tokens_per_patch, dim, dtype=torch.float64, generator=generator)
        empty = patches[0][:0]
        out = attend_patches(query, patches[rank], torch.cat(patches[:rank]) if rank else empty,
                             torch.cat(patches[rank + 1:]) if rank < 2 else empty, empty, torch.zeros(0), text_key,
                             text_value, text_first=text_first, dim_k=dim, keep_text=keep_text)
        expected = F.scaled_dot_product_attention(query, keys, values, attn_mask=keep[:, None, None, :])
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("text_first", [True, False])
def test_a_tile_with_log_count_bias_carries_the_mass_of_its_keys(text_first):
    """Keys and values constant within each tile: the tiles with their log(count) bias are exact (text keys and a
    padding mask beside them)."""
    generator = torch.Generator().manual_seed(1)
    grid, pool, band, dim, text = PatchGrid(rows=8, width=6, world=2), 2, 1, 8, 3
    local = _tokens(grid.tokens_per_patch, generator=generator)
    index, counts = tile_index(grid.rows_per_patch - band, grid.width, pool)
    per_tile = _tokens(int(counts.numel()), generator=generator)
    remote = torch.cat([_tokens(band * grid.width, generator=generator), per_tile[index]])  # rank 1's rows 4..7
    text_key, text_value = (torch.randn(2, 3, text, dim, dtype=torch.float64, generator=generator) for _ in range(2))
    keep_text = torch.tensor([[True, True, True], [True, False, True]])
    item = share(grid, 1, 0, band, pool)
    assert item.exact == (0, band) and item.tiles == counts.numel()
    sent, sent_counts = payload(remote, grid, item, pool)
    query = torch.randn(2, 3, grid.tokens_per_patch, dim, dtype=torch.float64, generator=generator)

    def attend(bias):
        return attend_patches(query, local, local[:0], sent[:item.exact_tokens], sent[item.exact_tokens:], bias,
                              text_key, text_value, text_first=text_first, dim_k=dim, keep_text=keep_text)

    image = torch.cat([local, remote]).permute(1, 2, 0, 3)
    keys = torch.cat([text_key, image[..., :dim]] if text_first else [image[..., :dim], text_key], 2)
    values = torch.cat([text_value, image[..., dim:]] if text_first else [image[..., dim:], text_value], 2)
    keep = torch.ones(2, keys.shape[2], dtype=torch.bool)
    keep[:, slice(0, text) if text_first else slice(-text, None)] = keep_text
    expected = F.scaled_dot_product_attention(query, keys, values, attn_mask=keep[:, None, None, :])
    torch.testing.assert_close(attend(tile_bias(sent_counts)), expected, rtol=1e-12, atol=1e-12)
    assert (attend(torch.zeros(item.tiles)) - expected).abs().max() > 1e-3  # the bias makes it mass-correct


def test_pcpp_exchanges_a_third_of_distrifusion_bytes_on_a_tiny_grid():
    grid = PatchGrid(rows=8, width=8, world=2)
    assert exchange_bytes(grid, None, 0, 256) == 2 * 32 * 256
    assert exchange_bytes(grid, 1, 4, 256) == (8 + 2) * 2 * 256  # one exact row + 2 tiles of 4x4, each way
    assert len(shares(grid, 1, 4)) == 2


# ------------------------------------------------------------------------------------------- config and refusals
def test_config_ranges_and_recipes():
    assert load_recipe("patch-parallel").plugins[0] == PatchParallelConfig(warmup_steps=2)
    assert load_recipe("patch-parallel-pcpp").plugins[0].mode == "pcpp"
    for bad, match in [({"mode": "ring"}, "mode = 'ring' is not allowed"), ({"band": -1}, "band = -1 is out of range"),
                       ({"mode": "pcpp", "band": 0, "pool": 0}, "exchanges nothing"),
                       ({"steps": (0, 2)}, "steps and layers must be unset")]:
        with pytest.raises(ValueError, match=match):
            PatchParallelConfig(**bad)


def _fake(name: str, plan: dict | None):
    return type(name, (torch.nn.Module,), {"_cp_plan": plan, "_parallel_config": None})()


def test_image_plan_keeps_text_whole_on_every_rank():
    from diffusers import FluxTransformer2DModel, LTXVideoTransformer3DModel, QwenImageTransformer2DModel

    flux = image_plan(_fake("FluxTransformer2DModel", FluxTransformer2DModel._cp_plan))
    assert set(flux[""]) == {"hidden_states", "img_ids"} and "proj_out" in flux
    qwen = image_plan(_fake("QwenImageTransformer2DModel", QwenImageTransformer2DModel._cp_plan))
    assert set(qwen["pos_embed"]) == {0} and set(qwen["transformer_blocks.0"]) == {"hidden_states"}
    assert set(qwen["transformer_blocks.*"]) == {"modulate_index"}
    ltx = image_plan(_fake("LTXVideoTransformer3DModel", LTXVideoTransformer3DModel._cp_plan))
    assert set(ltx[""]) == {"hidden_states"} and set(ltx["rope"]) == {0, 1}
    for name, out in [("DiTTransformer2DModel", "proj_out_2"), ("PixArtTransformer2DModel", "proj_out"),
                      ("SD3Transformer2DModel", "proj_out")]:  # diffusers has no plan for these: dit_accel's
        own = image_plan(_fake(name, None))
        assert set(own) == {"pos_embed", out} and own["pos_embed"][0].split_output and own[out].gather_dim == 1


def test_refusals_before_any_collective():
    from diffusers import FluxTransformer2DModel

    flux = _fake("FluxTransformer2DModel", FluxTransformer2DModel._cp_plan)
    assert "torchrun --nproc_per_node=N" in environment_problem(flux, None)
    assert "world size is 1" in environment_problem(flux, 1)
    assert environment_problem(flux, 2) is None
    problem = environment_problem(_fake("CogVideoXTransformer3DModel", None), 2)
    assert "CogVideoXTransformer3DModel has none" in problem and "flux (FluxTransformer2DModel)" in problem
    assert "sd3 (SD3Transformer2DModel)" in problem
    assert environment_problem(_fake("SD3Transformer2DModel", None), 2) is None  # dit_accel's own plan
    flux._parallel_config = object()
    assert "already enabled" in environment_problem(flux, 2)


def test_accelerate_dit_without_torchrun_refuses_and_leaves_the_model_untouched():
    import torch.distributed as dist
    from diffusers import FluxTransformer2DModel

    from dit_accel import accelerate_dit

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                   pooled_projection_dim=16, axes_dims_rope=[2, 2, 4])
    with pytest.raises(ValueError, match="launch with `torchrun"):
        accelerate_dit(model, "patch-parallel")
    assert model._parallel_config is None and "_diffusers_hook" not in vars(model)


def test_plugin_serves_text_padding_masks_and_refuses_other_masks():
    """The plugin's glue (no process group needed): a key-padding mask over the local keys is extended over the
    other patches' keys; any other mask cannot be split and is refused."""
    from dit_accel.core.attention import AttentionCall, LayerId
    from dit_accel.core.blocks import TokenGrid, TokenLayout
    from dit_accel.parallel.patch import PatchParallelPlugin, _Remote

    generator = torch.Generator().manual_seed(2)
    grid, dim, text = PatchGrid(rows=4, width=4, world=2), 8, 3
    local, remote = (_tokens(grid.tokens_per_patch, generator=generator) for _ in range(2))
    text_key, text_value = (torch.randn(2, 3, text, dim, dtype=torch.float64, generator=generator) for _ in range(2))
    query = torch.randn(2, 3, text + grid.tokens_per_patch, dim, dtype=torch.float64, generator=generator)
    keep = torch.ones(2, text + grid.tokens_per_patch, dtype=torch.bool)
    keep[1, 1] = False  # sample 1 pads its second text token
    mask = torch.zeros(2, 1, 1, keep.shape[1], dtype=torch.float64).masked_fill(~keep[:, None, None, :], -math.inf)
    layer = LayerId("transformer_blocks", 0, "attn", "joint")
    call = AttentionCall(layer, TokenLayout("joint", TokenGrid(1, 4, 4), text, "first"), None, 0,
                         {"attn_mask": mask, "dropout_p": 0.0, "is_causal": False, "scale": None})
    plugin = PatchParallelPlugin.__new__(PatchParallelPlugin)
    out = plugin._attention(query, local, _Remote(local[:0], remote, local[:0], torch.zeros(0)), text_key, text_value,
                            True, dim, call)
    image = torch.cat([local, remote]).permute(1, 2, 0, 3)
    keys, values = torch.cat([text_key, image[..., :dim]], 2), torch.cat([text_value, image[..., dim:]], 2)
    full_keep = torch.cat([keep[:, :text], torch.ones(2, 2 * grid.tokens_per_patch, dtype=torch.bool)], 1)
    expected = F.scaled_dot_product_attention(query, keys, values, attn_mask=full_keep[:, None, None, :])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    call.options["attn_mask"] = torch.randn(2, 1, 1, keep.shape[1], dtype=torch.float64, generator=generator)
    with pytest.raises(ValueError, match="not a padding mask over text tokens"):
        plugin._attention(query, local, _Remote(local[:0], remote, local[:0], torch.zeros(0)), text_key, text_value,
                          True, dim, call)


# ------------------------------------------------------------------------------------------- two processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path, case: str) -> list[dict]:
    out = tmp_path / "verdict.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    for _ in range(2):  # a gloo rendezvous occasionally aborts inside a long pytest run: one retry, fresh port
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                   str(SCRIPT), str(out), case]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
        if result.returncode == 0:
            break
    assert result.returncode == 0, "\n".join(
        line for line in result.stderr.splitlines() if line.strip() and not re.match(r"[EWIV]\d{4} ", line))[-4000:]
    return json.loads(out.read_text())["ranks"]


@pytest.mark.slow  # ~16 s on a quiet 2-core machine, ~30 s under load: almost all of it is 3 processes importing torch
def test_two_processes_exact_with_full_warmup_close_when_stale_and_pcpp_cheaper(tmp_path):
    first, second = _torchrun(tmp_path, "transformer")
    for verdict in (first, second):
        assert verdict["exact_max_abs_diff"] < 1e-5, "a warm-up over every step must equal the single process"
        assert verdict["exact_stats"]["fallbacks"] == {}
        distrifusion, pcpp = verdict["distrifusion"], verdict["pcpp"]
        print(f"PSNR vs single process: DistriFusion {distrifusion['psnr']:.1f} dB, PCPP {pcpp['psnr']:.1f} dB")
        assert distrifusion["psnr"] > 40 and pcpp["psnr"] > 35
        # counted bytes = the geometry's, per rank (each sends half of the world's total)
        grid = PatchGrid(*verdict["grid"], world=2)
        per_token = verdict["bytes_per_token"] * verdict["layers"]
        assert distrifusion["stats"]["bytes_per_step"] == exchange_bytes(grid, None, 0, per_token) / 2
        assert pcpp["stats"]["bytes_per_step"] == exchange_bytes(grid, 1, 4, per_token) / 2
        assert pcpp["stats"]["bytes_per_step"] <= 0.35 * distrifusion["stats"]["bytes_per_step"]
        assert verdict["exact_stats"]["bytes_by_step"]["0"] == distrifusion["stats"]["bytes_per_step"]
        assert "cannot run with gna" in verdict["refused_attention_plugin"]
        assert "5 token rows do not split into 2" in verdict["refused_rows"]
        assert "already enabled" in verdict["refused_enabled"]
        assert verdict["removed_cleanly"]
    assert first["distrifusion"]["psnr"] == second["distrifusion"]["psnr"], "ranks must gather the same output"


@pytest.mark.slow
def test_two_processes_zoo_mmdit_pipeline(tmp_path):
    for verdict in _torchrun(tmp_path, "pipeline"):
        assert verdict["exact_max_abs_diff"] < 1e-5
        print(f"zoo:mmdit 8 steps, warm-up 2: DistriFusion {verdict['distrifusion_psnr']:.1f} dB, PCPP "
              f"{verdict['pcpp_psnr']:.1f} dB, with fbcache {verdict['with_fbcache_psnr']:.1f} dB")
        assert verdict["distrifusion_psnr"] > 20 and verdict["pcpp_psnr"] > 20 and verdict["with_fbcache_psnr"] > 15


def test_two_processes_dit_pixart_sd3_with_dit_accels_own_plans(tmp_path):
    """diffusers gives these three no _cp_plan; patch-parallel splits them with dit_accel's (parallel/plans.py).
    In the default run (~11 s, one launch) so that every CI run checks a family on each kind of plan."""
    first, second = _torchrun(tmp_path, "families")
    for verdict in (first, second):
        for name in ("dit", "pixart-sigma", "sd3"):
            result = verdict[name]
            assert result["exact_max_abs_diff"] < 1e-5, f"{name}: a warm-up over every step must equal one process"
            assert result["fallbacks"] == {}, f"{name}: every attention call must be split into patches"
            assert result["distrifusion_psnr"] > 20 and result["pcpp_psnr"] > 20, name
            assert math.isfinite(result["distrifusion_psnr"]), f"{name}: stale patches must change the output"
        flux = verdict["flux_taylorseer"]
        assert flux["changed"] > 1e-3, "taylorseer-fast must forecast on tiny Flux, or the check below proves nothing"
        assert flux["max_abs_diff"] < 1e-5, "taylorseer's forecast check must count the replicated text once"
        assert verdict["dit"]["fora_after_reuse_max_abs_diff"] < 1e-5, "a step after a reuse must exchange anew"
        for cache in ("fbcache", "cfg-cache"):  # with every step synchronous, a cache on split tokens decides as one
            assert verdict["dit"][f"with_{cache}_max_abs_diff"] < 1e-5, cache  # process does
            assert verdict["dit"][f"with_{cache}_changed"] > 1e-3, f"{cache} must have reused something"
        assert "does not split; call it without block_controlnet_hidden_states" in verdict["sd3_refused_controlnet"]
    assert first["dit"] == second["dit"], "ranks must gather the same output"


def test_extrapolation_moves_remote_patches_along_their_last_step_only_when_consecutive():
    from dit_accel.parallel.patch import PatchParallelPlugin, _Remote

    plugin = object.__new__(PatchParallelPlugin)  # the method uses only the per-slot history
    plugin._history = {}
    generator = torch.Generator().manual_seed(0)
    first, second = (_Remote(*(torch.randn(3, 1, 2, 8, generator=generator) for _ in range(3)), torch.zeros(4))
                     for _ in range(2))
    assert plugin._extrapolated("slot", first, 4) is first  # nothing before: as exchanged
    moved = plugin._extrapolated("slot", second, 5)
    for name in ("before", "after", "tiles"):
        torch.testing.assert_close(getattr(moved, name), 2 * getattr(second, name) - getattr(first, name))
    assert plugin._extrapolated("slot", first, 7) is first  # a gap (step 6 missing): no trend to follow
    other_layout = _Remote(first.before[:2], first.after, first.tiles, first.bias)
    assert plugin._extrapolated("slot", other_layout, 8) is other_layout


# ------------------------------------------------------------------------------------------- PCPP correction
def _cut(parts: list[torch.Tensor], grid: PatchGrid, me: int, band: int, pool: int):
    """What PCPP's exchange gives rank ``me`` from the other patches ``parts``, as a Remote (no process group)."""
    from dit_accel.parallel.exchange import Remote

    exact, tiles, bias = [], [], []
    for src, part in enumerate(parts):
        if src == me:
            exact.append(part)
            continue
        item = share(grid, src, me, band, pool)
        sent, counts = payload(part, grid, item, pool)
        exact.append(sent[:item.exact_tokens])
        tiles.append(sent[item.exact_tokens:])
        bias.append(tile_bias(counts))
    empty = parts[0][:0]
    return Remote(torch.cat(exact[:me]) if me else empty, torch.cat(exact[me + 1:]) if me + 1 < len(parts) else empty,
                  torch.cat(tiles), torch.cat(bias))


def _attend(query, local, remote, text_key, text_value, dim):
    return attend_patches(query, local, remote.before, remote.after, remote.tiles, remote.bias, text_key, text_value,
                          dim_k=dim)


def test_sync_steps_are_the_warmup_and_every_refresh_interval_th_step_but_never_the_last():
    from dit_accel.parallel.correction import is_sync_step

    assert [s for s in range(12) if is_sync_step(s, 2, 0, 12)] == [0, 1]
    assert [s for s in range(12) if is_sync_step(s, 2, 3, 12)] == [0, 1, 4, 7, 10]
    assert [s for s in range(11) if is_sync_step(s, 2, 3, 11)] == [0, 1, 4, 7]  # step 10 is the last
    assert [s for s in range(4) if is_sync_step(s, 0, 0, None)] == [0]  # step 0 has nothing to reuse
    # Growing gaps: 3, then round(3 * 1.5) = 4 (4.5 rounds to even), round(6.75) = 7, round(10.1) = 10.
    assert [s for s in range(30) if is_sync_step(s, 2, 3, 30, 1.5)] == [0, 1, 4, 8, 15, 25]
    assert [s for s in range(20) if is_sync_step(s, 2, 2, 20, 1.5)] == [0, 1, 3, 6, 10, 17]
    assert [s for s in range(12) if is_sync_step(s, 2, 3, 12, 1.0)] == [0, 1, 4, 7, 10]


def test_refresh_growth_needs_refreshes_and_pcpp():
    from dit_accel.parallel.config import PatchParallelConfig

    assert PatchParallelConfig(mode="pcpp", refresh_interval=2, refresh_growth=1.5).refresh_growth == 1.5
    with pytest.raises(ValueError, match="refresh_interval = 0 makes none"):
        PatchParallelConfig(mode="pcpp", refresh_growth=1.5)
    with pytest.raises(ValueError, match="only applies to mode='pcpp'"):
        PatchParallelConfig(refresh_growth=1.5, refresh_interval=0)
    with pytest.raises(ValueError, match="refresh_growth"):
        PatchParallelConfig(mode="pcpp", refresh_interval=2, refresh_growth=0.5)


@pytest.mark.parametrize("world,band,pool", [(3, 0, 3), (3, 1, 2), (2, 9, 2)])
def test_corrections_are_exact_on_the_keys_they_were_learned_from_and_zero_when_pcpp_is_exact(world, band, pool):
    """Residual: ``O~ + (O - O~) = O``; detail: tiles plus cached detail give back the far rows. With a band that
    covers every row the residual is zero and there is no detail to add: the correction never changes exact
    attention."""
    from dit_accel.parallel.correction import Corrections, far_detail, with_detail

    generator = torch.Generator().manual_seed(3)
    grid, dim, text = PatchGrid(rows=4 * world, width=5, world=world), 8, 3
    parts = [_tokens(grid.tokens_per_patch, generator=generator) for _ in range(world)]
    text_key, text_value = (torch.randn(2, 3, text, dim, dtype=torch.float64, generator=generator) for _ in range(2))
    for me in range(world):
        query = torch.randn(2, 3, text + grid.tokens_per_patch, dim, dtype=torch.float64, generator=generator)
        exact = _attend(query, parts[me], _cut(parts, grid, me, None, 0), text_key, text_value, dim)
        remote = _cut(parts, grid, me, band, pool)
        approx = _attend(query, parts[me], remote, text_key, text_value, dim)
        corrections = Corrections()
        corrections.learn("slot", 1, exact, approx)
        torch.testing.assert_close(corrections.apply("slot", 1, approx), exact, rtol=1e-12, atol=1e-12)
        detailed = with_detail(remote, *far_detail(parts, grid, me, band, pool))
        torch.testing.assert_close(_attend(query, parts[me], detailed, text_key, text_value, dim), exact,
                                   rtol=1e-12, atol=1e-12)
        if band >= grid.rows:  # PCPP is exact here: nothing to correct
            assert remote.tiles.shape[0] == 0 and detailed is remote
            assert corrections.residuals["slot"].abs().max() <= 1e-12
        else:
            assert (approx - exact).abs().max() > 1e-3 and detailed.tiles.shape[0] > remote.tiles.shape[0]


def test_corrections_never_outlive_their_generation_or_fit_another_output():
    """A generation that crashed or was removed leaves nothing behind: a residual or detail is used only in the
    generation that learned it, for an output of its shape, and the plugin drops them in reset."""
    from dit_accel.parallel.correction import Corrections
    from dit_accel.parallel.exchange import Remote
    from dit_accel.parallel.patch import PatchParallelPlugin

    corrections = Corrections()
    out = torch.ones(1, 2, 3, 4)
    corrections.learn("slot", 7, out * 3, out)
    corrections.learn_detail("slot", 7, (torch.zeros(2, dtype=torch.long), torch.ones(2, 1, 2, 4)))
    assert corrections.nbytes() > 0
    torch.testing.assert_close(corrections.apply("slot", 7, out), out * 3)
    other = out[:, :1]
    assert corrections.apply("slot", 7, other) is other and corrections.applied == 1  # another shape: as it is
    remote = Remote(*(torch.zeros(0, 1, 2, 4) for _ in range(2)), torch.zeros(1, 1, 2, 4), torch.zeros(1))
    assert corrections.apply_detail("slot", 7, remote).tiles.shape[0] == 2
    assert corrections.apply("slot", 8, out) is out and corrections.apply_detail("slot", 8, remote) is remote
    assert corrections.nbytes() == 0 and corrections.generation == 8  # a new generation starts clean
    plugin = object.__new__(PatchParallelPlugin)
    plugin._state, plugin._history, plugin.corrections = {}, {}, corrections
    corrections.learn("slot", 8, out, out)
    plugin.reset()
    assert corrections.residuals == {} and corrections.details == {} and corrections.generation is None


def test_correction_and_refresh_config():
    pcpp = PatchParallelConfig(mode="pcpp")
    assert pcpp.active_correction == "detail" and pcpp.active_refresh_interval == 0
    assert (pcpp.exchange_band, pcpp.exchange_pool) == (2, 4)  # the pcpp defaults of the unset fields
    for bad, match in [({"mode": "pcpp", "correction": "exact"}, "correction = 'exact' is not allowed"),
                       ({"mode": "pcpp", "refresh_interval": -1}, "refresh_interval = -1 is out of range"),
                       ({"mode": "pcpp", "refresh_interval": 1.5}, "refresh_interval"),
                       ({"correction": "exact"}, "correction = 'exact' is not allowed")]:
        with pytest.raises(ValueError, match=match):
            PatchParallelConfig(**bad)


@pytest.mark.parametrize("field, value", [("correction", "detail"), ("correction", "residual"), ("band", 2),
                                          ("band", 0), ("pool", 4), ("pool", 0), ("refresh_interval", 3)])
def test_pcpp_only_fields_are_refused_under_distrifusion_not_ignored(field, value):
    with pytest.raises(ValueError, match=rf"{field} = {value!r}: this field only applies to mode='pcpp'.*"
                                         r"Allowed with 'distrifusion': band, pool and correction unset"):
        PatchParallelConfig(mode="distrifusion", **{field: value})
    PatchParallelConfig(mode="pcpp", **{field: value})  # the same value is fine where it means something


def test_distrifusion_accepts_the_off_values_and_names_every_ignored_field():
    plain = PatchParallelConfig()
    assert (plain.band, plain.pool, plain.correction, plain.refresh_interval) == (None, None, None, 0)
    assert (plain.exchange_band, plain.exchange_pool, plain.active_correction, plain.active_refresh_interval) == (
        None, 0, "none", 0)
    assert PatchParallelConfig(correction="none", refresh_interval=0).active_correction == "none"
    with pytest.raises(ValueError, match=r"band = 1, correction = 'residual', refresh_interval = 2: these fields "
                                         r"only apply to mode='pcpp'"):
        PatchParallelConfig(band=1, correction="residual", refresh_interval=2)
    # recipes and overrides go through the same validation: switching the pcpp recipe's mode is refused
    with pytest.raises(ValueError, match="band = 2, pool = 4, correction = 'detail'"):
        load_recipe("patch-parallel-pcpp", mode="distrifusion")
    assert load_recipe("patch-parallel", mode="pcpp").plugins[0].exchange_band == 2


def test_pcpp_detail_correction_needs_tiles():
    with pytest.raises(ValueError, match="correction = 'detail' corrects the pooled tiles, and pool = 0 makes none"):
        PatchParallelConfig(mode="pcpp", band=1, pool=0, correction="detail")
    assert PatchParallelConfig(mode="pcpp", band=1, pool=0).active_correction == "none"  # unset: nothing to correct
    assert PatchParallelConfig(mode="pcpp", band=1, pool=0, correction="residual").active_correction == "residual"
    with pytest.raises(ValueError, match="exchanges nothing"):
        PatchParallelConfig(mode="pcpp", band=0, pool=0, correction="residual")


def test_shipped_recipes_validate_and_say_what_they_mean():
    from dit_accel.parallel.correction import is_sync_step

    for name in ("patch-parallel", "patch-parallel-pcpp", "patch-parallel-pcpp-refresh"):
        config = load_recipe(name).plugins[0]
        config.validate()
        assert PatchParallelConfig(**{k: v for k, v in config.to_dict().items() if k != "type"}) == config
    pcpp = load_recipe("patch-parallel-pcpp").plugins[0]
    assert (pcpp.band, pcpp.pool, pcpp.correction) == (2, 4, "detail")
    lean = load_recipe("patch-parallel-pcpp-refresh")
    config = lean.plugins[0]
    sync = [step for step in range(20) if is_sync_step(step, config.warmup_steps, config.refresh_interval, 20,
                                                       config.refresh_growth)]
    assert sync == [0, 1, 3, 6, 10, 17] and "steps 3, 6, 10 and 17 of 20" in lean.description
    assert (config.band, config.pool, config.active_correction) == (0, 4, "detail")


@pytest.mark.slow  # ~50 s on this 2-core machine: 3 processes, a tiny Flux transformer over 4 steps 9 times
def test_two_processes_correction_and_refresh(tmp_path):
    out = tmp_path / "verdict.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               __file__, str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    for verdict in json.loads(out.read_text())["ranks"]:
        print({k: v for k, v in verdict.items() if "psnr" in k or "diff" in k})
        # keys and values (almost) constant over the steps: the corrections give back the single-process output
        frozen = verdict["frozen_max_abs_diff"]
        assert frozen["residual"] < 1e-4 and frozen["detail"] < 1e-4 and frozen["none"] > 100 * frozen["detail"]
        assert verdict["applied"]["residual"] > 0 and verdict["applied"]["detail"] > 0
        assert verdict["applied"]["none"] == 0
        psnr = verdict["psnr"]
        assert psnr["residual"] > psnr["none"] and psnr["detail"] > psnr["none"]
        # refresh_interval=2 over 4 steps, warm-up 1: step 1 sends nothing, step 2 is a full synchronous exchange
        by_step, full = verdict["refresh_bytes_by_step"], verdict["full_bytes"]
        assert by_step.get("1", 0) == 0 and by_step["2"] == full == by_step["0"] and "3" not in by_step
        assert verdict["refresh_bytes_per_step"] == full / 2


def _correction_case() -> dict:
    """Run under torchrun: the tiny transformer of tests/distributed/patch_parallel_run.py, PCPP with each
    correction, on drifting inputs, on (almost) frozen inputs, and with a refresh."""
    sys.path.insert(0, str(SCRIPT.parent))
    import patch_parallel_run as runner

    from dit_accel import accelerate_dit

    model = runner.build()

    def generate(recipe, frozen=False, **settings):
        handle = accelerate_dit(model, recipe, **settings) if recipe else None
        if handle is not None:
            handle.transformers[0].tracker.begin_generation(list(range(runner.STEPS)))
        outs = []
        with torch.no_grad():
            for step in range(runner.STEPS):
                kwargs = runner.inputs(0 if frozen else step)
                if frozen:  # a new step for the tracker, (almost) the same keys and values
                    kwargs["timestep"] = torch.tensor([1.0 - step * 2.0 ** -20])
                outs.append(model(**kwargs)[0])
        plugin = handle.transformers[0].plugins[0] if handle is not None else None
        stats = None if plugin is None else (plugin.bytes_by_step, plugin.bytes_per_step, plugin.corrections.applied)
        if handle is not None:
            handle.remove()
        return torch.cat(outs), stats

    reference, _ = generate(None)
    frozen_reference, _ = generate(None, frozen=True)
    verdict = {"psnr": {}, "frozen_max_abs_diff": {}, "applied": {}}
    for correction in ("residual", "detail", "none"):
        settings = dict(warmup_steps=1, band=1, pool=4, correction=correction)
        out, (_, _, applied) = generate("patch-parallel-pcpp", **settings)
        verdict["psnr"][correction], verdict["applied"][correction] = runner.psnr(out, reference), applied
        frozen, _ = generate("patch-parallel-pcpp", frozen=True, **settings)
        verdict["frozen_max_abs_diff"][correction] = float((frozen - frozen_reference).abs().max())
    _, (by_step, per_step, _) = generate("patch-parallel-pcpp", warmup_steps=1, band=1, pool=4, refresh_interval=2)
    _, (full_by_step, _, _) = generate("patch-parallel", warmup_steps=1)
    verdict.update(refresh_bytes_by_step=by_step, refresh_bytes_per_step=per_step, full_bytes=full_by_step[0])
    return verdict


if __name__ == "__main__":  # the 2-process case of test_two_processes_correction_and_refresh, under torchrun
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, _correction_case())
    if dist.get_rank() == 0:
        Path(sys.argv[1]).write_text(json.dumps({"ranks": gathered}))
    dist.destroy_process_group()
