"""Plugins under sequence parallelism (``dit_accel.core.parallel``) and ``--parallel`` on the command line.

Fast tests check the pure parts on one process: shard layouts, the whole-stream choice ToCa makes, statistics summed
over shards, Ulysses' token order around an attention plugin, refusals, and the CLI's parsing and relaunch. The slow
test runs tests/distributed/plugins_context_parallel.py on two gloo processes: every plugin, every setting.
"""

from __future__ import annotations

import collections
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from dit_accel.attention.hilbert import HilbertConfig, HilbertPlugin
from dit_accel.caching.speca import ratio_of_parts, relative_l1, relative_l1_parts
from dit_accel.caching.taylorseer import forecast_gain
from dit_accel.caching.toca import spread_top_k
from dit_accel.cli import parallel as par
from dit_accel.cli.app import app
from dit_accel.core import parallel as cp
from dit_accel.core.attention import AttentionCall, KeyPaddingReader, LayerId
from dit_accel.core.blocks import TokenGrid, TokenLayout
from dit_accel.core.parallel import (ParallelSetting, first_occurrence, local_choice, replica_weights,
                                     shard_positions)

runner = CliRunner()
ULYSSES = ParallelSetting("ulysses", world=2, rank=0, text_sharded=True)


def shards(whole: torch.Tensor, world: int, text: int, image: int, text_first: bool, sharded: bool = True):
    """Each rank's local stream of a whole (B, S, ...) stream, as diffusers' plan splits it, with its layout."""
    length = (text // world if sharded else text) + image // world
    out = []
    for rank in range(world):
        layout = shard_positions(length, world, rank, text, image, text_first, sharded)
        out.append((whole[:, layout.positions], layout))
    return out


# ------------------------------------------------------------------------------------------------- layouts
def test_shard_positions_cover_every_layout():
    first = [shard_positions(36, 2, r, 8, 64, True, True) for r in range(2)]
    assert first[0].positions.tolist() == [0, 1, 2, 3] + list(range(8, 40))
    assert first[1].positions.tolist() == [4, 5, 6, 7] + list(range(40, 72))
    assert first[1].image_slice == slice(4, 36) and first[1].total == 72 and not first[1].replicated
    last = shard_positions(36, 2, 1, 8, 64, False, True)
    assert last.positions.tolist() == list(range(32, 64)) + [68, 69, 70, 71] and last.image_slice == slice(0, 32)
    patch = shard_positions(40, 2, 1, 8, 64, True, False)  # patch-parallel: every rank keeps all text
    assert patch.positions.tolist() == list(range(8)) + list(range(40, 72)) and patch.replicated
    image = shard_positions(32, 2, 1, 8, 64, True, True)
    assert image.positions.tolist() == list(range(32, 64)) and image.total == 64 and image.text == 0
    text = shard_positions(4, 2, 1, 8, 64, True, True)
    assert text.positions.tolist() == [4, 5, 6, 7] and text.image == 0
    whole = shard_positions(72, 2, 1, 8, 64, True, True)  # a stream nobody split
    assert whole.positions.tolist() == list(range(72)) and whole.image_slice == slice(8, 72)
    assert shard_positions(35, 2, 0, 8, 64, True, True) is None  # no even split gives 35 tokens
    with pytest.raises(ValueError, match="rank 2 is outside a world of 2"):
        shard_positions(36, 2, 2, 8, 64, True, True)


def test_first_occurrence_rebuilds_the_model_order():
    for sharded, length in ((True, 36), (False, 40)):
        positions = torch.cat([shard_positions(length, 2, r, 8, 64, True, sharded).positions for r in range(2)])
        index = first_occurrence(positions, 72)
        assert positions[index].tolist() == list(range(72))
        assert sharded or (index[:8] < length).all()  # replicated text is read from rank 0
    assert first_occurrence(torch.tensor([0, 2, 3]), 4) is None  # position 1 is nobody's


def test_local_choice_pads_rows_with_fewer_picks_here():
    mine = shard_positions(36, 2, 0, 8, 64, True, True).positions
    index, valid = local_choice(torch.tensor([[0, 5, 40], [70, 1, 2], [60, 61, 62]]), mine, 72)
    assert index.tolist() == [[0, 0], [1, 2], [0, 0]] and valid.tolist() == [[True, False], [True, True],
                                                                              [False, False]]


def test_whole_stream_choice_is_the_single_process_choice(monkeypatch):
    """ToCa's path: gathered scores in model order, the top-k of one process, each rank's share of it."""
    grid, text, world = TokenGrid(1, 8, 8), 8, 2
    scores = torch.rand(3, text + grid.num_tokens, generator=torch.Generator().manual_seed(0))
    expected = spread_top_k(scores, 18, grid, text, 2)
    locals_ = shards(scores, world, text, grid.num_tokens, True)
    gathered = torch.cat([local for local, _ in locals_], dim=1)
    monkeypatch.setattr(cp, "all_gather_tokens", lambda tensor, setting, dim=1: gathered)
    union = [set() for _ in range(scores.shape[0])]
    for rank, (local, _) in enumerate(locals_):
        setting = ParallelSetting("ulysses", world, rank, text_sharded=True)
        whole, layout = cp.whole_stream(local, setting, text, grid.num_tokens, True)
        torch.testing.assert_close(whole, scores, atol=0, rtol=0)
        index, valid = local_choice(spread_top_k(whole, 18, grid, text, 2), layout.positions, layout.total)
        for row in range(scores.shape[0]):
            union[row] |= {int(layout.positions[i]) for i, ok in zip(index[row], valid[row]) if ok}
    assert union == [set(row.tolist()) for row in expected]


# ------------------------------------------------------------------------------------- statistics over shards
def test_forecast_gain_summed_over_shards_is_the_whole_gain():
    g = torch.Generator().manual_seed(1)
    value, d0, d1, d2 = (torch.randn(2, 12, 5, generator=g) for _ in range(4))
    for state in (([1.0, 0.5], [d0, d1]), ([1.0, 0.5, 0.2], [d0, d1, d2])):
        whole = forecast_gain(state, value, 1.5)
        parts = []
        halves = [slice(0, 7), slice(7, 12)]  # uneven on purpose: only sums matter

        def capture(both):
            parts.append(both.clone())
            return both

        for half in halves:
            forecast_gain((state[0], [d[:, half] for d in state[1]]), value[:, half], 1.5, capture)
        total = parts[0] + parts[1]
        summed = forecast_gain((state[0], [d[:, halves[0]] for d in state[1]]), value[:, halves[0]], 1.5,
                               lambda both: total)
        torch.testing.assert_close(summed, whole, atol=1e-6, rtol=1e-5)


def test_replica_weights_count_every_token_once_over_the_ranks():
    whole = torch.randn(72, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for length, sharded in ((40, False), (36, True), (72, True), (32, True)):  # patch, ulysses, unsplit, image only
        for text_first in (True, False):
            layouts = [shard_positions(length, 2, r, 8, 64, text_first, sharded) for r in range(2)]
            weights = [replica_weights(layout, 2) for layout in layouts]
            total = sum(float((whole[layout.positions] * (1 if w is None else w)).sum())
                        for layout, w in zip(layouts, weights))
            assert total == pytest.approx(float(whole[:layouts[0].total].sum()), abs=1e-12), (length, text_first)
            assert (weights[0] is None) == (not layouts[0].replicated)
    patch = replica_weights(shard_positions(40, 2, 1, 8, 64, False, False), 2)  # [image shard, all the text]
    assert patch.tolist() == [1.0] * 32 + [0.5] * 8
    assert replica_weights(None, 2) is None


def test_forecast_gain_over_shards_with_replicated_text_is_the_whole_gain():
    """patch-parallel on Flux's single blocks: each rank holds [all the text, its image shard]."""
    g = torch.Generator().manual_seed(3)
    value, d0, d1, d2 = (torch.randn(2, 72, 5, generator=g) for _ in range(4))
    for state in (([1.0, 0.5], [d0, d1]), ([1.0, 0.5, 0.2], [d0, d1, d2])):
        whole = forecast_gain(state, value, 1.5)
        layouts = [shard_positions(40, 2, r, 8, 64, True, False) for r in range(2)]

        def local(layout, reduce, weighted=True):
            return forecast_gain((state[0], [d[:, layout.positions] for d in state[1]]), value[:, layout.positions],
                                 1.5, reduce, replica_weights(layout, 2) if weighted else None)

        for weighted in (True, False):
            parts = []
            for layout in layouts:
                local(layout, lambda both: parts.append(both.clone()) or both, weighted)
            summed = local(layouts[0], lambda both: parts[0] + parts[1], weighted)
            if weighted:
                torch.testing.assert_close(summed, whole, atol=1e-6, rtol=1e-5)
            else:  # the text counted twice: a different gain, which is what the weights are for
                assert not torch.allclose(summed, whole, atol=1e-4)


def test_relative_l1_parts_add_up_over_shards():
    g = torch.Generator().manual_seed(2)
    forecast, actual = torch.randn(3, 10, 4, generator=g), torch.randn(3, 10, 4, generator=g)
    parts = relative_l1_parts(forecast[:, :6], actual[:, :6]) + relative_l1_parts(forecast[:, 6:], actual[:, 6:])
    torch.testing.assert_close(ratio_of_parts(parts), relative_l1(forecast, actual), atol=1e-6, rtol=1e-5)
    zero = relative_l1_parts(torch.ones(1, 4), torch.zeros(1, 4))
    assert ratio_of_parts(zero).item() == pytest.approx(1.0)  # mean error where the scale vanishes


# ----------------------------------------------------------------------------------------- attention
def _hilbert_call(layout: TokenLayout, **options):
    plugin = HilbertPlugin.__new__(HilbertPlugin)
    plugin.config, plugin.target = HilbertConfig(tile_size=8, neighbours=0, pool_size=8), None
    plugin.depth = {"blocks.0.attn": 0}
    plugin._orders, plugin._tilings, plugin.fallbacks, plugin._warned = {}, {}, collections.Counter(), set()
    plugin.key_padding = KeyPaddingReader()
    opts = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False, **options}
    return plugin, AttentionCall(LayerId("blocks", 0, "attn", layout.kind), layout, None, 0, opts)


@pytest.mark.parametrize("text_position", ["first", "last"])
def test_ulysses_attention_runs_the_plugin_in_model_order(text_position):
    grid, text = TokenGrid(1, 8, 8), 6
    layout = TokenLayout("joint", grid, num_text_tokens=text, text_position=text_position)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 1, text + 64, 16, generator=g) for _ in range(3))
    keep = torch.ones(2, text + 64, dtype=torch.bool)
    keep[1, (2 if text_position == "first" else 66)] = False  # a padded text key of sample 1
    mask = keep[:, None, None, :]
    plugin, call = _hilbert_call(layout, attn_mask=mask)
    expected = plugin._attend(q, k, v, call)
    positions = torch.cat([shard_positions(35, 2, r, text, 64, text_position == "first", True).positions
                           for r in range(2)])  # the Ulysses order: [text 0, image 0, text 1, image 1]
    _, ulysses_call = _hilbert_call(layout, attn_mask=mask[..., positions])
    out = cp.ulysses_attention("hilbert", ULYSSES, plugin._attend, q[:, :, positions], k[:, :, positions],
                               v[:, :, positions], ulysses_call)
    torch.testing.assert_close(out, expected[:, :, positions], atol=1e-6, rtol=1e-6)
    assert (expected - F.scaled_dot_product_attention(q, k, v, attn_mask=mask)).abs().max() > 1e-3  # sparse


