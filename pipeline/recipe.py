"""The recipe: one YAML file saying which model, data and stages a run does, validated by pydantic.

Settings are data apart from mechanism: each stage has one settings model here (or in the stage's own
module), every model forbids unknown keys, and every field has a default, so ``Recipe()`` *is* the embedded
default that ``repq run`` uses with no recipe. ``key=value`` overrides (dotted: ``stages.train.epochs=3``) are
applied to the raw mapping before validation, so a mistyped override gets the same one-line error as a
mistyped key in the file.
"""

from __future__ import annotations

import ast
import copy
import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from repq.errors import RepqError


class Strict(BaseModel):
    """Base of every recipe section: unknown keys are errors, assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------- model and data


class ModelSpec(Strict):
    name: str = Field("repvgg_a0", description="zoo name (`repq models`), or a torchvision CNN's name")
    convert: Literal["acb", "dbb", "orepa", "repvgg", "plain"] | None = Field(
        None, description="re-parametrize the model's convs with convert_convs(model, <block>), e.g. acb")
    width_mult: float | None = Field(None, gt=0, description="channel width multiplier (None: the model's)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="more keyword arguments to create_model")
    checkpoint: str | None = Field(
        None, description="start from this checkpoint instead of FP training: a repq checkpoint, or an official "
        "RepVGG / timm one (imported as `repq import` does); the stage key follows its sha256")


class DataSpec(Strict):
    source: str = Field(
        "digits",
        description="'digits' (scikit-learn's bundled images), an ImageFolder (ROOT/<class>/*, or "
        "ROOT/train/ and ROOT/val/), or for super-resolution a folder of images",
    )
    val_source: str | None = Field(
        None, description="a separate validation set (ImageNet's val/ is found by itself; Set5 for SR)"
    )
    task: Literal["classification", "super_resolution"] = "classification"
    preset: Literal["auto", "cifar", "imagenet", "digits"] = Field(
        "auto", description="input size and normalisation; auto: cifar for images up to 64 pixels"
    )
    val_size: float = Field(0.1, gt=0, description="val split carved from train when there is no val/: "
                            "a fraction, or a count when >= 1")
    split_seed: int = Field(0, ge=0, description="seed of the val split (kept apart from the training seed)")
    workers: int = Field(0, ge=0, description="data-loader worker processes")
    scale: int = Field(2, ge=2, le=4, description="super-resolution factor")
    patch: int = Field(32, ge=8, description="super-resolution: low-resolution training patch size (pixels)")
    patches_per_image: int = Field(32, ge=1, description="super-resolution: training patches per image and epoch")


# ---------------------------------------------------------------- stages


def _stages_model() -> type[BaseModel]:
    """The `stages` section: one sub-section per row of the stage table (pipeline/stages.py)."""
    from repq.pipeline.stages import STAGES

    fields = {stage.name: (stage.settings, Field(default_factory=stage.settings)) for stage in STAGES}
    checks = {"_qat_starts_from_a_ptq_model": model_validator(mode="after")(_check_qat_source)}
    return create_model("Stages", __base__=Strict, __module__=__name__, __validators__=checks, **fields)


def _check_qat_source(stages):
    """The QAT stage starts from the PTQ model of its calibrator: refused here, not after training and PTQ."""
    from repq.pipeline.sections import runs
    from repq.quant.config import PTQConfig

    qat, ptq = stages.qat, stages.ptq
    if not qat.enabled:
        return stages
    methods = sorted({run["method"] for run in runs(ptq, PTQConfig)}) if ptq.enabled else []
    if not methods:
        raise ValueError(f"stages.qat.calibrator={qat.calibrator} has no PTQ model to start from (stages.ptq is "
                         "switched off): enable stages.ptq, or switch stages.qat off")
    if qat.calibrator not in methods:
        raise ValueError(f"stages.qat.calibrator={qat.calibrator} has no PTQ model to start from (stages.ptq makes "
                         f"{', '.join(methods)}): add {qat.calibrator} to stages.ptq.sweep's method list, or pick "
                         "one it makes")
    return stages


Stages = _stages_model()


class Recipe(Strict):
    name: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="runs/<name>/")
    seed: int = Field(0, ge=0)
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    stages: Stages = Field(default_factory=Stages)

    def stage(self, name: str) -> BaseModel:
        from repq.pipeline.stages import STAGE_ORDER

        if name not in STAGE_ORDER:
            known = ", ".join(STAGE_ORDER)
            raise RepqError(f"unknown stage {name!r}{_suggest(name, STAGE_ORDER)}; stages are {known}")
        return getattr(self.stages, name)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_RecipeDumper, sort_keys=False, width=110)


class _RecipeDumper(yaml.SafeDumper):
    """Block style for sections, flow style for short lists (``calibrators: [max, entropy]``)."""


_RecipeDumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


# ---------------------------------------------------------------- hashing


# Settings that change how a stage reports, not what it computes: left out of its hash.
NOT_HASHED = frozenset({"progress"})


def settings_hash(obj: BaseModel | dict | Any) -> str:
    """sha256 of the canonical JSON of a settings model (or any JSON-able value), NOT_HASHED keys left out."""
    data = obj.model_dump(mode="json", exclude=set(NOT_HASHED)) if isinstance(obj, BaseModel) else obj
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ---------------------------------------------------------------- loading, overrides, errors


# The embedded default that `repq run` uses with no recipe: the schema's defaults plus these
# (recipes/default.yaml is the same recipe written out). Small enough for a 2-core CPU in minutes.
EMBEDDED_DEFAULT: dict[str, Any] = {
    "name": "default",
    "model": {"name": "repvgg_a0", "width_mult": 0.5},
    "data": {"source": "digits"},
    "stages": {
        "train": {"epochs": 10},
        "substitute": {"epochs": 6},
        "ptq": {"sweep": {"method": ["max", "entropy", "percentile", "mse"]}, "calib_size": 256},
        "repq": {"method": "repq", "w_bits": 8, "a_bits": 8, "epochs": 3, "lr": 0.001},
        "export": {"targets": ["onnxruntime", "tensorrt"]},
        "engine": {"targets": ["onnxruntime"]},
    },
}


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe (None: the embedded default), apply ``key=value`` overrides, validate."""
    source = "default recipe"
    raw: dict[str, Any] = copy.deepcopy(EMBEDDED_DEFAULT) if path is None else {}
    if path is not None:
        path = Path(path)
        source = str(path)
        if path.is_dir():
            raise RepqError(f"recipe {path} is a folder, not a recipe file: pass the YAML file (e.g. {path}/NAME.yaml)")
        if not path.is_file():
            raise RepqError(f"recipe {path} does not exist: check the path, or run `repq run` with no recipe")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or type(err).__name__
            raise RepqError(f"recipe {path} is not valid YAML{where}: {problem}; fix the file") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            kind = type(loaded).__name__
            raise RepqError(f"recipe {path} holds a YAML {kind}, not a mapping of keys: fix the file")
        raw = loaded
        raw.setdefault("name", _default_name(path))
    return validate_recipe(apply_overrides(raw, overrides), source)


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``key=value`` overrides applied to a raw recipe mapping (in place; returned), before validation."""
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    return raw


def _default_name(path: Path) -> str:
    return path.stem if path.stem and path.stem[0].isalnum() else "recipe"


def validate_recipe(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        lines = [f"{source}: {_error_line(e)}" for e in err.errors()]
        raise RepqError("\n".join(lines)) from None


def parse_override(item: str) -> tuple[str, Any]:
    """``stages.train.epochs=3`` -> ("stages.train.epochs", 3). Values are literals, else strings."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RepqError(f"override {item!r} is not key=value: write e.g. stages.train.epochs=3")
    return key, parse_value(text.strip())


