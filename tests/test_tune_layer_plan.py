"""Per-layer plans of `ditaccel tune` (DiTFastAttn-style greedy): the pure greedy, the split recipes, the stage."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dit_accel import accelerate_dit, load_recipe, remove_acceleration
from dit_accel.bench.layer_plan import greedy_layer_plan, split_recipe, transformer_blocks
from dit_accel.bench.tune import Tuner
from dit_accel.bench.tune_space import Candidate, Target
from dit_accel.pipelines import zoo

BLOCKS = [f"transformer_blocks.{i}" for i in range(6)]


@pytest.fixture(scope="module")
def dit_pipe():
    return zoo.load("dit")


def test_greedy_adds_blocks_from_least_sensitive_while_the_target_holds() -> None:
    badness = {"a": 3.0, "b": 1.0, "c": None, "d": 2.0}  # c misses the target on its own
    asked: list[list[str]] = []

    def accepts(chosen: list[str]) -> bool:
        asked.append(chosen)
        return sum(badness[b] for b in chosen) <= 3.5

    chosen = greedy_layer_plan(list("abcd"), badness.get, accepts)
    assert chosen == ["b", "d"]
    # b alone was measured by the sensitivity pass; then b+d (kept), then a+b+d (rejected); c never tried.
    assert asked == [["b", "d"], ["a", "b", "d"]]


def test_greedy_stops_when_the_budget_runs_out() -> None:
    chosen = greedy_layer_plan(["x", "y", "z"], lambda b: {"x": 1.0, "y": 2.0, "z": 3.0}[b], lambda chosen: None)
    assert chosen == ["x"]


def test_block_names_of_both_zoo_models(dit_pipe) -> None:
    assert transformer_blocks(dit_pipe) == BLOCKS
    assert transformer_blocks(zoo.load("mmdit")) == ["transformer_blocks.0", "transformer_blocks.1"] + [
        f"single_transformer_blocks.{i}" for i in range(4)]


def test_split_recipe_runs_each_value_on_its_blocks(dit_pipe) -> None:
    """Two FORA instances on disjoint blocks: the FLOPs estimate is the block-weighted mix of the uniform ones,
    and the same value on both halves reproduces the uniform recipe bit for bit."""
    recipe = load_recipe("fora")

    def generate(r):
        handle = accelerate_dit(dit_pipe, r)
        try:
            images = dit_pipe(class_labels=[0, 1], num_inference_steps=12, generator=torch.Generator().manual_seed(0),
                              output_type="pt").images
            return images, handle.stats.flops_fraction
        finally:
            remove_acceleration(dit_pipe)

    plan = split_recipe(recipe, 0, "interval", 2, 4, BLOCKS[:2], BLOCKS)
    assert [(p.interval, p.layers) for p in plan.plugins] == [(4, tuple(BLOCKS[:2])), (2, tuple(BLOCKS[2:]))]
    uniform2, f2 = generate(recipe.with_overrides(interval=2))
    _, f4 = generate(recipe.with_overrides(interval=4))
    _, mixed = generate(plan)
    assert mixed == pytest.approx((2 * f4 + 4 * f2) / 6)
    same, _ = generate(split_recipe(recipe, 0, "interval", 2, 2, BLOCKS[:3], BLOCKS))
    assert torch.equal(same, uniform2)
    only_fast = split_recipe(recipe, 0, "interval", None, 3, BLOCKS[:1], BLOCKS)  # no uniform value met: rest exact
    assert [(p.interval, p.layers) for p in only_fast.plugins] == [(3, (BLOCKS[0],))]


class SyntheticTuner(Tuner):
    """The real search and plan selection, scored by a synthetic quality model instead of generations: each
    block costs ``weight * (interval - 1)`` dB, so blocks 0 and 5 are five times as sensitive as the rest."""

    WEIGHTS = dict(zip(BLOCKS, [5, 1, 1, 1, 1, 5]))

    def evaluate(self, recipe, settings, prepared=None):
        candidate = Candidate(prepared if prepared is not None else recipe.with_overrides(**settings), settings)
        penalty, fraction = 0.0, 0.0
        for plugin in candidate.recipe.plugins:
            for block in plugin.layers or BLOCKS:
                penalty += self.WEIGHTS[block] * (plugin.interval - 1)
                fraction += 1 / plugin.interval / len(BLOCKS)
        candidate.metrics, candidate.flops_fraction = {"psnr": 45.0 - penalty}, fraction
        self.candidates.append(candidate)
        return candidate


class FakeSession:
    def __init__(self, pipe) -> None:
        self.pipe = pipe

    def quality_pass(self):
        return None, {}, []


def test_layer_stage_finds_the_plan_the_uniform_search_cannot(dit_pipe) -> None:
    # Uniform: interval 2 costs 14 dB (31 dB: meets), interval 3 costs 28 dB (17 dB: misses). Per block at
    # interval 3 over a base of 2: blocks 1-4 cost 1 dB more each, blocks 0/5 five more.
    tuner = SyntheticTuner(FakeSession(dit_pipe), None, Target("psnr", ">=", 28.5), budget_s=60, log=lambda _: None)
    tuner.search(load_recipe("fora"), steps=20)
    best = tuner.best()
    assert best.settings == {"interval": 2, "fast_interval": 3,
                             "fast_blocks": "transformer_blocks.1,transformer_blocks.2"}
    assert best.metrics["psnr"] == pytest.approx(29.0)
    assert [(p.interval, p.layers) for p in best.recipe.plugins] == [
        (3, ("transformer_blocks.1", "transformer_blocks.2")),
        (2, ("transformer_blocks.0", "transformer_blocks.3", "transformer_blocks.4", "transformer_blocks.5"))]
    uniform = next(c for c in tuner.candidates if c.settings == {"interval": 2})
    assert best.flops_fraction < uniform.flops_fraction
    # The sensitive blocks were tried alone and never combined.
    tried = [c.settings.get("fast_blocks", "") for c in tuner.candidates]
    assert "transformer_blocks.0" in tried and not any("transformer_blocks.0," in t for t in tried)

    uniform_only = SyntheticTuner(FakeSession(dit_pipe), None, Target("psnr", ">=", 28.5), budget_s=60,
                                  log=lambda _: None, per_layer=False)
    uniform_only.search(load_recipe("fora"), steps=20)
    assert uniform_only.best().settings == {"interval": 2}


def test_tune_writes_a_per_layer_plan_that_loads(tmp_path: Path, dit_pipe) -> None:
    from dit_accel.recipe import Recipe

    plan = split_recipe(load_recipe("fora"), 0, "interval", 2, 3, BLOCKS[1:3], BLOCKS, name="fora-tuned")
    path = Recipe(plugins=plan.plugins, name=plan.name).save(tmp_path / "plan.toml")
    loaded = load_recipe(str(path))
    assert loaded.plugins == plan.plugins
    accelerate_dit(dit_pipe, loaded)  # installs: the two instances' blocks are disjoint
    remove_acceleration(dit_pipe)


class OrderAwareTuner(SyntheticTuner):
    """Quality also depends on TaylorSeer's order: order 2 is 15 dB better at every interval."""

    def evaluate(self, recipe, settings, prepared=None):
        candidate = Candidate(prepared if prepared is not None else recipe.with_overrides(**settings), settings)
        plugin = candidate.recipe.plugins[0]
        candidate.metrics = {"psnr": 45.0 - 14 * (plugin.interval - 1) + (15.0 if getattr(plugin, "order", 1) == 2 else 0.0)}
        candidate.flops_fraction = 1 / plugin.interval
        self.candidates.append(candidate)
        return candidate