def test_refusals_name_the_setting():
    assert cp.attention_refusal("gna", ULYSSES) is None
    ring = cp.attention_refusal("gna", ParallelSetting("ring", 2, 0))
    assert isinstance(ring, ValueError) and "--parallel ring=2" in str(ring) and "allowed: ulysses=N" in str(ring)
    assert cp.attention_refusal("psa", ParallelSetting("patch", 4, 1)) is None  # patch-parallel refuses it itself
    assert "uneven" in str(cp.attention_refusal("svg2", ParallelSetting("ulysses", 2, 0, even=False)))
    layout = TokenLayout("joint", TokenGrid(1, 8, 8), num_text_tokens=5, text_position="first")
    q = torch.randn(1, 1, 69, 8)
    plugin, call = _hilbert_call(layout)
    with pytest.raises(ValueError, match="not 5 text and 64 image tokens split evenly over 2 ranks"):
        cp.ulysses_attention("hilbert", ULYSSES, plugin._attend, q, q, q, call)


def test_no_setting_without_parallelism():
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                   pooled_projection_dim=16, axes_dims_rope=[2, 2, 4])
    assert cp.parallel_setting(model) is None
    assert cp.all_reduce_sum(torch.ones(2), None).tolist() == [1.0, 1.0]


# ------------------------------------------------------------------------------------------------ the CLI
def test_parse_parallel_values():
    assert par.parse_parallel("ulysses=2") == par.Parallel("ulysses", 2)
    assert str(par.parse_parallel(" Ring = 4 ")) == "ring=4"
    for bad, message in (("tensor=2", "not a parallel setting"), ("ulysses", "not a parallel setting"),
                         ("patch=two", "not a number of processes"), ("ring=1", "split nothing")):
        with pytest.raises(ValueError, match=message):
            par.parse_parallel(bad)
    with pytest.raises(ValueError, match="cannot be combined"):
        par.check_combination(par.Parallel("ulysses", 2), 2)
    par.check_combination(par.Parallel("ulysses", 2), 1)


