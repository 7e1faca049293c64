"""The recipe schema: example recipes load, errors are one line with the key path, overrides, hashes."""

from __future__ import annotations

from pathlib import Path

import pytest

from repq.errors import RepqError
from repq.pipeline.recipe import (
    EMBEDDED_DEFAULT,
    Recipe,
    load_recipe,
    parse_override,
    settings_hash,
    train_settings,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_the_five_example_recipes_are_there():
    names = {p.stem for p in RECIPES}
    assert {"default", "cifar10_repvgg_vs_qarepvgg", "cifar10_repq_8_4bit", "imagenet_repvgg_a0",
            "ecbsr_x2"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_example_recipe_loads_and_round_trips(path, tmp_path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    # What `repq recipe --show` prints is itself a valid recipe that loads to the same thing.
    shown = tmp_path / "shown.yaml"
    shown.write_text(recipe.to_yaml())
    assert load_recipe(shown) == recipe


def test_recipes_default_yaml_is_the_embedded_default():
    assert load_recipe(ROOT / "recipes" / "default.yaml") == load_recipe(None)
    assert load_recipe(None).model.width_mult == EMBEDDED_DEFAULT["model"]["width_mult"]


def test_unknown_key_gets_one_line_with_path_suggestion_and_allowed_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  train:\n    epoch: 3\n    lr: -1\n"
                   "  ptq:\n    sweep: {method: [max, hist]}\nmodle: {}\n")
    with pytest.raises(RepqError) as info:
        load_recipe(bad)
    lines = str(info.value).splitlines()
    assert len(lines) == 4, lines  # one line per problem
    by_key = {line.split(": ")[1]: line for line in lines}
    assert "did you mean 'epochs'?" in by_key["stages.train.epoch"]
    assert "allowed here:" in by_key["stages.train.epoch"] and "weight_decay" in by_key["stages.train.epoch"]
    assert "greater than 0" in by_key["stages.train.lr"] and "(got -1)" in by_key["stages.train.lr"]
    assert "the run {'method': 'hist'} of the sweep has a bad method" in by_key["stages.ptq"]
    assert "'max', 'entropy', 'percentile', 'mse' or 'auto'" in by_key["stages.ptq"]
    assert "did you mean 'model'?" in by_key["modle"]
    assert all(line.startswith(str(bad)) for line in lines)


def test_key_in_the_wrong_section_points_to_the_right_one():
    with pytest.raises(RepqError, match=r"epochs: unknown key; did you mean 'stages\.train\.epochs'"):
        load_recipe(None, ["epochs=3"])
    with pytest.raises(RepqError, match=r"stages\.train\.model: unknown key; did you mean 'model\.name'"):
        load_recipe(None, ["stages.train.model=resnet18"])


def test_renamed_keys_say_what_replaced_them():
    with pytest.raises(RepqError, match=r"stages\.ptq\.calibrators: unknown key; renamed: write "
                                        r"stages\.ptq\.sweep=\{method: \[max, entropy\]\}"):
        load_recipe(None, ["stages.ptq.calibrators=[max,entropy]"])
    with pytest.raises(RepqError, match="bnest is now bnest_corrected"):
        load_recipe(None, ["stages.repq.modes=[bnest]"])


def test_every_value_a_stage_would_refuse_is_refused_by_the_recipe():
    """The sections are the operations' own settings: what QAT, PTQ or a fine-tune would refuse at its start,
    the recipe refuses before any stage runs (each combination of a sweep too)."""
    cases = [("stages.qat.epochs=0", "stages.qat.epochs"), ("stages.ptq.calib_size=0", "calib_size"),
             ("stages.repq.w_bits=9", "w_bits"), ("stages.train.device=gpu", "device"),
             ("stages.repq.method=bnest", "method"),
             ("stages.repq.sweep={bits: [8, 1]}", r"the run \{'bits': 1\} of the sweep has a bad w_bits")]
    for override, field in cases:
        with pytest.raises(RepqError, match=field) as info:
            load_recipe(None, [override])
        assert "\n" not in str(info.value), override


def test_bare_words_in_lists_and_mappings():
    recipe = load_recipe(None, ["stages.ptq.sweep.method=[max,entropy]", "stages.repq.sweep={method: [repq, bn]}",
                                "stages.engine.targets=[onnxruntime,openvino]"])
    assert recipe.stages.ptq.sweep == {"method": ["max", "entropy"]}
    assert recipe.stages.repq.sweep == {"method": ["repq", "bn"]}
    assert recipe.stages.engine.targets == ["onnxruntime", "openvino"]


def test_overrides_are_literals_applied_before_validation():
    recipe = load_recipe(None, ["stages.train.epochs=3", "stages.ptq.sweep={'method': ['max']}",
                                "model.name=resnet18", "stages.qat.enabled=true", "model.width_mult=none",
                                "stages.train.lr=1e-3", "model.kwargs.deploy=False"])
    assert recipe.stages.train.epochs == 3 and recipe.stages.ptq.sweep == {"method": ["max"]}
    assert recipe.model.name == "resnet18" and recipe.stages.qat.enabled is True
    assert recipe.model.width_mult is None and recipe.stages.train.lr == 1e-3
    assert recipe.model.kwargs == {"deploy": False}
    assert parse_override("data.source=/a/b=c") == ("data.source", "/a/b=c")
    assert parse_override('model.kwargs={"deploy": false, "in_chans": 1}') == ("model.kwargs",
                                                                             {"deploy": False, "in_chans": 1})
    with pytest.raises(RepqError, match="not key=value"):
        load_recipe(None, ["epochs"])
    with pytest.raises(RepqError, match=r"seed: Input should be a valid integer.*\(got 'abc'\)"):
        load_recipe(None, ["seed=abc"])
    with pytest.raises(RepqError, match="name is a value, not a section"):
        load_recipe(None, ["model.name.x=1"])


def test_file_problems_are_one_line(tmp_path):
    with pytest.raises(RepqError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("stages:\n  train: [1, 2\n")
    with pytest.raises(RepqError, match=r"not valid YAML at line \d+") as info:
        load_recipe(broken)
    assert "\n" not in str(info.value)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(RepqError, match="not a mapping"):
        load_recipe(listing)


def test_settings_hash_tracks_settings_not_key_order_or_progress():
    a = Recipe().stages.ptq
    assert settings_hash(a) == settings_hash(a.model_copy())
    assert settings_hash(a) != settings_hash(a.model_copy(update={"calib_size": 7}))
    assert settings_hash({"x": 1, "y": 2}) == settings_hash({"y": 2, "x": 1})
    train = Recipe().stages.train
    if "progress" in type(train).model_fields:
        flipped = train.model_copy(update={"progress": not train.progress})
        assert settings_hash(train) == settings_hash(flipped)


def test_train_settings_combine_the_stage_with_model_data_and_seed():
    recipe = load_recipe(None, ["seed=5", "data.preset=cifar", "stages.train.epochs=2"])
    settings = train_settings(recipe)
    assert (settings.model, settings.width_mult, settings.seed, settings.preset, settings.epochs) == \
        ("repvgg_a0", 0.5, 5, "cifar", 2)


def test_model_convert_reparametrizes_a_torchvision_cnn():
    from repq.reparam import ACBlock
    from repq.training.train import build_model

    settings = train_settings(load_recipe(None, ["model.name=resnet18", "model.width_mult=none",
                                                 "model.convert=acb"]))
    assert settings.convert == "acb"
    model = build_model(settings, num_classes=10, cifar=True)
    blocks = [m for m in model.modules() if isinstance(m, ACBlock)]
    assert len(blocks) == 17  # every 3x3 conv+BN of ResNet-18 (7x7 stem and 1x1 shortcuts stay plain)
    assert model.repq_arch["transforms"] == ["convert_convs:acb"]


def test_repq_bn_schedule_settings_are_validated():
    recipe = load_recipe(None, ["stages.repq.freeze_bn_at=0.8", "stages.repq.recalibrate_bn=100",
                                "stages.repq.distill=1.0"])
    assert (recipe.stages.repq.freeze_bn_at, recipe.stages.repq.recalibrate_bn) == (0.8, 100)
    assert load_recipe(None).stages.repq.freeze_bn_at is None  # off unless asked for
    with pytest.raises(RepqError, match="freeze_bn_at"):
        load_recipe(None, ["stages.repq.freeze_bn_at=1.0"])
    with pytest.raises(RepqError, match="distill"):
        load_recipe(None, ["stages.repq.distill=2"])
