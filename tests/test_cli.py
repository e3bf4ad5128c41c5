"""Tests of the ``ditaccel`` command line (``dit_accel.cli.app``) on tiny offline pipelines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from transformers.utils import logging as transformers_logging
from typer.testing import CliRunner

import dit_accel
from dit_accel.cli.app import app, parse_overrides
from dit_accel.pipelines import tiny

runner = CliRunner()

# The libraries' log handlers bind to sys.stderr when first configured: configure them now, not inside a CliRunner
# invocation (whose stderr is closed afterwards and would make later warnings fail with "Logging error").
diffusers_logging.get_verbosity()
transformers_logging.get_verbosity()


def invoke(*args: str | Path) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def generate(*args: str | Path) -> Any:
    """``ditaccel generate --steps 2 --quiet ...``; asserts success."""
    result = invoke("generate", "--steps", "2", "--quiet", *args)
    assert result.exit_code == 0, result.output
    return result


def assert_usage_error(result: Any, *fragments: str) -> None:
    """Exit status 2 via SystemExit (not an exception escaping), a one-line message naming the problem."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.stderr.startswith("error: ")
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


# ------------------------------------------------------------------------------------------ version, recipes
def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"ditaccel {dit_accel.__version__}"


def test_recipes_table_lists_none() -> None:
    result = invoke("recipes")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "PLUGINS", "DESCRIPTION"]
    none_row = next(line for line in lines if line.split()[0] == "none")
    assert none_row.split()[1] == "-"
    assert "No acceleration" in none_row