def test_relaunch_command_keeps_parallel_and_drops_processes():
    command = par.relaunch_command(2, ["bench", "--processes", "3", "--parallel", "ulysses=2", "--processes=4",
                                       "-o", "out"])
    assert command[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert command[5:] == ["-m", "dit_accel.cli.app", "bench", "--parallel", "ulysses=2", "-o", "out"]


def test_patch_composes_into_every_recipe():
    setting = par.Parallel("patch", 2)
    assert par.patch_items(["none", "fora@interval=4", "fbcache+taylorseer"], setting) == [
        "none+patch-parallel", "fora+patch-parallel@interval=4", "fbcache+taylorseer+patch-parallel"]
    with pytest.raises(ValueError, match="recipe file 'mine.toml'"):
        par.patch_items(["mine.toml"], setting)
    import dit_accel

    recipe = par.with_patch(dit_accel.load_recipe("fora"), setting)
    assert [p.type_name for p in recipe.plugins] == ["fora", "patch-parallel"]
    with pytest.raises(ValueError, match="already holds patch-parallel"):
        par.with_patch(recipe, setting)


def test_models_that_cannot_split_are_refused(monkeypatch):
    from dit_accel.pipelines import tiny

    dit = tiny.build("dit").transformer
    with pytest.raises(ValueError, match="DiTTransformer2DModel has no diffusers context-parallel plan.*use "
                                         "--parallel patch=2 "):
        par.enable_context_parallel(dit, par.Parallel("ulysses", 2), torch.device("cpu"))
    hunyuan = tiny.build("hunyuan-video").transformer  # patch-parallel cannot split it either: not suggested
    with pytest.raises(ValueError, match=r"has no diffusers context-parallel plan \(_cp_plan\), so its sequence "
                                         r"cannot be split; models with one: .*\.\.\.\); run it without"):
        par.enable_context_parallel(hunyuan, par.Parallel("ulysses", 2), torch.device("cpu"))
    flux = tiny.build("flux").transformer
    with pytest.raises(ValueError, match="ring attention merges key chunks by their log-sum-exp.*ulysses=2"):
        par.enable_context_parallel(flux, par.Parallel("ring", 2), torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="needs 2 processes but this launch has 3"):
        par.init_workers(par.Parallel("patch", 2), torch.device("cpu"))


def test_cli_parallel_errors_and_relaunch(monkeypatch, tmp_path):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    calls = []
    monkeypatch.setattr(par, "relaunch", lambda processes, argv, drop=("--processes",): calls.append(
        (processes, argv)) or 0)
    monkeypatch.setattr(sys, "argv", ["ditaccel", "generate", "--parallel", "ulysses=2"])
    out = tmp_path / "x.png"
    result = runner.invoke(app, ["generate", "--model", "tiny:flux", "--parallel", "ulysses=2", "-o", str(out)])
    assert result.exit_code == 0 and calls == [(2, ["generate", "--parallel", "ulysses=2"])], result.output
    result = runner.invoke(app, ["generate", "--parallel", "mpi=2", "-o", str(out)])
    assert result.exit_code == 2 and "not a parallel setting" in result.output
    bench = ["bench", "--model", "tiny:flux", "-o", str(tmp_path / "b")]
    result = runner.invoke(app, [*bench, "--parallel", "ulysses=2", "--processes", "2"])
    assert result.exit_code == 2 and "cannot be combined" in result.output
    result = runner.invoke(app, [*bench, "--parallel", "ring=2", "--baselines", "diffusers:fbcache"])
    assert result.exit_code == 2 and "cannot measure --baselines" in result.output
    result = runner.invoke(app, [*bench, "--parallel", "patch=2", "--recipes", "fbcache@warmup_steps=3"])
    assert result.exit_code == 2 and "ambiguous" in result.output  # fbcache's and patch-parallel's warmup_steps
    result = runner.invoke(app, [*bench, "--parallel", "patch=2", "--recipes", "none,fora"])
    assert result.exit_code == 0 and calls[-1][0] == 2, result.output


# ------------------------------------------------------------------------------- bench rows record the setting
ROOT = Path(__file__).resolve().parent.parent


def _bench_config(**fields):
    from dit_accel.bench.harness import BenchConfig

    return BenchConfig(**{"model": "zoo:dit", "recipes": ["none", "fora"], "num_samples": 2, "batch": 2, **fields})


def test_bench_keys_name_the_parallel_setting_and_single_process_keys_are_unchanged():
    from dit_accel.bench.harness import plan

    # committed rows (written before the setting was recorded) still resume: their dense keys are reproduced
    for model in ("dit", "mmdit", "flowdit"):
        rows = [json.loads(line) for line in (ROOT / "benchmarks" / "results" / f"bench-zoo-{model}" /
                                              "rows.jsonl").read_text().splitlines() if line.strip()]
        dense = next(row for row in rows if row["kind"] == "dense")
        assert "parallel" not in dense["env"]
        for parallel in ("auto", None):
            config = _bench_config(model=dense["model"], recipes=[], num_samples=dense["num_samples"],
                                   seed=dense["seed"], batch=dense["batch"], parallel=parallel)
            assert plan(config, dense["steps"])[0].key == dense["key"]
    single = [entry.key for entry in plan(_bench_config(parallel=None), 2)]
    patch2 = [entry.key for entry in plan(_bench_config(parallel={"kind": "patch", "degree": 2}), 2)]
    others = [[entry.key for entry in plan(_bench_config(parallel=setting), 2)]
              for setting in ({"kind": "patch", "degree": 4}, {"kind": "ulysses", "degree": 2})]
    assert all("|parallel=patch=2|" in key for key in patch2) and not any("parallel" in key for key in single)
    keys = [*single, *patch2, *others[0], *others[1]]
    assert len(set(keys)) == len(keys) == 12  # no row of one setting is served for another
    for bad in ({"kind": "mpi", "degree": 2}, {"kind": "patch", "degree": 1}, {"kind": "patch"}, "patch=2",
                {"kind": "ring", "degree": True}):
        with pytest.raises(ValueError, match="is not a parallel setting; allowed: None"):
            plan(_bench_config(parallel=bad), 2)


def test_parallel_setting_is_read_from_the_pipeline_and_the_recipes(monkeypatch):
    from types import SimpleNamespace

    import torch.distributed as dist
    from diffusers import ContextParallelConfig
    from diffusers.models._modeling_parallel import ParallelConfig

    import dit_accel
    from dit_accel.bench.distributed import parallel_setting

    recipes = [dit_accel.load_recipe("none"), dit_accel.load_recipe("fora+patch-parallel")]
    pipe = SimpleNamespace(transformer=SimpleNamespace(_parallel_config=None))
    assert parallel_setting(pipe, recipes) is None  # patch-parallel without torch.distributed: one process
    for degrees, expected in [({"ulysses_degree": 2}, {"kind": "ulysses", "degree": 2}),
                              ({"ring_degree": 4}, {"kind": "ring", "degree": 4}),
                              ({"ulysses_degree": 2, "ring_degree": 2}, {"kind": "ulysses+ring", "degree": 4})]:
        pipe.transformer._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(**degrees))
        assert parallel_setting(pipe, recipes[:1]) == expected
    pipe.transformer._parallel_config = None
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 3)
    assert parallel_setting(pipe, recipes) == {"kind": "patch", "degree": 3}
    assert parallel_setting(pipe, recipes[:1]) is None  # a data-parallel launch: each generation in one process


