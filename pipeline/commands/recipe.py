"""`repq recipe`: check a recipe and print it resolved, every default filled in.

    repq recipe --show                          # the embedded default that `repq run` uses
    repq recipe recipes/cifar10_repq_8_4bit.yaml --show stages.repq.bits=[8]

Overrides are KEY=VALUE with dotted keys (stages.train.epochs=3); values are literals (3, 0.1, true, none,
[8, 4]) or plain words. A mistyped key or a bad value gets one line naming the key and what is allowed.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument("items", nargs="*", metavar="RECIPE|KEY=VALUE",
                        help="a recipe YAML (default: the embedded default), then overrides")
    parser.add_argument("--show", action="store_true", help="print the resolved recipe as YAML")


def run(args: argparse.Namespace) -> int:
    from repq.pipeline.recipe import load_recipe, split_items
    from repq.pipeline.stages import STAGE_ORDER

    path, overrides = split_items(args.items)
    recipe = load_recipe(path, overrides)
    if args.show:
        print(recipe.to_yaml(), end="")
        return 0
    _check_model(recipe.model.name, path)  # only here: --show stays free of torch
    enabled = [name for name in STAGE_ORDER if recipe.stage(name).enabled]
    print(f"recipe {path or '(embedded default)'} is valid: {recipe.name}, model {recipe.model.name} on "
          f"{recipe.data.source}; stages {', '.join(enabled)}")
    return 0


def _check_model(name: str, path: str | None) -> None:
    """A recipe is valid only when its model exists: a zoo name or a torchvision classifier's."""
    import difflib

    from repq.errors import RepqError
    from repq.reparam.models import MODELS, _torchvision_factory

    if name in MODELS or _torchvision_factory(name) is not None:
        return
    close = difflib.get_close_matches(name, MODELS, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "`repq models` lists them"
    raise RepqError(f"recipe {path or '(embedded default)'}: model.name {name!r} is no model repq knows: {hint}")
