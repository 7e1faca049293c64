"""Settings declared once: a command's flags and the recipe's section come from the same settings model, so every
setting is reachable from both, under one name, with one default."""

from __future__ import annotations

import argparse

import pytest

from repq.errors import RepqError
from repq.pipeline.commands import finetune as finetune_command
from repq.pipeline.flags import config_from_args, flag_name
from repq.pipeline.recipe import apply_overrides, stage_config, validate_recipe
from repq.pipeline.sections import FROM_RECIPE
from repq.quant.config import FinetuneConfig

# A value other than the default for every setting: a new setting must be added here, and so gets checked.
OTHER_VALUES = {
    "method": "bn", "w_bits": 4, "a_bits": 6, "act_unsigned": True, "first_last_bits": 6, "epochs": 2.5,
    "max_steps_per_epoch": 5,
    "batch_size": 32, "lr": 0.002, "weight_decay": 1e-4, "label_smoothing": 0.1, "distill": 0.5,
    "recalibrate_bn": 7, "freeze_bn_at": 0.75, "init": "max", "weight_init": "minerror", "seed": 3,
    "device": "cpu", "save_every": 9, "progress": False,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    finetune_command.add_arguments(parser)
    return parser


def _cli(*flags: str) -> FinetuneConfig:
    return config_from_args(_parser().parse_args(["--checkpoint", "c.pt", "--out", "o", *flags]), FinetuneConfig)


def _recipe(*overrides: str) -> FinetuneConfig:
    """The repq stage's settings of a recipe that writes nothing but ``overrides``."""
    return stage_config(validate_recipe(apply_overrides({}, overrides)), "repq")


def test_the_finetune_defaults_are_the_same_from_the_flags_the_recipe_and_python():
    assert _cli() == _recipe() == FinetuneConfig()


@pytest.mark.parametrize("name", list(FinetuneConfig.model_fields))
def test_every_finetune_setting_is_a_flag_and_a_recipe_key(name):
    assert set(OTHER_VALUES) == set(FinetuneConfig.model_fields)
    value = OTHER_VALUES[name]
    assert value != FinetuneConfig.model_fields[name].default
    if isinstance(value, bool):
        flags = [flag_name(name) if value else "--no-" + name.replace("_", "-")]
    else:
        flags = [flag_name(name), str(value)]
    recipe_key = FROM_RECIPE[FinetuneConfig].get(name, f"stages.repq.{name}")
    from_cli, from_recipe = _cli(*flags), _recipe(f"{recipe_key}={value}")
    assert getattr(from_cli, name) == getattr(from_recipe, name) == value
    assert from_cli == from_recipe  # nothing else moved


def test_a_bad_value_is_refused_in_one_line_by_both():
    with pytest.raises(RepqError, match=r"--w-bits \(setting w_bits\): Input should be less than or equal to 8"):
        _cli("--w-bits", "9")
    with pytest.raises(RepqError, match=r"stages\.repq\.w_bits: Input should be less than or equal to 8"):
        _recipe("stages.repq.w_bits=9")