def _row(config: str, env: dict) -> dict:
    return {"model": "zoo:dit", "steps": 2, "num_samples": 2, "seed": 0, "batch": 2, "config": config,
            "kind": "dense" if config == "dense" else "dit_accel", "wall_speedup": 1.0, "psnr": 30.0, "env": env}


def test_results_markdown_shows_the_parallel_setting_only_when_split():
    from dit_accel.bench import report

    rows = [_row("dense", {"device": "cpu"}),  # written before the setting was recorded
            _row("fora", {"device": "cpu", "parallel": None}),
            _row("fora+patch-parallel", {"device": "cpu", "parallel": {"kind": "patch", "degree": 2}})]
    assert [report.parallel_of(row) for row in rows] == [None, None, {"kind": "patch", "degree": 2}]
    markdown = report.markdown(rows)
    assert markdown.count("- device: cpu\n") == 1 and "- device: cpu, parallel: patch=2" in markdown
    assert "## zoo:dit: 2 steps, 2 samples (seed 0, batch 2)\n" in markdown
    assert "(seed 0, batch 2), each generation split over processes: --parallel patch=2" in markdown
    assert "parallel: None" not in markdown and markdown.count("## zoo:dit") == 2
    assert report.markdown(rows[:1]) == report.markdown([{**rows[0], "env": {"device": "cpu", "parallel": None}}])


