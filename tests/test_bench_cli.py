"""Tests of ``ditaccel bench`` and its harness (``dit_accel.bench.harness``, ``runner``, ``report``).

One small benchmark (zoo:dit, 2 steps, 2 samples, 1 repeat) is run once per module and inspected by several tests;
the error cases all fail before a model is loaded. No test asserts a time.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from transformers.utils import logging as transformers_logging
from typer.testing import CliRunner

from pipelines_for_tests import zoo_weights_present
from dit_accel.bench import report
from dit_accel.bench.harness import BenchConfig, parse_item, plan, split_items
from dit_accel.bench.quality import Quality
from dit_accel.bench.runner import Session
from dit_accel.cli.app import app

runner = CliRunner()
diffusers_logging.get_verbosity()  # bind the libraries' log handlers outside CliRunner (see test_cli.py)
transformers_logging.get_verbosity()

SMALL = ["--model", "zoo:dit", "--steps", "2", "--num-samples", "2", "--repeats", "1", "--batch", "2", "--quiet"]
needs_zoo = pytest.mark.skipif(not zoo_weights_present("zoo:dit"), reason="zoo weights not exported")


def invoke(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def assert_usage_error(result: Any, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.stderr.startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def strict_lines(path: Path) -> list[dict]:
    """Parse rows.jsonl as strict JSON (Infinity/NaN literals refused)."""

    def refuse(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not zoo_weights_present("zoo:dit"):
        pytest.skip("zoo weights not exported")
    out = tmp_path_factory.mktemp("bench")
    result = invoke("bench", *SMALL, "--recipes", "none,fora", "--baselines", "cache-dit:dbcache", "-o", out)
    assert result.exit_code == 0, result.output
    return out


# ------------------------------------------------------------------------------------------------ end to end
@needs_zoo
def test_bench_writes_rows_results_and_plot(bench_dir: Path) -> None:
    rows = strict_lines(bench_dir / "rows.jsonl")
    assert [r["config"] for r in rows] == ["dense", "none", "fora", "cache-dit:dbcache"]
    assert [r["kind"] for r in rows] == ["dense", "dit_accel", "dit_accel", "baseline"]
    for row in rows[:3]:
        assert row["seeds"] == [0] and row["steps"] == 2 and row["num_samples"] == 2
        for name in ("latency_s", "transformer_s", "dense_latency_s"):
            assert row[name]["median"] > 0 and row[name]["iqr"] >= 0 and row[name]["runs"] == 1
        assert row["wall_speedup"] > 0 and row["flops_speedup"] >= 1.0
        assert row["peak_memory_bytes"] > 0 and row["peak_memory_scope"]
        assert 0 <= row["class_consistency"] <= 1 and row["fd"] >= 0
        assert row["env"]["torch"] == torch.__version__
    assert rows[2]["cache_bytes"] > 0  # fora holds its outputs
    assert "class_consistency_change" not in rows[0]  # dense is the reference, not compared with itself
    none = rows[1]  # the same images as dense: no change, full agreement
    assert (none["class_consistency_change"], none["class_consistency_change_se"], none["class_agreement"]) == (0, 0, 1)
    fora = rows[2]
    assert fora["class_consistency_change"] == pytest.approx(fora["class_consistency"] - rows[0]["class_consistency"])
    markdown = (bench_dir / "results.md").read_text()
    assert "| fora | dit_accel |" in markdown and "unavailable" in markdown and "pareto.png" in markdown
    with Image.open(bench_dir / "pareto.png") as image:
        assert image.format == "PNG" and image.width > 100


@needs_zoo
def test_identical_images_have_infinite_psnr_as_a_json_string(bench_dir: Path) -> None:
    raw = strict_lines(bench_dir / "rows.jsonl")
    none = next(r for r in raw if r["config"] == "none")
    assert none["psnr"] == "inf"  # strict JSON: the string "inf", not the literal Infinity
    assert none["ssim"] == 1.0 and none["rel_l1"] == 0.0
    loaded = next(r for r in report.load_rows(bench_dir / "rows.jsonl") if r["config"] == "none")
    assert loaded["psnr"] == math.inf and float(none["psnr"]) == math.inf


@needs_zoo
def test_unavailable_baseline_is_a_row_not_a_crash(bench_dir: Path) -> None:
    row = report.load_rows(bench_dir / "rows.jsonl")[-1]
    assert row["config"] == "cache-dit:dbcache" and row["kind"] == "baseline"
    assert "DiTTransformer2DModel" in row["unavailable"] or "not installed" in row["unavailable"]
    assert "psnr" not in row and "latency_s" not in row


@needs_zoo
def test_resume_keeps_finished_rows_and_measures_the_rest(bench_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "resumed"
    shutil.copytree(bench_dir, out)
    lines = (out / "rows.jsonl").read_text().splitlines()
    # An interrupted run: the first two rows finished, the third was being written.
    (out / "rows.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])
    calls = []
    original = Session.generate
    monkeypatch.setattr(Session, "generate", lambda self, kwargs: calls.append(1) or original(self, kwargs))
    with pytest.warns(UserWarning, match="not a JSON row"):
        result = invoke("bench", *SMALL, "--recipes", "none,fora", "--baselines", "cache-dit:dbcache", "-o", out,
                        "--resume")
    assert result.exit_code == 0, result.output
    after = (out / "rows.jsonl").read_text().splitlines()
    assert after[:2] == lines[:2]  # kept byte for byte, timestamps included
    rows = report.load_rows(out / "rows.jsonl")
    assert [r["config"] for r in rows] == ["dense", "none", "fora", "cache-dit:dbcache"]
    assert rows[2]["timestamp"] > json.loads(lines[1])["timestamp"]
    # Only fora was generated: its quality pass, one dense warm-up, one dense and one fora timed run. The dense
    # reference came from out/dense/, not from a new dense pass.
    assert len(calls) == 4
    assert "| fora |" in (out / "results.md").read_text()


# ------------------------------------------------------------------------------------------------- metrics
@needs_zoo
def test_fd_of_identical_sets_is_zero() -> None:
    quality = Quality("zoo:dit", 32)
    notes: list[str] = []
    metrics = quality.measure(quality.real, None, {"labels": None}, notes)
    assert metrics["fd"] == pytest.approx(0.0, abs=1e-3)
    assert quality.evaluator.fd(quality.real, quality.real.flip(0)) == pytest.approx(0.0, abs=1e-3)


def test_fid_and_clip_are_skipped_with_a_note_never_faked(tmp_path: Path) -> None:
    images = torch.rand(2, 3, 16, 16)
    notes: list[str] = []
    metrics = Quality("tiny:dit", 2).measure(images, images.clone(), {"labels": [1, 1]}, notes)
    assert "fid" not in metrics and "clip_score" not in metrics
    assert any(n.startswith("FID skipped: no --fid-weights") for n in notes)
    assert any(n.startswith("CLIP score skipped") for n in notes)
    garbage = tmp_path / "weights.pth"
    garbage.write_bytes(b"not weights")
    notes = []
    metrics = Quality("tiny:dit", 2, fid_weights=garbage).measure(images, images.clone(), {}, notes)
    assert metrics.get("fid") is None  # torchmetrics missing, or unreadable weights: a note, no number
    assert any(n.startswith("FID skipped") for n in notes), notes


def test_rows_round_trip_non_finite_numbers(tmp_path: Path) -> None:
    row = {"config": "x", "psnr": math.inf, "fd": math.nan, "latency_s": {"median": 1.0, "iqr": 0.0},
           "notes": ["inf"]}
    path = tmp_path / "rows.jsonl"
    report.append_row(path, row)
    assert json.loads(path.read_text())["psnr"] == "inf"
    loaded = report.load_rows(path)[0]
    assert loaded["psnr"] == math.inf and math.isnan(loaded["fd"]) and loaded["notes"] == ["inf"]


def test_pareto_front() -> None:
    points = [(1.0, 40.0), (2.0, 30.0), (1.5, 25.0), (3.0, 20.0), (2.5, 10.0)]
    assert report.pareto_front(points) == [(1.0, 40.0), (2.0, 30.0), (3.0, 20.0)]


# ------------------------------------------------------------------------------------------------- parsing
def test_configuration_lists_and_settings() -> None:
    items = split_items(["none,fora@interval=4,first_steps=2", "diffusers:taylorseer@cache_interval=5,max_order=2,"
                         "fora@steps=[2,8]"])
    assert items == ["none", "fora@interval=4,first_steps=2", "diffusers:taylorseer@cache_interval=5,max_order=2",
                     "fora@steps=[2,8]"]
    assert parse_item(items[1]) == ("fora", {"interval": 4, "first_steps": 2})
    assert parse_item(items[3]) == ("fora", {"steps": [2, 8]})
    entries = plan(BenchConfig(recipes=["none", "fora@interval=4", "taylorseer"], overrides={"first_steps": 2},
                               baselines=["diffusers:fbcache@threshold=0.2"]), steps=4)
    assert [e.label for e in entries] == ["dense", "none", "fora@interval=4", "taylorseer",
                                          "diffusers:fbcache@threshold=0.2"]
    assert entries[2].recipe.plugins[0].interval == 4 and entries[2].recipe.plugins[0].first_steps == 2
    assert entries[4].setting["threshold"] == 0.2 and not entries[4].default_setting
    assert len({e.key for e in entries}) == len(entries)


# -------------------------------------------------------------------------------------------------- errors
def test_help_has_examples() -> None:
    result = invoke("bench", "--help")
    assert result.exit_code == 0
    assert "ditaccel bench --recipes" in result.stdout and "--resume" in result.stdout


@pytest.mark.parametrize("args, fragments", [
    (["--recipes", "none,nope"], ["unknown recipe 'nope'", "fora"]),
    (["--baselines", "diffusers:nope"], ["unknown baseline 'diffusers:nope'", "diffusers:fbcache", "cache-dit:dbcache"]),
    (["--baselines", "diffusers:fbcache@bogus=1"], ["no setting bogus", "threshold"]),
    (["--recipes", "fora", "--set", "interval"], ["--set expects KEY=VALUE"]),
    (["--recipes", "fora", "--set", "factor=2"], ["--set factor", "no plugin"]),
    (["--recipes", "fora", "--set", "interval=0"], ["interval"]),
    (["--model", "zoo:nope"], ["unknown zoo model 'nope'", "zoo:<dit|mmdit|flowdit>"]),
])
def test_bad_input_exits_2(args: list[str], fragments: list[str], tmp_path: Path) -> None:
    assert_usage_error(invoke("bench", *args, "-o", tmp_path / "out", "--quiet"), *fragments)


def test_unwritable_output_dir_exits_2(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_usage_error(invoke("bench", "--recipes", "none", "-o", blocker, "--quiet"), "not a writable directory")
    assert_usage_error(invoke("bench", "--recipes", "none", "-o", blocker / "sub", "--quiet"),
                       "not a writable directory")


# ---------------------------------------------------------------------------------------------------- tune
def test_tune_target_parsing() -> None:
    from dit_accel.bench.tune_space import parse_target

    target = parse_target("psnr>=30")
    assert (target.metric, target.op, target.value) == ("psnr", ">=", 30.0)
    assert target.met({"psnr": 31.0}) and not target.met({"psnr": 29.0}) and not target.met({})
    assert parse_target(" fd <= 12.5 ").met({"fd": 12.5})
    change = parse_target("class_consistency_change>=-0.02")  # no worse than dense by more than 0.02, paired
    assert change.met({"class_consistency_change": 0.0}) and not change.met({"class_consistency_change": -0.05})
    for bad in ("psnr=30", "speed>=2", "psnr<=30", "fd>=3", "class_consistency_change<=0"):
        with pytest.raises(ValueError):
            parse_target(bad)


def test_tune_bad_input_exits_2(tmp_path: Path) -> None:
    assert_usage_error(invoke("tune", "--target", "psnr>>30", "-o", tmp_path / "t.toml"), "--target")
    assert_usage_error(invoke("tune", "--target", "psnr>=30", "--recipes", "nope", "-o", tmp_path / "t.toml"),
                       "unknown recipe 'nope'")
    assert_usage_error(invoke("tune", "--target", "psnr>=30", "-o", tmp_path / "t.json"), ".toml")
    for metric in ("fd<=10", "class_consistency>=0.5", "class_consistency_change>=-0.02"):  # no evaluator for them
        assert_usage_error(invoke("tune", "--model", "tiny:flux", "--target", metric, "--steps", "2",
                                  "-o", tmp_path / "t.toml"), "zoo models only")


@needs_zoo
def test_tuned_recipe_meets_its_target_when_measured_again(tmp_path: Path) -> None:
    import dit_accel

    path = tmp_path / "tuned.toml"
    # 3 steps, nothing forced dense: interval 2 computes steps 0 and 2 (FLOPs 2/3), interval 3 step 0 only (1/3).
    # The held-out check runs on the calibration seed here (--holdout-seed 0): it loads the written TOML and
    # measures it again from scratch against a new dense pass.
    result = invoke("tune", "--target", "psnr>=15", "--recipes", "fora@first_steps=0,last_steps=0", "--steps", "3",
                    "--num-samples", "2", "--batch", "2", "--seed", "0", "--holdout-seed", "0", "-o", path, "-q",
                    "--uniform-only")
    assert result.exit_code == 0, result.output
    recipe = dit_accel.load_recipe(str(path))
    assert recipe.name == "fora-tuned" and recipe.plugins[0].first_steps == 0
    assert recipe.plugins[0].interval in (2, 3)
    held_out = next(line for line in result.stdout.splitlines() if line.startswith("held-out seeds [0]"))
    assert "(meets psnr>=15)" in held_out, result.stdout
    speedup = float(held_out.split("measured wall speedup ")[1].split("x")[0])
    assert speedup > 0 and "interleaved with dense ones" in held_out
    tried = [line for line in result.stdout.splitlines() if line.strip().startswith("fora(interval=")]
    best = next(line for line in tried if f"interval={recipe.plugins[0].interval})" in line)
    assert "-> meets" in best
    assert all("meets" in line for line in tried if "FLOPs 0.333" in line) or recipe.plugins[0].interval == 2


def test_self_calibrating_recipes_are_measured_after_calibration(tmp_path: Path) -> None:
    """magcache's first generation is a dense calibration run: the bench must calibrate on other seeds first,
    otherwise the row would report the dense output (PSNR inf) as the recipe's."""
    out = tmp_path / "mag"
    args = [a if a != "2" or i != SMALL.index("--steps") + 1 else "12" for i, a in enumerate(SMALL)]  # room to skip
    result = invoke("bench", *args, "--recipes", "magcache-max", "-o", out)
    assert result.exit_code == 0, result.output
    row = strict_lines(out / "rows.jsonl")[-1]
    assert row["psnr"] != "inf" and math.isfinite(float(row["psnr"]))
    assert row["flops_speedup"] > 1.0


