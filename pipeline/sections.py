"""The recipe's stage sections, each generated from its operation's settings model (the one `repq <command>`
builds its flags from), so a setting has one name, one default and one set of checks everywhere.

A section holds its model's fields less those the recipe sets once at the top (model, data, seed), plus
`enabled`; sweeping sections also take `sweep`, a grid of field values each combination of which is one run
(``sweep: {method: [repq, bnest_corrected], bits: [8, 4]}``; `bits` sets w_bits and a_bits together).
"""

from __future__ import annotations

import itertools
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from repq.engines.config import BenchConfig, EngineConfig, ExportConfig
from repq.quant.config import DoctorConfig, FinetuneConfig, PTQConfig, QATConfig
from repq.training.config import SubstituteConfig, TrainConfig


class StageSettings(BaseModel):
    """Base of every stage section: unknown keys are errors, assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    enabled: bool = True


# Settings the recipe holds once at its top, per operation: field -> recipe key.
FROM_RECIPE: dict[type[BaseModel], dict[str, str]] = {
    TrainConfig: {"model": "model.name", "width_mult": "model.width_mult", "model_kwargs": "model.kwargs",
                  "convert": "model.convert",
                  "seed": "seed", "split_seed": "data.split_seed", "preset": "data.preset",
                  "val_size": "data.val_size", "num_workers": "data.workers"},
    PTQConfig: {"seed": "seed"},
    DoctorConfig: {"seed": "seed"},
    QATConfig: {"seed": "seed"},
    FinetuneConfig: {"seed": "seed"},
}
SWEEP_ALIASES = {"bits": ("w_bits", "a_bits")}


def section(config: type[BaseModel], name: str, *, sweep: dict | None = None, enabled: bool = True,
            **extra: Any) -> type[StageSettings]:
    """The recipe section of ``config``: its fields less FROM_RECIPE's, ``enabled``, ``extra`` fields
    ((annotation, Field) pairs) and, when ``sweep`` is given (its default grid), a validated ``sweep``."""
    skip = FROM_RECIPE.get(config, {})
    fields: dict[str, Any] = {n: (f.annotation, f) for n, f in config.model_fields.items() if n not in skip}
    fields["enabled"] = (bool, Field(enabled, description="run this stage"))
    fields.update(extra)
    # Every run the section asks for is built into ``config`` once here, so the operation's own checks across
    # its settings (TrainConfig: low_res_epochs needs low_res) refuse the recipe before any stage starts.
    validators = {"_runs_valid": model_validator(mode="after")(_check_sweep(config))}
    if sweep is not None:
        fields["sweep"] = (dict[str, list[Any]], Field(default_factory=lambda: dict(sweep), description=(
            "a grid of settings to run every combination of, e.g. {method: [repq, bnest_corrected], bits: [8, 4]}"
            " (bits sets w_bits and a_bits)")))
    model = create_model(name, __base__=StageSettings, __module__=__name__, __validators__=validators, **fields)
    model.operation = config
    return model


def _check_sweep(config: type[BaseModel]):
    def check(self):
        for combination in runs(self, config):
            try:
                config(**combination)  # each run must be valid, before any stage starts
            except ValidationError as err:
                first = err.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                message = first["msg"].removeprefix("Value error, ")
                grid = getattr(self, "sweep", None) or {}
                if not grid:  # a check across the section's settings: its message names them
                    raise ValueError(f"{where}: {message}" if where else message) from None
                swept = {k: combination[SWEEP_ALIASES.get(k, (k,))[0]] for k in grid}
                raise ValueError(f"the run {swept} of the sweep has a bad {where or 'combination'}: "
                                 f"{message}") from None
        return self

    return check


def runs(section_settings: BaseModel, config: type[BaseModel]) -> list[dict]:
    """The settings of every run a sweeping section asks for (one when ``sweep`` is empty), as ``config``
    fields; the fields the recipe sets at its top are the caller's to add."""
    base = section_settings.model_dump(exclude={"enabled", "sweep"})
    base = {k: v for k, v in base.items() if k in config.model_fields}
    grid = getattr(section_settings, "sweep", {}) or {}
    for key, values in grid.items():
        known = key in config.model_fields or key in SWEEP_ALIASES
        if not known:
            import difflib

            close = difflib.get_close_matches(key, list(config.model_fields) + list(SWEEP_ALIASES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"sweep key {key!r} is no setting of this stage{hint}")
        if not values:
            raise ValueError(f"sweep {key} lists no values: give at least one")
    combos = []
    for values in itertools.product(*grid.values()):
        run = dict(base)
        for key, value in zip(grid, values, strict=True):
            for field in SWEEP_ALIASES.get(key, (key,)):
                run[field] = value
        combos.append(run)
    return combos or [base]


TrainSection = section(TrainConfig, "TrainSection")
SubstituteSection = section(SubstituteConfig, "SubstituteSection")
PTQSection = section(PTQConfig, "PTQSection", sweep={"method": ["max", "entropy", "percentile", "mse"]})
DoctorSection = section(DoctorConfig, "DoctorSection")
QATSection = section(QATConfig, "QATSection", enabled=False, calibrator=(
    PTQConfig.model_fields["method"].annotation,
    Field("max", description="which PTQ model (by calibrator) the QAT starts from")))
RepQSection = section(FinetuneConfig, "RepQSection", sweep={})
ExportSection = section(ExportConfig, "ExportSection")
EngineSection = section(EngineConfig, "EngineSection")
BenchSection = section(BenchConfig, "BenchSection")
ReportSection = create_model("ReportSection", __base__=StageSettings, __module__=__name__, violins=(
    bool, Field(True, description="per-layer weight violin plots of the fused model")))