def test_bench_resume_never_serves_rows_across_parallel_settings(tmp_path):
    from pipelines_for_tests import zoo_weights_present

    if not zoo_weights_present("zoo:dit"):
        pytest.skip("zoo weights not exported")
    from dit_accel.bench import report
    from dit_accel.bench.harness import plan, run_bench
    from dit_accel.cli.app import load_model

    single = _bench_config(recipes=["none"], steps=2, num_samples=1, batch=1, repeats=1, out_dir=tmp_path,
                           resume=True)
    # single-process rows as an earlier dit_accel wrote them: no parallel field in env
    old = [{**_row(entry.label, {"device": "cpu", "processes": 1}), "key": entry.key, "num_samples": 1, "batch": 1,
            "psnr": float("inf")} for entry in plan(single, 2)]
    report.write_rows(tmp_path / report.ROWS_FILE, old)
    pipe, family = load_model("zoo:dit")
    split = {"kind": "ulysses", "degree": 2}  # as if the launcher had split the model (one process here)
    rows = run_bench(_bench_config(**{**single.__dict__, "parallel": split}), progress=False, pipe=pipe,
                     family=family)
    assert [row["env"]["parallel"] for row in rows] == [split, split] and "timestamp" in rows[0]
    assert all("|parallel=ulysses=2|" in row["key"] for row in rows)
    assert report.load_rows(tmp_path / report.ROWS_FILE)[:2] == old  # kept
    served = run_bench(single, progress=False, pipe=pipe, family=family)  # "auto": this pipeline is not split
    assert served == old
    assert "--parallel ulysses=2" in (tmp_path / report.RESULTS_FILE).read_text()