def test_noisy_timing_is_flagged_not_hidden() -> None:
    from dit_accel.bench.runner import noisy_timing_notes

    steady = {"median": 1.0, "iqr": 0.05, "q1": 0.97, "q3": 1.02, "runs": 3}
    busy = {"median": 1.0, "iqr": 0.5, "q1": 0.8, "q3": 1.3, "runs": 3}
    assert noisy_timing_notes({"latency_s": steady, "dense_latency_s": steady}) == []
    notes = noisy_timing_notes({"latency_s": steady, "dense_latency_s": busy})
    assert len(notes) == 1 and "dense runs' IQR is 50% of their median" in notes[0]


@needs_zoo
def test_tune_on_class_consistency_change(tmp_path: Path) -> None:
    """The paired target reaches tune's measurements: every candidate row carries the change from dense."""
    path = tmp_path / "tuned.toml"
    result = invoke("tune", "--target", "class_consistency_change>=-0.5", "--recipes", "fora@first_steps=0,last_steps=0",
                    "--steps", "3", "--num-samples", "2", "--batch", "2", "--seed", "0", "--holdout-seed", "0", "-o",
                    path, "-q", "--uniform-only")
    assert result.exit_code == 0, result.output
    held_out = next(line for line in result.stdout.splitlines() if line.startswith("held-out seeds [0]"))
    assert "(meets class_consistency_change>=-0.5)" in held_out, result.stdout
