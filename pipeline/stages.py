"""The stage table: the one place a stage is named, with its recipe section, the function that does it and
the stages whose outputs it reads. The recipe schema, `--from` choices and the runner all read it.

A stage function takes a :class:`StageContext` and returns a :class:`StageResult` (or a dict with
``outputs`` and ``metrics``). It writes only under ``ctx.dir``, a temp folder that the runner renames into
``<run>/<stage>/`` when the function returns, so a killed stage never leaves a folder that looks finished.

Functions are registered as ``"module:function"`` strings and imported only when their stage runs, so
`repq recipe --show` and `repq --help` never import torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from repq.errors import RepqError
from repq.pipeline import sections
from repq.pipeline.sections import StageSettings

if TYPE_CHECKING:
    from repq.pipeline.recipe import Recipe


@dataclass
class StageResult:
    outputs: dict[str, str] = field(default_factory=dict)  # artifact name -> path inside the stage folder
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageRecord:
    """A finished stage as its verified manifest describes it."""

    name: str
    dir: Path
    key: str
    manifest: dict[str, Any]

    @property
    def outputs(self) -> dict[str, Path]:
        return {k: self.dir / v for k, v in self.manifest.get("outputs", {}).items()}

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})

    @property
    def files(self) -> dict[str, str]:
        return self.manifest.get("files", {})


@dataclass
class StageContext:
    name: str
    recipe: Recipe
    settings: StageSettings
    dir: Path  # the temp folder the stage writes into
    run_dir: Path
    upstream: dict[str, StageRecord]  # finished stages this one reads, in pipeline order
    log: Callable[[str], None] = print
    # True when ``dir`` holds what an interrupted attempt at this same key left (e.g. last.pt): the stage may
    # continue from it. Nothing in it was verified; a stage that cannot resume should start over.
    resume: bool = False
    # Under torchrun a `distributed` stage runs on every rank with the same ``dir`` (to read a resume from);
    # only rank 0 may write into it.
    rank: int = 0
    world_size: int = 1

    def path(self, relative: str) -> Path:
        """A path inside the stage's folder, its parent created."""
        target = self.dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def input(self, stage: str, output: str) -> Path:
        record = self.upstream.get(stage)
        if record is None:
            raise RepqError(f"stage {self.name} needs stage {stage}, which did not run: "
                            f"enable stages.{stage}")
        if output not in record.outputs:
            have = ", ".join(record.outputs) or "nothing"
            raise RepqError(f"stage {stage} wrote no {output!r} (it wrote {have}): rerun with --from {stage}")
        return record.outputs[output]

    def latest(self, output: str) -> Path:
        """The artifact ``output`` of the last upstream stage that wrote one (substitute's over train's)."""
        for record in reversed(list(self.upstream.values())):
            if output in record.outputs:
                return record.outputs[output]
        raise RepqError(
            f"stage {self.name} needs an artifact {output!r} and no earlier stage wrote one: "
            "enable stages.train"
        )


@dataclass(frozen=True)
class Stage:
    name: str
    target: str | Callable[[StageContext], Any]  # "module:function" or the function itself
    needs: tuple[str, ...] | None = None  # stages whose outputs it reads; None: every earlier stage
    distributed: bool = False  # runs on every torchrun rank (data-parallel training); else on rank 0 only
    settings: type[StageSettings] = StageSettings  # its recipe section
    help: str = ""

    def function(self) -> Callable[[StageContext], Any]:
        if callable(self.target):
            return self.target
        module, _, attr = self.target.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise RepqError(
                f"stage {self.name}: cannot load {self.target} ({err}); "
                f"reinstall repq or switch the stage off with stages.{self.name}.enabled=false"
            ) from err

    def upstream_names(self) -> tuple[str, ...]:
        if self.needs is not None:
            return self.needs
        return STAGE_ORDER[: STAGE_ORDER.index(self.name)]


# The stages in pipeline order: name, recipe section, what it reads, whether it runs on every torchrun rank. A
# stage's metrics feed the report: "ladder" entries and "methods" rows (engines/report.py); an output named
# "checkpoint" or "fused" gets weight violins; a *.jsonl file in its folder gets training curves.
_RUN = "repq.pipeline.run_stages"
STAGES: tuple[Stage, ...] = (
    Stage("train", f"{_RUN}:train_stage", (), True, sections.TrainSection, "full-precision training"),
    Stage("substitute", f"{_RUN}:substitute_stage", ("train",), True, sections.SubstituteSection,
          "RepVGG -> QARepVGG blocks, then training with plain L2"),
    Stage("ptq", f"{_RUN}:ptq_stage", ("train", "substitute"), False, sections.PTQSection,
          "toolkit PTQ of every trained model with every calibrator of the sweep"),
    Stage("doctor", f"{_RUN}:doctor_stage", ("train", "substitute"), False, sections.DoctorSection,
          "why INT8 loses accuracy, per layer and engine, for every trained model"),
    Stage("qat", f"{_RUN}:qat_stage", ("train", "substitute", "ptq"), True, sections.QATSection,
          "toolkit QAT of the last trained model's PTQ model"),
    Stage("repq", f"{_RUN}:repq_stage", ("train", "substitute"), False, sections.RepQSection,
          "RepQ fine-tuning of the last trained model, one per run of the sweep"),
    Stage("export", f"{_RUN}:export_stage", ("train", "substitute", "ptq", "qat", "repq"), False,
          sections.ExportSection, "QDQ ONNX per quantized model and placement, and the FP32 ONNX"),
    Stage("engine", f"{_RUN}:engine_stage", ("export",), False, sections.EngineSection,
          "accuracy of every exported file on every engine target"),
    Stage("bench", f"{_RUN}:bench_stage", ("export",), False, sections.BenchSection,
          "latency and throughput of every engine"),
    Stage("report", None, (), False, sections.ReportSection, "report.md, report.html, metrics.json"),
)
STAGE_ORDER: tuple[str, ...] = tuple(stage.name for stage in STAGES)
REGISTRY: dict[str, Stage] = {stage.name: stage for stage in STAGES if stage.target is not None}


def register(name: str, target: str | Callable[[StageContext], Any], needs: tuple[str, ...] | None = None,
             registry: dict[str, Stage] | None = None, distributed: bool = False) -> Stage:
    """Put ``target`` in place of stage ``name``'s function (tests and plug-ins; the table above is the default)."""
    if name not in STAGE_ORDER:
        raise ValueError(f"stage {name!r} is not one of {STAGE_ORDER}")
    stage = Stage(name, target, needs, distributed, _SECTIONS[name])
    (REGISTRY if registry is None else registry)[name] = stage
    return stage


_SECTIONS = {stage.name: stage.settings for stage in STAGES}


def as_result(value: Any) -> StageResult:
    if value is None:
        return StageResult()
    if isinstance(value, StageResult):
        return value
    if isinstance(value, dict):
        return StageResult(dict(value.get("outputs", {})), dict(value.get("metrics", {})))
    raise TypeError(f"a stage function returns StageResult, a dict or None, not {type(value).__name__}")
