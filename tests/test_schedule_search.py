"""The searched computed-step schedule: the local search on exact scores, the calibration's ``schedules``, magcache
following a searched schedule (and the rule where none fits), and the search on a pipeline and through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import pipelines_for_tests as pipes
from dit_accel import accelerate_dit, load_recipe, remove_acceleration
from dit_accel.bench.metrics import psnr
from dit_accel.bench.schedule_calibration import rule_schedule, search_magcache_schedule
from dit_accel.caching.calibration import load_calibration, save_calibration, validate_calibration
from dit_accel.caching.magcache import MagCacheConfig, MagCachePlugin, computed_steps, skip_schedule
from dit_accel.caching.schedule_search import check_schedule, neighbours, search_schedule

STEPS = 8
FLAT = [1.0] * STEPS


def test_neighbours_move_one_step_and_never_onto_zero_the_end_or_another_step():
    assert neighbours((0, 2, 5), 1, (-2, -1, 1, 2), 8) == [(0, 1, 5), (0, 3, 5), (0, 4, 5)]
    assert neighbours((0, 1, 7), 2, (-1, 1, 2), 8) == [(0, 1, 6)]


def test_search_finds_the_optimum_of_a_separable_score_and_scores_each_schedule_once():
    target = (0, 3, 4, 9, 15)
    calls = []

    def score(schedule):
        calls.append(schedule)
        return -float(sum(abs(a - b) for a, b in zip(schedule, target)))

    found = search_schedule(score, (0, 1, 2, 3, 4), 20, sweeps=10, min_gain=0.5)
    assert found.schedule == target and found.score == 0.0
    assert found.start == (0, 1, 2, 3, 4) and found.start_score == -(2 + 2 + 6 + 11)
    assert len(calls) == len(set(calls)) == len(found.evaluations)
    assert all(s[0] == 0 and len(s) == 5 for s in calls)


def test_search_keeps_only_gains_of_at_least_min_gain_and_stops_after_a_sweep_without_one():
    found = search_schedule(lambda s: 0.01 * s[1], (0, 1), 10, min_gain=0.05)
    assert found.schedule == (0, 1) and len(found.evaluations) == 3  # start, then +1 and +2 gain too little
    found = search_schedule(lambda s: float(s[1]), (0, 1), 10, sweeps=2, moves=(1,))
    assert found.schedule == (0, 3) and found.score == 3.0


def test_bad_searches_and_schedules_are_refused():
    for bad in ((1, 2), (0, 2, 2), (0, 3, 1), (0, 9)):
        with pytest.raises(ValueError, match="distinct steps in increasing order, the first 0, each below 8"):
            check_schedule(bad, 8)
    with pytest.raises(ValueError, match="moves"):
        search_schedule(lambda s: 0.0, (0, 1), 8, moves=(0,))
    with pytest.raises(ValueError, match="sweeps"):
        search_schedule(lambda s: 0.0, (0, 1), 8, sweeps=0)


def test_calibration_schedules_are_validated_and_round_trip(tmp_path):
    table = {"model": "", "steps": STEPS, "curves": {"cond": FLAT}, "schedules": {"3": [0, 2, 6]}}
    path = save_calibration(table, tmp_path / "c.json")
    assert load_calibration(path)["schedules"] == {"3": (0, 2, 6)}
    assert json.loads(path.read_text())["schedules"] == {"3": [0, 2, 6]}
    assert "schedules" not in validate_calibration({"steps": STEPS, "curves": {"cond": FLAT}})
    for bad in ({"3": [0, 2]}, {"2": [1, 2]}, {"2": [0, 8]}, {"x": [0]}, [0, 2]):
        with pytest.raises(ValueError, match="schedules"):
            validate_calibration(dict(table, schedules=bad))


def test_computed_steps_is_the_union_of_the_rule_over_curves():
    a, b = [1.0, 1.0, 1.5, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 2.0, 1.0]
    rule = dict(threshold=0.3, max_skips=5, retention=0.0, last_steps=1)
    each = [{i for i, skip in enumerate(skip_schedule(c, **rule)) if not skip} for c in (a, b)]
    assert computed_steps([a, b], **rule) == tuple(sorted(each[0] | each[1]))
    assert computed_steps([a], **rule) == (0, 2, 5)


def generate(pipe, steps=STEPS, seed=0):
    with torch.no_grad():
        return pipes.output_of("dit", pipe(**pipes.call_kwargs("dit", steps=steps, seed=seed)))


def computed(handle) -> list[int]:
    plugin = next(p for p in handle.transformers[0].plugins if isinstance(p, MagCachePlugin))
    skipped = {d[0] for d in plugin.last_decisions if d[3]}
    return [step for step in range(STEPS) if step not in skipped]


def test_magcache_follows_a_searched_schedule_of_the_rules_count_and_the_rule_otherwise():
    pipe = pipes.build("dit")
    rule = dict(threshold=100.0, max_skips=2, retention=0.0, last_steps=1)
    start = computed_steps([FLAT], **rule)
    assert start == (0, 3, 6, 7)
    table = {"model": "", "steps": STEPS, "curves": {"cond": FLAT, "uncond": FLAT}}
    searched = dict(table, schedules={"4": [0, 1, 2, 5]})
    for schedule, ratios, steps, expected in (("auto", searched, STEPS, [0, 1, 2, 5]),
                                              ("rule", searched, STEPS, list(start)),
                                              ("auto", dict(table, schedules={"5": [0, 1, 2, 3, 5]}), STEPS,
                                               list(start)),
                                              ("auto", table, STEPS, list(start))):
        handle = accelerate_dit(pipe, "magcache", ratios=ratios, schedule=schedule, **rule)
        generate(pipe, steps)
        assert computed(handle) == expected, (schedule, ratios.get("schedules"))
        remove_acceleration(pipe)
    # Another step count than the calibration's: the rule on the resampled curve.
    handle = accelerate_dit(pipe, "magcache", ratios=searched, **rule)
    with pytest.warns(UserWarning, match="resampled and the rule decides"):
        generate(pipe, 10)
    plugin = next(p for p in handle.transformers[0].plugins if isinstance(p, MagCachePlugin))
    assert [d[0] for d in plugin.last_decisions if not d[3]] == [3, 6] and not plugin.schedules.get(10)
    remove_acceleration(pipe)
    with pytest.raises(ValueError, match="schedule = 'searched' is not allowed; allowed: 'auto', 'rule'"):
        MagCacheConfig(schedule="searched")


def test_the_search_on_a_pipeline_scores_the_rule_exactly_and_stores_what_it_found():
    pipe = pipes.build("dit")
    recipe = load_recipe("magcache", threshold=100.0, max_skips=2, retention=0.0, last_steps=1)
    table = {"model": "", "steps": STEPS, "curves": {"cond": FLAT, "uncond": FLAT}}
    dense = generate(pipe)
    accelerate_dit(pipe, recipe.with_overrides(ratios=table))
    by_rule = generate(pipe)
    remove_acceleration(pipe)
    calls = [lambda: pipes.call_kwargs("dit", steps=STEPS, seed=0)]
    with torch.no_grad():
        result, done = search_magcache_schedule(pipe, recipe, table, calls, sweeps=1, moves=(-1, 1))
    found = done.search
    assert found.start == rule_schedule(recipe, table) == (0, 3, 6, 7)
    assert found.start_score == pytest.approx(psnr(by_rule, dense), abs=1e-9)
    assert result["schedules"] == {"4": found.schedule} and found.score >= found.start_score
    assert found.score == max(score for _, score in found.evaluations)
    assert done.kept and done.holdout_rule is None
    assert torch.equal(generate(pipe), dense), "the search leaves the pipeline as it found it"
    # Held out on the search's own generation, the found schedule gains what it gained in the search: kept at
    # a required gain below that, rejected above it (and a stale schedule of that count is dropped).
    gain = found.score - found.start_score
    assert gain >= 0.05, "the search should find something better than the rule (min_gain 0.05)"
    stale = dict(table, schedules={"4": (0, 1, 2, 3), "3": (0, 1, 2)})
    with torch.no_grad():
        kept, done = search_magcache_schedule(pipe, recipe, stale, calls, holdout=calls, sweeps=1, moves=(-1, 1),
                                              min_holdout_gain=gain - 0.01)
        rejected, undone = search_magcache_schedule(pipe, recipe, stale, calls, holdout=calls, sweeps=1,
                                                    moves=(-1, 1), min_holdout_gain=gain + 0.01)
    assert done.kept and done.holdout_found - done.holdout_rule == pytest.approx(gain, abs=1e-6)
    assert kept["schedules"] == {"4": found.schedule, "3": (0, 1, 2)}
    assert not undone.kept and rejected["schedules"] == {"3": (0, 1, 2)}
    with pytest.raises(ValueError, match="exactly one magcache plugin"):
        rule_schedule(load_recipe("fora"), table)


@pytest.mark.skipif(not pipes.zoo_weights_present("zoo:dit"), reason="zoo weights not exported")
def test_ditaccel_calibrate_search_schedule_adds_the_schedule_to_the_file(tmp_path):
    from dit_accel.cli.app import app

    out = tmp_path / "c.json"
    args = ["calibrate", "--model", "zoo:dit", "--steps", "6", "--recipe", "magcache-ultra", "--search-schedule",
            "--search-generations", "1", "--holdout-generations", "0", "--search-images", "2", "-o", str(out), "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    first = load_calibration(out)
    assert set(first["schedules"]) == {str(len(rule_schedule(load_recipe("magcache-ultra"), first)))}
    # A second search (another budget) reuses the file's curves and keeps its schedule.
    result = CliRunner().invoke(app, args[:6] + ["magcache-turbo"] + args[7:])
    assert result.exit_code == 0, result.output
    second = load_calibration(out)
    assert second["curves"] == first["curves"] and set(first["schedules"]) <= set(second["schedules"])
    other = CliRunner().invoke(app, args[:4] + ["8"] + args[5:])
    assert other.exit_code == 2 and "not of this model at 8" in other.output


@pytest.mark.skipif(not pipes.zoo_weights_present("zoo:dit"), reason="zoo weights not exported")
def test_zoo_benchmarks_give_magcache_the_shipped_calibration_as_generate_does():
    from dit_accel.bench.harness import BenchConfig, plan
    from dit_accel.pipelines.zoo.calibrations import shipped_calibration

    entries = {e.label: e for e in plan(BenchConfig(model="zoo:dit", recipes="magcache-ultra,fora"), 50)}
    magcache = next(p for p in entries["magcache-ultra"].recipe.plugins if isinstance(p, MagCacheConfig))
    assert magcache.ratios == load_calibration(shipped_calibration("dit"))
    assert entries["fora"].recipe == load_recipe("fora")


def test_a_searched_step_cfg_cache_rebuilt_stays_the_branchs_computed_step():
    """Separate-call CFG (tiny Flux true-CFG): cfg-cache answers some unconditional calls of the schedule's steps
    without running the transformer. The rebuilt output is the branch's point at that step, so the schedule decides
    every call as it stands (no extra call computes in its place) and the unconditional branch runs the transformer
    on fewer steps than the conditional one: the work cfg-cache saves stays saved."""
    pipe = pipes.build("flux")
    steps = 10
    flat = [1.0] * steps
    rule = dict(magcache__threshold=100.0, magcache__max_skips=1, magcache__retention=0.0, magcache__last_steps=1)
    assert computed_steps([flat], threshold=100.0, max_skips=1, retention=0.0, last_steps=1) == (0, 2, 4, 6, 8, 9)
    schedule = (0, 1, 3, 5, 7, 9)  # searched: as many steps as the rule's, elsewhere
    table = {"model": "", "steps": steps, "curves": {"cond": flat, "uncond": flat},
             "schedules": {"6": list(schedule)}}
    handle = accelerate_dit(pipe, "magcache-cfg-max", magcache__ratios=table, cfg_cache__start=0.0, **rule)
    plugin = next(p for p in handle.transformers[0].plugins if isinstance(p, MagCachePlugin))
    cfg = next(p for p in handle.transformers[0].plugins if p.name == "cfg-cache")
    runs, transformer = [], handle.transformers[0]
    hook = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda *_: runs.append(transformer.tracker.current.slot))
    with torch.no_grad():
        pipes.output_of("flux", pipe(**pipes.call_kwargs("flux", steps=steps)))
    hook.remove()
    rebuilt = int(handle.stats.notes["cfg_cache.rebuilt"])
    assert rebuilt > 0, "cfg-cache answered some unconditional call of a computed step without running it"
    for (step, slot, _, skip) in plugin.last_decisions:
        assert skip == (step not in schedule), (step, slot)
    cond, uncond = runs.count(0), runs.count(1)
    assert cond == len(schedule) and uncond == len(schedule) - rebuilt, (cond, uncond, rebuilt)
    remove_acceleration(pipe)


def test_ditaccel_calibrate_prompts_file_gives_the_search_its_prompts_in_turn(tmp_path, monkeypatch):
    """``--prompts-file``: the curve's generation uses the first prompt; the search's and the held-out generations
    take one prompt per image, in turn across them (comments and blank lines skipped), each with its own negative
    prompt; a file without prompts, or a file beside --prompt, is refused."""
    import dit_accel.bench.schedule_calibration as schedule_calibration
    from dit_accel.bench.schedule_calibration import ScheduleCalibration
    from dit_accel.caching.schedule_search import ScheduleSearch
    from dit_accel.cli.app import app

    seen = {}

    def recording(pipe, recipe, calibration, calls, *, holdout=(), **_):
        seen["search"] = [call() for call in calls]
        seen["holdout"] = [call() for call in holdout]
        start = rule_schedule(recipe, calibration)
        return dict(calibration), ScheduleCalibration(ScheduleSearch(start, 30.0, start, 30.0), None, None, False)

    monkeypatch.setattr(schedule_calibration, "search_magcache_schedule", recording)
    import dit_accel.cli.calibrate as calibrate_cli

    asked, original = [], calibrate_cli.call_kwargs
    monkeypatch.setattr(calibrate_cli, "call_kwargs", lambda *a: asked.append(a[3]) or original(*a))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# calibration prompts\na red cube\n\n  a cat  \na lake\n", encoding="utf-8")
    args = ["calibrate", "--model", "tiny:flux", "--steps", "4", "--recipe", "magcache-ultra", "--search-schedule",
            "--search-generations", "2", "--holdout-generations", "1", "--search-images", "2",
            "--prompts-file", str(prompts), "-o", str(tmp_path / "c.json"), "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert asked[0] == "a red cube"  # the curve's generation
    assert [kwargs["prompt"] for kwargs in seen["search"]] == [["a red cube", "a cat"], ["a lake", "a red cube"]]
    assert [kwargs["prompt"] for kwargs in seen["holdout"]] == [["a cat", "a lake"]]
    for kwargs in seen["search"] + seen["holdout"]:
        assert len(kwargs["negative_prompt"]) == 2 and kwargs["num_images_per_prompt"] == 1
    assert load_calibration(tmp_path / "c.json")["steps"] == 4
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n", encoding="utf-8")
    refused = CliRunner().invoke(app, args[:-4] + [str(empty), "-o", str(tmp_path / "d.json")])
    assert refused.exit_code == 2 and "holds no prompt" in refused.output
    both = CliRunner().invoke(app, args + ["--prompt", "a dog"])
    assert both.exit_code == 2 and "--prompt and --prompts-file" in both.output


def test_a_searched_step_missed_below_the_blocks_is_computed_at_the_branchs_next_call():
    """Where magcache skips only the block stack (``forecast_target = "residual"``), an unconditional call that
    cfg-cache answers without running never reaches magcache: a step of the searched schedule the branch was not
    called at makes its next call compute rather than forecast past it (like the rule, which adds the missed
    step's error); every other call follows the schedule."""
    pipe = pipes.build("flux")
    steps = 10
    flat = [1.0] * steps
    schedule = (0, 1, 3, 5, 7, 9)
    table = {"model": "", "steps": steps, "curves": {"cond": flat, "uncond": flat}, "schedules": {"6": list(schedule)}}
    rule = dict(magcache__threshold=100.0, magcache__max_skips=1, magcache__retention=0.0, magcache__last_steps=1)
    handle = accelerate_dit(pipe, "magcache-cfg-max", magcache__ratios=table, cfg_cache__start=0.0,
                            magcache__forecast_target="residual", **rule)
    plugin = next(p for p in handle.transformers[0].plugins if isinstance(p, MagCachePlugin))
    with torch.no_grad():
        pipes.output_of("flux", pipe(**pipes.call_kwargs("flux", steps=steps)))
    decided = {(step, slot): skip for step, slot, _, skip in plugin.last_decisions}
    missed = [s for s in schedule[1:] if (s, 1) not in decided and s < steps - 1]
    assert missed, "cfg-cache answered some unconditional call of a scheduled step below the blocks"
    for step in missed:
        following = min(s for s, slot in decided if slot == 1 and s > step)
        assert decided[(following, 1)] is False, (step, following)
    for (step, slot), skip in decided.items():
        after_miss = slot == 1 and any(m < step and not any(m < s < step for s, sl in decided if sl == 1)
                                       for m in missed)
        assert skip == (step not in schedule and not after_miss), (step, slot)
    remove_acceleration(pipe)


@pytest.mark.skipif(not pipes.zoo_weights_present("zoo:dit"), reason="zoo weights not exported")
def test_ditaccel_tune_search_schedule_embeds_the_schedule_it_keeps(tmp_path):
    """``ditaccel tune --search-schedule``: the winner's magcache plugin gets the schedule searched on the
    calibration seeds (judged on the seeds after them) in its embedded calibration when the search keeps it, and
    the saved recipe computes exactly those steps; a winner without magcache says that nothing was searched."""
    import tomllib

    from dit_accel.cli.app import app

    tuned = tmp_path / "tuned.toml"
    args = ["tune", "--model", "zoo:dit", "--target", "psnr>=20", "--recipes", "magcache@threshold=0.5", "--steps",
            "8", "--num-samples", "2", "--batch", "2", "--uniform-only", "--budget-minutes", "1", "--repeats", "1",
            "--search-schedule", "-o", str(tuned), "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("schedule search:"))
    ratios = tomllib.loads(tuned.read_text())["plugins"][0]["ratios"]
    if line.endswith(": kept"):
        (count, steps), = ratios["schedules"].items()
        assert f"{count} computed steps at {steps}" in line
        from dit_accel.pipelines import zoo

        pipe = zoo.load("dit")
        handle = accelerate_dit(pipe, load_recipe(str(tuned)))
        with torch.no_grad():
            pipe(class_labels=[1, 2], num_inference_steps=8, generator=torch.Generator().manual_seed(3))
        plugin = next(p for p in handle.transformers[0].plugins if isinstance(p, MagCachePlugin))
        assert [s for s, _, _, skip in plugin.last_decisions if not skip] == steps
        remove_acceleration(pipe)
    else:
        assert "not kept" in line and "schedules" not in ratios
    other = CliRunner().invoke(app, args[:6] + ["fora"] + args[7:])
    assert other.exit_code == 0 and "nothing searched" in other.output