@pytest.mark.slow  # about 35 s: two processes (torchrun) that each import torch and build tiny:flux
def test_bench_with_patch_parallel_records_the_setting_in_every_row(tmp_path):
    from dit_accel.bench import report

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    out = tmp_path / "bench"
    result = subprocess.run([sys.executable, "-m", "dit_accel.cli.app", "bench", "--model", "tiny:flux", "--recipes",
                             "none", "--steps", "2", "--num-samples", "1", "--batch", "1", "--repeats", "1",
                             "--parallel", "patch=2", "--quiet", "-o", str(out)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = report.load_rows(out / report.ROWS_FILE)
    assert [row["config"] for row in rows] == ["dense", "none+patch-parallel"]
    for row in rows:
        assert row["env"]["parallel"] == {"kind": "patch", "degree": 2}, row["env"]
        assert "|parallel=patch=2|" in row["key"]
    assert "--parallel patch=2" in (out / report.RESULTS_FILE).read_text()


# ------------------------------------------------------------------------------------------ two processes
SCRIPT = Path(__file__).parent / "distributed" / "plugins_context_parallel.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # about 55 s on a quiet 2-core machine: 2 processes, 11 caching plugins x 3 settings, 7 attention
def test_every_plugin_decides_alike_on_every_rank(tmp_path):
    out = tmp_path / "verdict.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    for _ in range(2):  # the gloo rendezvous occasionally aborts before any model code runs: one retry
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                 f"--master_port={_free_port()}", str(SCRIPT), str(out)],
                                env=env, capture_output=True, text=True, timeout=600)
        if result.returncode == 0:
            break
    assert result.returncode == 0, "\n".join(
        line for line in result.stderr.splitlines() if line.strip() and not re.match(r"[EWIV]\d{4} ", line))[-4000:]
    verdict = json.loads(out.read_text())
    for section in ("ulysses", "ring", "patch"):
        for name, row in verdict[section].items():
            where = f"{name} under {section}"
            assert row["ranks_agree"], f"{where}: the ranks decided differently"
            assert row["same_as_single"], f"{where}: decisions differ from one process's"
            assert row["acted"], f"{where}: the plugin did nothing (the test's settings must let it act)"
            if name != "clusca":  # clusters of each rank's shard, by design (see clusca's docstring)
                assert row["max_abs_diff"] < 1e-5, f"{where}: output differs from one process's"
    assert "cfg-share" in verdict["ulysses"] and len(verdict["ulysses"]) == 11
    for name, row in verdict["attention"].items():  # densities differ by rank (heads); the output may not
        assert row["same_as_single"] and row["acted"] and row["max_abs_diff"] < 1e-5, name
    refused = verdict["refusals"]
    for case, error in refused.items():
        assert error, f"{case} was not refused"
        name, setting = case.split("@")
        if setting == "patch":  # patch-parallel's own refusal, naming its companions
            assert f"cannot run with {name}" in error, error
        else:
            assert f"--parallel {setting}=2" in error, error
    assert "attention_ratio" in refused["toca-attention@ulysses"]