def parse_value(text: str) -> Any:
    """A Python literal, JSON, or YAML flow value (``[max, entropy]``, ``{method: [repq, bn]}``), else the
    text itself (a bare word: a model name, a path)."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null", "~"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    try:
        return json.loads(text)  # JSON spellings inside a value: {"deploy": false}
    except json.JSONDecodeError:
        pass
    if text[:1] in "[{":  # bare words inside brackets: YAML's flow style reads them
        try:
            return _none_words(yaml.safe_load(text.replace(":", ": ").replace(":  ", ": ")))
        except yaml.YAMLError:
            pass
    return text


def _none_words(value: Any) -> Any:
    if isinstance(value, list):
        return [_none_words(v) for v in value]
    if isinstance(value, dict):
        return {k: _none_words(v) for k, v in value.items()}
    return None if isinstance(value, str) and value.lower() == "none" else value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            prefix = ".".join(parts[: depth + 1])
            raise RepqError(f"override {key}: {prefix} is a value, not a section; write {prefix}=VALUE")
        node = child
    node[parts[-1]] = value


def _loc(err: dict) -> str:
    return ".".join(str(p) for p in err["loc"]) or "(top level)"


def _error_line(err: dict) -> str:
    loc = err["loc"]
    where = _loc(err)
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        hint = _suggest(str(loc[-1]), allowed) or _suggest_elsewhere(str(loc[-1]))
        return f"{where}: unknown key{hint}; allowed here: {', '.join(allowed)}"
    field = _field_at(loc)
    desc = f"; {field.description}" if field is not None and field.description else ""
    return f"{where}: {error_detail(err)}{desc}"


def error_detail(err: dict) -> str:
    """A pydantic error's message without its "Value error, " prefix, then the input it got, unless that is a
    whole mapping (a check across settings: its message names them, and the input is every setting)."""
    got = err.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return err["msg"].removeprefix("Value error, ") + shown


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The settings model that the location path ``loc`` points into (None past a leaf)."""
    model: type[BaseModel] | None = Recipe
    for part in loc:
        if model is None or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model