def test_orders_are_searched_unless_the_user_fixed_them(dit_pipe) -> None:
    target = Target("psnr", ">=", 29.0)
    tuner = OrderAwareTuner(FakeSession(dit_pipe), None, target, budget_s=60, log=lambda _: None, per_layer=False)
    tuner.search(load_recipe("taylorseer"), steps=20)
    # order 1: interval 2 (31 dB) meets, 3 (17 dB) misses; order 2 reaches interval 3 (32 dB), not 4 (18 dB).
    assert {c.settings.get("order") for c in tuner.candidates} == {1, 2}
    assert tuner.best().settings == {"order": 2, "interval": 3}
    fixed = OrderAwareTuner(FakeSession(dit_pipe), None, target, budget_s=60, log=lambda _: None, per_layer=False)
    fixed.search(load_recipe("taylorseer", order=2), steps=20, fixed=frozenset({"order"}))
    assert all("order" not in c.settings and c.recipe.plugins[0].order == 2 for c in fixed.candidates)
    interval_fixed = OrderAwareTuner(FakeSession(dit_pipe), None, target, budget_s=60, log=lambda _: None)
    interval_fixed.search(load_recipe("fora", interval=5), steps=20, fixed=frozenset({"interval"}))
    assert [c.settings for c in interval_fixed.candidates] == [{}]  # nothing left to tune: measured as is


def test_the_winner_is_the_fastest_by_wall_time_with_flops_breaking_ties(dit_pipe) -> None:
    tuner = Tuner(FakeSession(dit_pipe), None, Target("psnr", ">=", 30), budget_s=60, log=lambda _: None)
    recipe = load_recipe("fora")

    def add(seconds: float, flops: float, psnr: float) -> Candidate:
        candidate = Candidate(recipe, {"tag": (seconds, flops)}, {"psnr": psnr}, flops, seconds)
        tuner.candidates.append(candidate)
        return candidate

    add(1.00, 0.50, 35.0)
    tied_fewer_flops = add(1.03, 0.40, 33.0)
    add(2.00, 0.20, 40.0)  # fewest FLOPs, but twice the wall time (a forecast's cost the estimate does not see)
    add(0.50, 0.10, 25.0)  # fastest, but misses the target
    assert tuner.best() is tied_fewer_flops


def test_every_knob_grid_is_a_valid_setting_of_its_plugin() -> None:
    """A search-space value the config refuses would only fail mid-tune; each grid is also ordered one way."""
    from dit_accel.bench.tune_space import KNOBS, SECONDARY_KNOBS
    from dit_accel.plugins import BUILTIN_PLUGIN_MODULES  # noqa: F401  (registers every config)
    from dit_accel.recipe import config_types

    types = config_types()
    for table in (KNOBS, SECONDARY_KNOBS):
        for type_name, (field_name, grid) in table.items():
            config = types[type_name]
            for value in grid:
                config(**{field_name: value}).validate()
            assert len(set(grid)) == len(grid), type_name