@pytest.mark.slow  # about 30 s: torchrun starts two processes that each import torch and build the pipeline
def test_generate_with_ulysses_equals_one_process(tmp_path):
    import numpy as np
    from PIL import Image

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    common = [sys.executable, "-m", "dit_accel.cli.app", "generate", "--model", "tiny:flux", "--recipe", "fbcache",
              "--steps", "3", "--quiet", "--no-summary"]
    split = subprocess.run([*common, "--parallel", "ulysses=2", "-o", str(tmp_path / "split.png")], env=env,
                           capture_output=True, text=True, timeout=600)
    assert split.returncode == 0, split.stderr[-3000:]
    assert "--parallel ulysses=2: 2 processes" in split.stdout and split.stdout.count("saved ") == 1
    single = subprocess.run([*common, "-o", str(tmp_path / "single.png")], env=env, capture_output=True, text=True,
                            timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = (np.asarray(Image.open(tmp_path / name), dtype=np.int16) for name in ("split.png", "single.png"))
    assert np.abs(a - b).max() <= 1


def test_caches_on_a_first_block_split_match_one_process(tmp_path):
    """Wan's plan splits its first block's input: before dit_accel kept that split outside its own block hooks, every
    block-level cache crashed there under Ulysses and patch-parallel (a whole input against a sharded output)."""
    out = tmp_path / "verdict.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    for _ in range(2):  # the gloo rendezvous occasionally aborts before any model code runs: one retry
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                 f"--master_port={_free_port()}", str(SCRIPT), str(out), "first_block_split"],
                                env=env, capture_output=True, text=True, timeout=300)
        if result.returncode == 0:
            break
    assert result.returncode == 0, "\n".join(
        line for line in result.stderr.splitlines() if line.strip() and not re.match(r"[EWIV]\d{4} ", line))[-4000:]
    verdict = json.loads(out.read_text())["first_block_split"]
    assert set(verdict) == {f"{c}@{k}" for c in ("fbcache", "fora", "magcache") for k in ("ulysses", "patch")}
    for where, row in verdict.items():
        assert row["acted"], f"{where}: the cache must skip or reuse something"
        assert row["max_abs_diff"] < 1e-5, f"{where}: output differs from one process's"


