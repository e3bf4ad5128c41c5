from __future__ import annotations

import dataclasses

import pytest

from dit_accel import Recipe, list_recipes, load_recipe
from dit_accel.recipe import config_from_dict, config_types
from plugins_for_tests import CounterConfig, ProbeConfig, ReuseConfig, ScaleConfig


def test_none_is_shipped_and_empty():
    names = [r.name for r in list_recipes()]
    assert names[0] == "none"
    none = load_recipe("none")
    assert none.plugins == () and none.description


def test_configs_are_frozen_and_validated():
    config = ScaleConfig(factor=2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.factor = 3.0
    with pytest.raises(ValueError, match=r"ScaleConfig\.factor = 11\.0 is out of range; allowed: a number in \[0\.0, 10\.0\]"):
        ScaleConfig(factor=11.0)
    with pytest.raises(ValueError, match="factor = nan"):
        ScaleConfig(factor=float("nan"))
    with pytest.raises(ValueError, match=r"steps = \(3, 1\) is invalid"):
        ScaleConfig(steps=(3, 1))
    with pytest.raises(ValueError, match="layers = \\(\\) is invalid"):
        ScaleConfig(layers=())
    with pytest.raises(ValueError, match="version = 2 is not supported"):
        ScaleConfig(version=2)
    assert ScaleConfig(layers="transformer_blocks.*").layers == ("transformer_blocks.*",)


def test_toml_round_trip(tmp_path):
    recipe = Recipe((ScaleConfig(factor=0.25, steps=(1, 3), layers=("transformer_blocks.0.*",)),), name="mine",
                    description='quotes " and \\ survive')
    path = recipe.save(tmp_path / "mine.toml")
    assert load_recipe(path) == recipe
    assert load_recipe(str(path)) == recipe


def test_composition_and_conflicts():
    a = Recipe((ProbeConfig(),), name="probe")
    b = Recipe((CounterConfig(),), name="counter")
    both = a + b
    assert both.name == "probe+counter" and len(both.plugins) == 2
    assert (load_recipe("none") + a).name == "probe"
    with pytest.raises(ValueError, match="'test-attention-counter' and 'test-attention-scale' conflict"):
        b + Recipe((ScaleConfig(),), name="scale")
    # Disjoint step ranges of the same kind compose.
    ok = Recipe((ScaleConfig(steps=(0, 2)),)) + Recipe((ReuseConfig(steps=(2, 4)),))
    assert len(ok.plugins) == 2


def test_install_time_conflict_on_overlapping_layer_patterns():
    from dit_accel import accelerate_dit
    from dit_accel.pipelines import tiny

    recipe = Recipe((ScaleConfig(layers=("transformer_blocks.0",)), ReuseConfig(layers=("transformer_blocks.*.attn1",))))
    pipe = tiny.build("dit")
    with pytest.raises(ValueError, match="conflict on transformer_blocks.0.attn1"):
        accelerate_dit(pipe, recipe)
    assert not hasattr(pipe.transformer, "_diffusers_hook") or not pipe.transformer._diffusers_hook.hooks


def test_overrides():
    recipe = Recipe((ScaleConfig(),), name="scale")
    assert recipe.with_overrides(factor=0.1).plugins[0].factor == 0.1
    assert recipe.with_overrides(test_attention_scale__factor=0.2).plugins[0].factor == 0.2
    with pytest.raises(ValueError, match="matches no plugin field.*test-attention-scale: version, steps, layers, factor"):
        recipe.with_overrides(intervall=3)
    with pytest.raises(ValueError, match="factor = -1"):
        recipe.with_overrides(factor=-1)
    two = Recipe((ScaleConfig(steps=(0, 1)), ReuseConfig(steps=(1, 2))))
    with pytest.raises(ValueError, match="ambiguous"):
        two.with_overrides(steps=(0, 3))
    with pytest.raises(ValueError, match="matches no plugin field.*has no plugins"):
        load_recipe("none", interval=3)


def test_bad_recipe_inputs(tmp_path):
    with pytest.raises(ValueError, match="unknown recipe 'nope'; named recipes: .*fora.*none"):
        load_recipe("nope")
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        load_recipe("none+nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_recipe(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [unclosed")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_recipe(bad)
    unknown_type = tmp_path / "t.toml"
    unknown_type.write_text('name = "x"\n[[plugins]]\ntype = "warp-drive"\n')
    with pytest.raises(ValueError, match="unknown plugin type 'warp-drive'; known types: .*test-attention-counter"):
        load_recipe(unknown_type)
    unknown_field = tmp_path / "f.toml"
    unknown_field.write_text('name = "x"\n[[plugins]]\ntype = "test-attention-scale"\nfactr = 1.0\n')
    with pytest.raises(ValueError, match="has no field\\(s\\) factr; its fields: version, steps, layers, factor"):
        load_recipe(unknown_field)
    future = tmp_path / "v.toml"
    future.write_text('format = 9\nname = "x"\n')
    with pytest.raises(ValueError, match="recipe format 9 is not supported"):
        load_recipe(future)
    with pytest.raises(TypeError, match="recipe must be"):
        load_recipe(3)
    with pytest.raises(TypeError, match="PluginConfig instances"):
        Recipe(("fora",))


def test_registry_maps_types_to_configs():
    types = config_types()
    assert types["test-attention-scale"] is ScaleConfig
    assert config_from_dict({"type": "test-attention-scale", "factor": 0.5}) == ScaleConfig(factor=0.5)
