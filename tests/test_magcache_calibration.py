"""Persisted magcache calibrations: calibrate -> file or TOML -> a fresh process skips from its first generation;
a calibration of another model or step count says so."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pipelines_for_tests import zoo_weights_present
from dit_accel import accelerate_dit, load_recipe, remove_acceleration
from dit_accel.caching.calibration import (calibrations_of, load_calibration, model_identity, save_calibration,
                                           validate_calibration)
from dit_accel.caching.magcache import MagCacheConfig, MagCachePlugin
from dit_accel.cli.app import app

pytestmark = pytest.mark.skipif(not zoo_weights_present("zoo:dit"), reason="zoo weights not exported")
STEPS = 16


def ditaccel(*args) -> subprocess.CompletedProcess:
    """The CLI in a fresh process (nothing calibrated in memory)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "dit_accel.cli.app", *map(str, args)], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def flops_percent(output: str) -> float:
    return float(re.search(r"estimated FLOPs ([\d.]+)% of dense", output).group(1))


def psnr_of_pngs(a: Path, b: Path) -> float:
    x, y = (np.asarray(Image.open(p), dtype=np.float64) / 255 for p in (a, b))
    return float(10 * np.log10(1 / max(((x - y) ** 2).mean(), 1e-12)))


def generate(pipe, seed: int = 0):
    with torch.no_grad():
        return pipe([3, 8], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed),
                    output_type="pt").images


@pytest.fixture(scope="module")
def calibration():
    from dit_accel.pipelines import zoo

    pipe = zoo.load("dit")
    handle = accelerate_dit(pipe, "magcache-max")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        generate(pipe, seed=10_000)
    found = calibrations_of(handle)
    assert len(found) == 1 and set(found[0]["curves"]) == {"cond", "uncond"}
    assert found[0]["model"] == model_identity(pipe.transformer) and found[0]["steps"] == STEPS
    return found[0]


def test_model_identity_follows_the_weights_not_their_dtype():
    from dit_accel.pipelines import zoo

    transformer = zoo.load("dit").transformer
    identity = model_identity(transformer)
    assert identity.startswith("DiTTransformer2DModel/") and identity == model_identity(transformer.to(torch.bfloat16))
    with torch.no_grad():
        transformer.proj_out_2.weight.mul_(2)
    assert model_identity(transformer) != identity


def test_a_calibration_file_next_to_the_recipe_skips_from_the_first_generation_in_a_fresh_process(
        tmp_path, calibration):
    save_calibration(calibration, tmp_path / "zoo-dit.json")
    (tmp_path / "shipped.toml").write_text('name = "shipped"\n[[plugins]]\ntype = "magcache"\nthreshold = 0.24\n'
                                           'max_skips = 4\nratios = "zoo-dit.json"\n')
    recipe = load_recipe(str(tmp_path / "shipped.toml"))
    assert recipe.plugins[0].ratios["curves"]["cond"] == tuple(calibration["curves"]["cond"])
    result = ditaccel("generate", "--model", "zoo:dit", "--steps", STEPS, "--recipe", tmp_path / "shipped.toml",
                      "-o", tmp_path / "x.png", "-q")
    assert flops_percent(result.stdout) < 95, result.stdout
    assert "calibrate" not in result.stderr


def test_inline_calibration_round_trips_through_toml(tmp_path, calibration):
    recipe = load_recipe("magcache-max", ratios=calibration)
    recipe.save(tmp_path / "inline.toml")
    data = tomllib.loads((tmp_path / "inline.toml").read_text())
    assert data["plugins"][0]["ratios"]["model"] == calibration["model"]
    again = load_recipe(str(tmp_path / "inline.toml"))
    assert again == recipe