def test_recipes_json() -> None:
    result = invoke("recipes", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    names = [entry["name"] for entry in data]
    assert names == [recipe.name for recipe in dit_accel.list_recipes()]
    none = data[names.index("none")]
    assert none["plugins"] == [] and none["description"]


# ------------------------------------------------------------------------------------------ generate
def test_generate_dit_class_label(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "dit.png"
    result = generate("--model", "tiny:dit", "--class-label", "7", "-o", out, "--recipe", "none")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (32, 32) and image.mode == "RGB"
    assert str(out) in result.stdout
    assert "estimated FLOPs 100.0% of dense" in result.stdout
    assert "transformer_blocks.0" in result.stdout  # --summary is the default


def test_generate_flux_prompt_no_summary_with_progress_bar(tmp_path: Path) -> None:
    out = tmp_path / "flux.png"
    result = invoke("generate", "--model", "tiny:flux", "--prompt", "a red fox", "--steps", "2",
                    "--guidance-scale", "3", "--no-summary", "-o", out)
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (32, 32)
    assert "transformer_blocks.0" not in result.stdout
    assert "2/2" in result.stderr  # the pipeline's own progress bar (tqdm writes to stderr)


def test_generate_is_deterministic_per_seed(tmp_path: Path) -> None:
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for path, seed in zip(paths, ("1", "1", "2")):
        generate("--seed", seed, "-o", path)
    pixels = [Image.open(path).tobytes() for path in paths]
    assert pixels[0] == pixels[1] != pixels[2]


def test_generate_wan_gif(tmp_path: Path) -> None:
    out = tmp_path / "clip.gif"
    generate("--model", "tiny:wan", "-o", out)
    with Image.open(out) as image:
        assert image.format == "GIF" and image.size == (32, 32)
        assert image.n_frames == 5


def test_generate_video_as_png_strip(tmp_path: Path) -> None:
    out = tmp_path / "strip.png"
    generate("--model", "tiny:wan", "-o", out)
    with Image.open(out) as image:
        assert image.size == (5 * 32, 32)


def test_generate_saved_pipeline_directory_offline(tmp_path: Path) -> None:
    pipe = tiny.build("pixart-sigma")
    pipe.save_pretrained(tmp_path / "pix")
    size = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    out = tmp_path / "pix.png"
    result = generate("--model", tmp_path / "pix", "--prompt", "a cat", "-o", out)
    with Image.open(out) as image:
        assert image.size == (size, size)
    assert "of dense" in result.stdout  # the acceleration recorded the generation


def test_generate_toml_recipe_with_set_override(tmp_path: Path) -> None:
    path = tmp_path / "scaled.toml"
    path.write_text('name = "scaled"\n\n[[plugins]]\ntype = "test-attention-scale"\nfactor = 0.5\n')
    outs = [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"]
    generate("--recipe", path, "-o", outs[0])
    result = generate("--recipe", path, "--set", "factor=1.0", "--set", "steps=0,1", "-o", outs[1])
    assert "recipe 'scaled'" in result.stdout
    generate("--recipe", "none", "-o", outs[2])
    pixels = [Image.open(out).tobytes() for out in outs]
    assert pixels[0] != pixels[1] == pixels[2]  # factor 1.0 is the identity: same image as no acceleration


def test_parse_overrides() -> None:
    parsed = parse_overrides(["interval=4", "steps=2,8", "layers=[a.*,b]", "on=true", "off=No", "x=0.5",
                              "fora__name=abc", "steps2=none"])
    assert parsed == {"interval": 4, "steps": [2, 8], "layers": ["a.*", "b"], "on": True, "off": False, "x": 0.5,
                      "fora__name": "abc", "steps2": None}


# ------------------------------------------------------------------------------------------ errors
def test_error_unknown_recipe(tmp_path: Path) -> None:
    result = invoke("generate", "--recipe", "no-such-recipe", "-o", tmp_path / "x.png")
    assert_usage_error(result, "unknown recipe 'no-such-recipe'", "none")
    assert not (tmp_path / "x.png").exists()


def test_error_missing_toml_recipe(tmp_path: Path) -> None:
    assert_usage_error(invoke("generate", "--recipe", tmp_path / "missing.toml"), "missing.toml", "does not exist")


def test_error_unknown_tiny_model(tmp_path: Path) -> None:
    result = invoke("generate", "--model", "tiny:nope", "-o", tmp_path / "x.png")
    assert_usage_error(result, "unknown tiny model 'nope'", "tiny:<dit|", "local pipeline directory", "hub id")


def test_error_nonexistent_local_path(tmp_path: Path) -> None:
    result = invoke("generate", "--model", tmp_path / "does" / "not" / "exist", "-o", tmp_path / "x.png")
    assert_usage_error(result, "no such pipeline directory", "tiny:<")


def test_error_directory_without_pipeline(tmp_path: Path) -> None:
    result = invoke("generate", "--model", tmp_path, "-o", tmp_path / "x.png")
    assert_usage_error(result, "model_index.json")


def test_error_hub_id_offline(tmp_path: Path) -> None:
    result = invoke("generate", "--model", "someone/not-a-cached-model", "-o", tmp_path / "x.png")
    assert_usage_error(result, "someone/not-a-cached-model", "HF_HUB_OFFLINE", "local pipeline directory")


def test_error_prompt_on_class_conditional(tmp_path: Path) -> None:
    result = invoke("generate", "--model", "tiny:dit", "--prompt", "a cat", "-o", tmp_path / "x.png")
    assert_usage_error(result, "--prompt", "DiTPipeline", "--class-label")


def test_error_class_label_on_text_pipeline(tmp_path: Path) -> None:
    result = invoke("generate", "--model", "tiny:flux", "--class-label", "3", "-o", tmp_path / "x.png")
    assert_usage_error(result, "--class-label", "FluxPipeline", "--prompt")


def test_error_class_label_out_of_range(tmp_path: Path) -> None:
    result = invoke("generate", "--model", "tiny:dit", "--class-label", "1000", "-o", tmp_path / "x.png")
    assert_usage_error(result, "--class-label 1000", "0 to 999")
    result = invoke("generate", "--class-label", "10", "-o", tmp_path / "x.png")
    assert_usage_error(result, "--class-label 10", "0 to 9")


def test_error_unwritable_output() -> None:
    assert_usage_error(invoke("generate", "-o", "/proc/x.png"), "/proc/x.png", "not writable")


def test_error_unknown_output_extension(tmp_path: Path) -> None:
    assert_usage_error(invoke("generate", "-o", tmp_path / "x.nope"), "extension '.nope'")


def test_error_bad_override(tmp_path: Path) -> None:
    result = invoke("generate", "--set", "interval=4", "-o", tmp_path / "x.png")
    assert_usage_error(result, "interval=4", "recipe 'none'")
    assert_usage_error(invoke("generate", "--set", "interval", "-o", tmp_path / "x.png"), "KEY=VALUE", "'interval'")


def test_error_override_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "scaled.toml"
    path.write_text('name = "scaled"\n\n[[plugins]]\ntype = "test-attention-scale"\n')
    result = invoke("generate", "--recipe", path, "--set", "factor=99", "-o", tmp_path / "x.png")
    assert_usage_error(result, "factor = 99", "allowed")


def test_generate_defaults_to_the_zoo_dit_model(tmp_path: Path) -> None:
    out = tmp_path / "default.png"
    result = invoke("generate", "--quiet", "-o", out)
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (32, 32)
    assert "dit_accel [dit] recipe 'none'" in result.output


def test_generate_zoo_mmdit_grid(tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    result = invoke("generate", "--model", "zoo:mmdit", "--class-label", "3", "--num-images", "12", "--steps", "4",
                    "--recipe", "none", "--quiet", "-o", out)
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (320, 64)  # 10 per row


def test_unknown_zoo_model(tmp_path: Path) -> None:
    result = invoke("generate", "--model", "zoo:sd9", "-o", tmp_path / "x.png")
    assert_usage_error(result, "unknown zoo model 'sd9'", "zoo:<dit|mmdit|flowdit>")


@pytest.mark.parametrize("model", ["dit", "mmdit", "flowdit"])
def test_generate_magcache_on_a_zoo_model_skips_from_its_only_generation(tmp_path: Path, model: str) -> None:
    """One generation per process: without the calibration shipped with the zoo model it would run dense to
    calibrate. A recipe that names its own ratios keeps them."""
    import re

    from dit_accel.caching.calibration import load_calibration, model_identity
    from dit_accel.pipelines import zoo
    from dit_accel.pipelines.zoo.calibrations import shipped_calibration

    shipped = shipped_calibration(model)
    assert shipped is not None and load_calibration(shipped)["steps"] == 50
    assert load_calibration(shipped)["model"] == model_identity(zoo.load(model).transformer), \
        "the shipped calibration belongs to other weights: rewrite it with `ditaccel calibrate`"
    result = invoke("generate", "--model", f"zoo:{model}", "--recipe", "magcache-max", "-o", tmp_path / "a.png")
    assert result.exit_code == 0, result.output
    assert f"using the calibration shipped with zoo:{model} (magcache-50.json)" in result.output
    fraction = float(re.search(r"estimated FLOPs ([\d.]+)% of dense", result.output).group(1))
    assert fraction < 60.0, result.output
    result = invoke("generate", "--model", f"zoo:{model}", "--recipe", "magcache-max", "--set", f"ratios={shipped}",
                    "--steps", "20", "-o", tmp_path / "b.png")
    assert result.exit_code == 0, result.output
    assert "using the calibration shipped" not in result.output