def _field_at(loc: tuple):
    if not loc:
        return None
    parent = _model_at(loc[:-1])
    if parent is None or loc[-1] not in parent.model_fields:
        return None
    return parent.model_fields[loc[-1]]


def _allowed_keys(loc: tuple) -> list[str]:
    model = _model_at(loc)
    return list(model.model_fields) if model is not None else []


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


# Keys of earlier recipe versions, and what replaced them.
RENAMED = {
    "calibrators": "renamed: write stages.ptq.sweep={method: [max, entropy]}",
    "modes": "renamed: write stages.repq.sweep={method: [repq, bnest_corrected]} (bnest is now bnest_corrected)",
    "bits": "renamed: write stages.repq.sweep={bits: [8, 4]}",
    "to": "removed: substitution always swaps RepVGG blocks for QARepVGG blocks",
}


def _all_keys(model: type[BaseModel] = Recipe, prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_all_keys(annotation, path + "."))
        else:
            keys.append(path)
    return keys


def _suggest_elsewhere(word: str) -> str:
    """A key that exists in another section (``epochs=3`` -> ``stages.train.epochs``), or a renamed one."""
    from repq.pipeline.sections import FROM_RECIPE

    leaf = word.split(".")[-1]
    if leaf in RENAMED:
        return f"; {RENAMED[leaf]}"
    hits = [k for k in _all_keys() if k.split(".")[-1] == leaf]
    if not hits:
        hits = sorted({key for fields in FROM_RECIPE.values() for name, key in fields.items() if name == leaf})
    return f"; did you mean {' or '.join(repr(h) for h in hits[:4])}?" if hits else ""


def load_recipe_data(spec: DataSpec):
    """The recipe's data: an ImageData (classification) or SRData (super-resolution)."""
    if spec.task == "super_resolution":
        from repq.calibration.sr import load_sr_data

        return load_sr_data(spec.source, spec.val_source, spec.scale, patch=spec.patch,
                            per_image=spec.patches_per_image, seed=spec.split_seed)
    from repq.calibration.datasets import load_data

    return load_data(spec.source, preset=spec.preset, val_size=spec.val_size, seed=spec.split_seed)


def recipe_value(recipe: Recipe, dotted: str) -> Any:
    """The value at a dotted recipe key (``data.split_seed``)."""
    node: Any = recipe
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def stage_config(recipe: Recipe, stage: str, config: type[BaseModel] | None = None, **run: Any):
    """The operation settings stage ``stage`` runs with: its section's fields, the ones the recipe holds at its
    top (seed, model, data), then ``run`` (one run of a sweep)."""
    from repq.pipeline.sections import FROM_RECIPE

    section = recipe.stage(stage)
    config = config or type(section).operation
    values = {k: v for k, v in section.model_dump().items() if k in config.model_fields}
    values.update({field: recipe_value(recipe, key) for field, key in FROM_RECIPE.get(config, {}).items()})
    values.update(run)
    return config(**values)


def train_settings(recipe: Recipe):
    """TrainConfig for this recipe: the train stage's section plus model, data and seed."""
    return stage_config(recipe, "train")


def split_items(items: list[str]) -> tuple[str | None, list[str]]:
    """(recipe path or None, overrides): the recipe is the one item without '=', first."""
    recipe = None
    overrides = []
    for position, item in enumerate(items):
        if "=" in item:
            overrides.append(item)
        elif position == 0:
            recipe = item
        else:
            raise RepqError(f"{item!r} is neither the recipe (it comes first) nor KEY=VALUE: "
                            "write e.g. `repq run recipe.yaml stages.train.epochs=3`")
    return recipe, overrides