def test_another_step_count_resamples_and_another_model_recalibrates_each_with_a_warning(calibration):
    from dit_accel.pipelines import zoo

    pipe = zoo.load("dit")
    handle = accelerate_dit(pipe, "magcache-max", ratios=calibration)
    with pytest.warns(UserWarning, match=f"is for {STEPS} steps, this generation has 12: its curves are resampled"):
        with torch.no_grad():
            pipe([3, 8], num_inference_steps=12, generator=torch.Generator().manual_seed(0))
    plugin = next(p for p in handle.transformers[0].plugins if isinstance(p, MagCachePlugin))
    assert len(plugin.curves[12]["cond"]) == 12
    other = dict(calibration, model="DiTTransformer2DModel/000000000000")
    handle = accelerate_dit(pipe, "magcache-max", ratios=other)
    plugin = next(p for p in handle.transformers[0].plugins if isinstance(p, MagCachePlugin))
    assert not plugin.calibrated
    with pytest.warns(UserWarning, match="was measured on DiTTransformer2DModel/000000000000.*runs dense to calibrate"):
        generate(pipe)
    assert handle.stats.flops_fraction == 1.0 and plugin.calibrated
    generate(pipe)
    assert handle.stats.flops_fraction < 1.0
    remove_acceleration(pipe)


def test_bad_calibrations_are_refused_with_what_is_allowed(tmp_path):
    with pytest.raises(ValueError, match="'curves' must map branch roles"):
        MagCacheConfig(ratios={"model": "x", "steps": 3})
    with pytest.raises(ValueError, match=r"every curve must have 'steps' = 3 ratios \(got \[2\]\)"):
        validate_calibration({"steps": 3, "curves": {"cond": [1.0, 1.0]}})
    with pytest.raises(ValueError, match="unknown calibration key"):
        validate_calibration({"curves": {"cond": [1.0, 1.0]}, "shape": 1})
    with pytest.raises(FileNotFoundError, match="write one with `ditaccel calibrate`"):
        MagCacheConfig(ratios=str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_calibration(tmp_path / "bad.json")


def test_ditaccel_calibrate_writes_a_file_that_generate_uses(tmp_path):
    result = CliRunner().invoke(app, ["calibrate", "--model", "zoo:dit", "--steps", str(STEPS), "-o",
                                      str(tmp_path / "c.json"), "-q"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["steps"] == STEPS and set(data["curves"]) == {"cond", "uncond"}
    refused = CliRunner().invoke(app, ["calibrate", "--recipe", "fora", "-o", str(tmp_path / "d.json")])
    assert refused.exit_code == 2 and "has no magcache plugin" in refused.output


def test_a_tuned_toml_is_accelerated_from_its_first_image_and_meets_its_target_in_a_fresh_process(tmp_path):
    tuned = tmp_path / "tuned.toml"
    CliRunner().invoke(app, [])  # bind the CLI's logging once (see test_cli.py)
    result = CliRunner().invoke(app, ["tune", "--target", "psnr>=25", "--recipes", "magcache@threshold=0.24",
                                      "--steps", str(STEPS), "--num-samples", "2", "--batch", "2", "-o", str(tuned),
                                      "-q", "--uniform-only", "--budget-minutes", "3"])
    assert result.exit_code == 0, result.output
    plugin = tomllib.loads(tuned.read_text())["plugins"][0]
    assert plugin["type"] == "magcache" and plugin["ratios"]["steps"] == STEPS
    dense = ditaccel("generate", "--model", "zoo:dit", "--steps", STEPS, "--recipe", "none", "-o",
                     tmp_path / "dense.png", "-q", "--seed", 5)
    fast = ditaccel("generate", "--model", "zoo:dit", "--steps", STEPS, "--recipe", tuned, "-o",
                    tmp_path / "fast.png", "-q", "--seed", 5)
    assert flops_percent(dense.stdout) == 100.0 and flops_percent(fast.stdout) < 100.0, fast.stdout
    assert psnr_of_pngs(tmp_path / "dense.png", tmp_path / "fast.png") >= 25