def test_a_blocks_sequence_split_stays_outside_dit_accels_hooks():
    from diffusers.hooks import ModelHook
    from diffusers.hooks.context_parallel import ContextParallelSplitHook
    from diffusers.models._modeling_parallel import ContextParallelInput

    from dit_accel.core.hooks import attach, detach

    seen = []

    class Seen(ModelHook):  # a new_forward hook, as dit_accel's block-range hook is
        def new_forward(self, module, x):
            seen.append(x.shape[1])
            return self.fn_ref.original_forward(x)

    class Halve(ContextParallelSplitHook):  # stands in for the sharder: this rank's half of the sequence
        def _prepare_cp_input(self, x, cp_input):
            return x[:, : x.shape[1] // 2]

    block = torch.nn.Linear(4, 4)
    attach(block, Halve({"input": ContextParallelInput(split_dim=1, expected_dims=3)}, None), "split")
    attach(block, Seen(), "seen")  # registered after the split: still inside it
    assert block._diffusers_hook._hook_order == ["seen", "split"]
    assert block(torch.randn(1, 8, 4)).shape == (1, 4, 4) and seen == [4]
    detach(block, "seen")  # the inner hook first, then the split: nothing of either is left
    assert block(torch.randn(1, 8, 4)).shape == (1, 4, 4) and seen == [4]
    detach(block, "split")
    assert "forward" not in vars(block) and "_diffusers_hook" not in vars(block)
