"""The stages of `repq run`: each is a thin shell over one library operation (the one its `repq` command calls):
it reads earlier stages' artifacts, calls, and records what it wrote into ``ctx.dir`` and its metrics.

Metrics feed the report (engines/report.py): ``ladder`` entries (one method's top-1 at each step: train form ->
fused -> fake-quant PyTorch -> QDQ ONNX in ONNX Runtime -> the INT8 engine) and ``methods`` rows (accuracy on an
engine, latency, throughput, size), merged by method/bits/engine. A quantized artifact is named by its method
(``qarepvgg_a0 PTQ max``, ``qarepvgg_a0 RepQ-BNEst(corrected) W4A4``), and that name follows it through export,
engine and bench.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from repq.errors import RepqError
from repq.pipeline.stages import StageContext

FLOAT_LABEL = "FP32"


# ------------------------------------------------------------------------------------------------ helpers


@functools.lru_cache(maxsize=4)
def _load(data_spec: str):
    from repq.pipeline.recipe import DataSpec, load_recipe_data

    return load_recipe_data(DataSpec.model_validate_json(data_spec))


def _data(ctx: StageContext):
    return _load(ctx.recipe.data.model_dump_json())


def _val_loader(data):
    from repq.calibration.loaders import build_loaders

    return build_loaders(data, min(64, len(data.train)), eval_batch_size=256)[1]


def _describe(result: dict) -> str:
    from repq.engines.timing import quality_key

    key = quality_key(result)
    return f"PSNR {result[key]:.2f} dB" if key == "psnr" else f"top-1 {result[key]:.2f}%"


def _slug(method: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", method).strip("_").lower()


def _checkpoints(ctx: StageContext) -> dict[str, tuple[Path, dict]]:
    """label -> (checkpoint, its train/fused ladder metrics) of every upstream training stage."""
    found = {}
    for record in ctx.upstream.values():
        if "checkpoint" in record.outputs:
            found[record.metrics["label"]] = (record.outputs["checkpoint"], record.metrics)
    if not found:
        raise RepqError(f"stage {ctx.name} needs a trained checkpoint: enable stages.train")
    return found


def _last_checkpoint(ctx: StageContext) -> tuple[str, Path, dict]:
    """(label, checkpoint, metrics) of the last trained model: the substituted one when substitution ran."""
    label, (path, trained) = list(_checkpoints(ctx).items())[-1]
    return label, path, trained


def _float_ladder(method: str, trained: dict) -> list[dict]:
    from repq.engines.timing import quality_key

    key = quality_key(trained)
    return [{"step": "train", "method": method, key: trained[f"val_{key}"]},
            {"step": "fused", "method": method, key: trained[f"deploy_val_{key}"]}]


def _quantized_artifacts(ctx: StageContext) -> dict[str, tuple[Path, str, int]]:
    """method -> (file, base, bits) of every quantized model written upstream (base: the label of the float
    model it comes from; bits: its weight bits)."""
    artifacts = {}
    for record in ctx.upstream.values():
        for method, entry in record.metrics.get("artifacts", {}).items():
            artifacts[method] = (record.dir / entry["file"], entry["base"], entry.get("bits", 8))
    return artifacts


def _step_cap(ctx: StageContext, own: int | None) -> int | None:
    """A training-like stage's steps per epoch: its own cap, else the train stage's (a quick run stays quick)."""
    return own if own is not None else ctx.recipe.stages.train.max_steps_per_epoch


# ------------------------------------------------------------------------------------------------ stages


def _trained_result(summary: dict, label: str) -> dict:
    """The training stages' record; their ladder row is named as the FP32 row of the methods table, so the
    export and engine stages' figures for the float file land in the same row."""
    best = summary["best"]
    return {"outputs": {"checkpoint": "best.pt", "last": "last.pt"},
            "metrics": {"label": label, "epochs": summary["epochs"],
                        **{k: v for k, v in best.items() if k.startswith(("val_", "deploy_val_"))},
                        "ladder": _float_ladder(f"{FLOAT_LABEL} {label}", best)}}


def train_stage(ctx: StageContext):
    from repq.pipeline.recipe import stage_config
    from repq.reparam.models import model_label
    from repq.training.train import train

    if ctx.recipe.model.checkpoint:
        return None if ctx.rank else checkpoint_stage(ctx)
    config = stage_config(ctx.recipe, "train")
    summary = train(config, _data(ctx), ctx.dir, resume=ctx.resume and (ctx.dir / "last.pt").exists(),
                    recipe=ctx.recipe.to_dict())
    label = model_label({"name": config.model, "transforms": [f"convert_convs:{config.convert}"]
                         if config.convert else []})
    return None if ctx.rank else _trained_result(summary, label)


def checkpoint_stage(ctx: StageContext):
    """The train stage of a recipe that starts from ``model.checkpoint``: no FP training; the checkpoint, imported
    when it is foreign (`repq import`, with the source's own strides), checked against the data's classes and given
    its data record, is this stage's output, scored in train and fused form like a trained one."""
    from repq.calibration.datasets import ImageData, check_record_classes
    from repq.pipeline.recipe import stage_config
    from repq.reparam.importers import import_checkpoint
    from repq.reparam.io import atomic_save
    from repq.reparam.models import model_label
    from repq.training.distributed import resolve_device, single_process
    from repq.training.evaluate import evaluate_with_deploy
    from repq.training.train import load_model_checkpoint

    source, data = ctx.recipe.model.checkpoint, _data(ctx)
    if not isinstance(data, ImageData):
        raise RepqError("model.checkpoint starts a classification recipe: use a classification data set, or train "
                        "the super-resolution model (leave model.checkpoint out)")
    # a trained model keeps the strides it was trained with; model.kwargs.cifar=true rebuilds the zoo's 32x32 stem
    ckpt = import_checkpoint(source, num_classes=data.num_classes, cifar=bool(ctx.recipe.model.kwargs.get("cifar")))
    check_record_classes(data, ckpt.get("data"))  # a repq checkpoint names its classes: they must be the data's
    ckpt.update(data=data.describe(), settings={**ckpt.get("settings", {}), "val_size": ctx.recipe.data.val_size,
                                                  "split_seed": ctx.recipe.data.split_seed})
    atomic_save(ckpt, ctx.path("best.pt"))
    model, _ = load_model_checkpoint(ctx.dir / "best.pt")
    device = resolve_device(stage_config(ctx.recipe, "train").device)
    metrics = evaluate_with_deploy(model.to(device), _val_loader(data), single_process(device), False)
    label = model_label(ckpt["arch"])
    ctx.log(f"  {label} from {source}, no FP training: val top-1 {metrics['val_top1']:.2f}% (fused "
            f"{metrics['deploy_val_top1']:.2f}%)")
    return {"outputs": {"checkpoint": "best.pt"},
            "metrics": {"label": label, "epochs": 0, "source": str(source), **metrics,
                        "ladder": _float_ladder(f"{FLOAT_LABEL} {label}", metrics)}}


def substitute_stage(ctx: StageContext):
    """RepVGG -> QARepVGG blocks (weights carried), then training with plain L2 (the QARepVGG paper's M1)."""
    from repq.pipeline.recipe import stage_config
    from repq.reparam.models import model_label
    from repq.training.train import substitute

    checkpoint = ctx.input("train", "checkpoint")
    summary = substitute(checkpoint, _data(ctx), stage_config(ctx.recipe, "substitute"), ctx.dir,
                         base=stage_config(ctx.recipe, "train"), recipe=ctx.recipe.to_dict(),
                         resume=ctx.resume and (ctx.dir / "last.pt").exists())
    from repq.reparam.io import load_checkpoint

    label = model_label(load_checkpoint(ctx.dir / "best.pt")["arch"]) if not ctx.rank else ""
    return None if ctx.rank else _trained_result(summary, label)


def ptq_stage(ctx: StageContext):
    """Toolkit PTQ of every trained checkpoint with every calibrator of the sweep; fake-quant accuracy."""
    from repq.pipeline.recipe import stage_config
    from repq.pipeline.sections import runs
    from repq.quant.config import PTQConfig
    from repq.quant.toolkit import ptq_checkpoint
    from repq.training.train import load_model_checkpoint

    data = _data(ctx)
    artifacts, ladder, fallbacks = {}, [], {}
    for label, (path, trained) in _checkpoints(ctx).items():
        model, _ = load_model_checkpoint(path)
        for run in runs(ctx.settings, PTQConfig):
            config = stage_config(ctx.recipe, "ptq", **run)
            method = f"{label} PTQ {config.method}"
            file = f"{_slug(method)}.pt"
            result = ptq_checkpoint(path, data, config, ctx.path(file), model=model,
                                    log=lambda line, m=method: ctx.log(f"  {m}: {line}"))
            artifacts[method] = {"kind": "toolkit", "file": file, "base": label, "bits": 8}
            ladder += [*_float_ladder(method, trained), {"step": "fakequant", "method": method,
                                                          **result["fakequant"]}]
            if "fallback" in result:
                fallbacks[method] = result["fallback"]
    fallback = {"fallback": fallbacks} if fallbacks else {}
    return {"outputs": {}, "metrics": {"artifacts": artifacts, "ladder": ladder, **fallback}}


def doctor_stage(ctx: StageContext):
    """`repq doctor` on every trained checkpoint (RepVGG and its QARepVGG substitute side by side): per layer,
    why INT8 loses accuracy and where each engine parts ways; the report's doctor sections."""
    from repq.pipeline.recipe import stage_config
    from repq.quant.doctor import diagnose_checkpoint

    data = _data(ctx)
    config = stage_config(ctx.recipe, "doctor")
    found = {}
    for label, (path, _) in _checkpoints(ctx).items():
        diagnosis = diagnose_checkpoint(path, data, config)
        ctx.log(f"  {label}: {diagnosis.verdict}")
        found[label] = diagnosis.as_dict()
    return {"outputs": {}, "metrics": {"doctor": found}}


def qat_stage(ctx: StageContext):
    """Toolkit QAT (the RepQ paper's Merged baseline): the PTQ model of the last trained checkpoint, fine-tuned
    with ModelOpt's fake quantizers and amax kept (resumable, torchrun-ready)."""
    from repq.pipeline.recipe import stage_config
    from repq.quant.qat import qat_file
    from repq.training.evaluate import evaluate

    s = ctx.settings
    label, _, trained = _last_checkpoint(ctx)
    source = f"{label} PTQ {s.calibrator}"
    artifacts = _quantized_artifacts(ctx)
    if source not in artifacts:
        raise RepqError(f"stages.qat.calibrator={s.calibrator} has no PTQ model to start from: add it to "
                        f"stages.ptq.sweep's method list")
    config = stage_config(ctx.recipe, "qat", max_steps_per_epoch=_step_cap(ctx, s.max_steps_per_epoch))
    result = qat_file(artifacts[source][0], _data(ctx), config, ctx.dir,
                      resume=ctx.resume and (ctx.dir / "last.pt").exists())
    if ctx.rank:
        return None
    method = f"{label} QAT {s.calibrator}"
    accuracy = evaluate(result["model"], _val_loader(_data(ctx)), progress=s.progress, desc=f"{method}: evaluate")
    accuracy.pop("count", None)
    return {"outputs": {}, "metrics": {
        "artifacts": {method: {"kind": "toolkit", "file": "best.pt", "base": label, "bits": 8}},
        "ladder": [*_float_ladder(method, trained), {"step": "fakequant", "method": method, **accuracy}]}}


def repq_stage(ctx: StageContext):
    """RepQ fine-tuning of the last trained model, one per run of the sweep. An interrupted attempt keeps the
    fine-tunes it finished and continues the one it was in from its last saved state."""
    from repq.pipeline.recipe import stage_config
    from repq.pipeline.sections import runs
    from repq.quant.config import FinetuneConfig
    from repq.quant.finetune import finetune_checkpoint
    from repq.reparam.io import load_checkpoint
    from repq.training.train import load_model_checkpoint

    data = _data(ctx)
    label, path, trained = _last_checkpoint(ctx)
    float_model, _ = load_model_checkpoint(path)
    artifacts, ladder = {}, []
    for run in runs(ctx.settings, FinetuneConfig):
        run["max_steps_per_epoch"] = _step_cap(ctx, run.get("max_steps_per_epoch"))
        config = stage_config(ctx.recipe, "repq", **run)
        method = f"{label} {config.label}"
        folder = ctx.dir / _slug(method)
        if ctx.resume and (folder / "repq.pt").exists():  # finished before the interruption
            ctx.log(f"  {method}: fine-tuned before the interruption, kept")
            fake = load_checkpoint(folder / "repq.pt")["metrics"]["fake_quant"]
        else:
            result = finetune_checkpoint(path, data, config, folder, resume=ctx.resume, export=False,
                                         float_model=float_model, log=lambda line, m=method: ctx.log(f"  {m}: {line}"))
            fake = result["metrics"]["fake_quant"]
        artifacts[method] = {"kind": "finetune", "file": f"{folder.name}/repq.pt", "base": label,
                             "bits": config.w_bits}
        fake = {k: v for k, v in fake.items() if k != "count"}
        ladder += [*_float_ladder(method, trained), {"step": "fakequant", "method": method, **fake}]
    return {"outputs": {}, "metrics": {"artifacts": artifacts, "ladder": ladder}}


def export_stage(ctx: StageContext):
    """QDQ ONNX per quantized model and per placement, plus the fused FP32 model as the engines' reference."""
    from repq.engines.targets import get_target
    from repq.progress import Progress
    from repq.quant.artifacts import export_artifact, load_artifact

    s = ctx.settings
    files = {}
    checkpoints, quantized = _checkpoints(ctx), _quantized_artifacts(ctx)
    placements = {get_target(t).placement for t in s.targets}
    with Progress(len(checkpoints) + len(quantized) * len(placements), "export", unit="file") as bar:
        for label, (path, _) in checkpoints.items():
            file = f"{_slug(label)}_fp32.onnx"
            export_artifact(load_artifact(path), ctx.path(file), "onnxruntime", opset=s.opset,
                            dynamic_batch=s.dynamic_batch)
            files[file] = {"method": f"{FLOAT_LABEL} {label}", "bits": 32, "placement": "float", "base": label}
            bar.update()
        for method, (path, base, bits) in quantized.items():
            artifact = load_artifact(path)
            for placement in sorted(placements):
                file = f"{_slug(method)}{get_target(placement).suffix}"
                export_artifact(artifact, ctx.path(file), placement, opset=s.opset, dynamic_batch=s.dynamic_batch)
                files[file] = {"method": method, "bits": bits, "placement": placement, "base": base}
                bar.update()
    return {"outputs": {}, "metrics": {"files": files}}


def _engine_runs(ctx: StageContext) -> tuple[list[tuple[Path, dict, str, bool]], list[str]]:
    """([(file, entry, engine, parity_only)], skipped) over every exported file and engine target of the recipe.

    A target runs the float file and the files of its placement (`engines.targets.TARGETS`): ONNX Runtime and
    OpenVINO run the FP32 file as it is, TensorRT builds its FP16 baseline from it and its INT8 engine from the
    QDQ file. ``parity_only``: ONNX Runtime running the TensorRT-placement file, the ladder's "QDQ ONNX" step,
    not an engine of the methods table. A target that cannot run a file here is listed in ``skipped`` with the
    one-line reason its table row gives (TensorRT without TensorRT or a GPU; OpenVINO not installed, or its INT8
    files on a CPU whose INT8 kernels it computes inexactly).
    """
    from repq.engines.targets import get_target

    export = ctx.upstream.get("export")
    if export is None:
        raise RepqError(f"stage {ctx.name} needs the export stage: enable stages.export")
    runs, skipped = [], []
    for file, entry in export.metrics["files"].items():
        for target in ctx.recipe.stages.engine.targets:
            row = get_target(target)
            if entry["placement"] not in ("float", row.placement):
                if target == "onnxruntime" and entry["placement"] == "tensorrt":
                    runs.append((export.dir / file, entry, target, True))
                continue
            reason = row.unavailable_reason(export.dir / file)
            if reason:
                skipped.append(f"{target}: {file} ({reason})")
            else:
                runs.append((export.dir / file, entry, target, False))
    return runs, skipped


def _open_stage_engine(ctx: StageContext, path: Path, entry: dict, target: str, threads: int | None = None):
    """(engine, bits) of one run of `_engine_runs`, opened with the recipe's settings for the options its table
    row reads. TensorRT builds its plan into this stage's folder: INT8 from a QDQ file, FP16 from the float file
    (its row's bits: 16), with a profile over the bench stage's batch sizes."""
    from repq.engines.engine import open_engine
    from repq.engines.targets import get_target

    options = get_target(target).select(
        threads=threads, precision="fp16" if entry["placement"] == "float" else "int8",
        batch_sizes=tuple(ctx.recipe.stages.bench.batch_sizes), workspace_gb=ctx.recipe.stages.engine.workspace_gb,
        plan_dir=ctx.dir)
    engine = open_engine(path, target, **options)
    return engine, 16 if getattr(engine, "precision", None) == "fp16" else entry["bits"]


def engine_stage(ctx: StageContext):
    """Accuracy measured on each engine itself, over the validation split.

    Ladder: ONNX Runtime on the TensorRT-placement file is a quantized method's "ONNX" step and on the
    ONNX Runtime-placement file its engine step; the FP32 file in ONNX Runtime is the FP32 row's ONNX step and
    engine step (the same session: ONNX Runtime runs the float file as it is)."""
    from repq.progress import Progress

    val = _val_loader(_data(ctx))
    runs, skipped = _engine_runs(ctx)
    for line in skipped:
        ctx.log(f"  skipped {line}")
    ladder, methods = [], []
    with Progress(len(runs), "engine: evaluate", unit="file") as bar:
        for path, entry, target, parity_only in runs:
            engine, bits = _open_stage_engine(ctx, path, entry, target)
            accuracy = engine.evaluate(val)
            bar.update()
            if parity_only:
                ladder.append({"step": "qdq_onnx", "method": entry["method"], **accuracy})
                continue
            if entry["placement"] == "float" and target == "onnxruntime":
                ladder += [{"step": step, "method": entry["method"], **accuracy} for step in ("qdq_onnx", "engine")]
            if entry["placement"] == "onnxruntime":
                ladder.append({"step": "engine", "method": entry["method"], **accuracy})
            methods.append({"method": entry["method"], "bits": bits, "engine": target, "base": entry["base"],
                            **accuracy})
            ctx.log(f"  {entry['method']} on {target}: {_describe(accuracy)}")
    return {"outputs": {}, "metrics": {"ladder": ladder, "methods": methods, "skipped": skipped}}


def bench_stage(ctx: StageContext):
    """Latency and throughput of each engine file at each batch size, and its size on disk.

    The methods table shows latency at the smallest batch and throughput at the largest, each row naming its
    batch (``latency_batch``, ``throughput_batch``); metrics.json's ``timings`` keep every batch size.
    """
    s = ctx.settings
    data = _data(ctx)
    image = data.input_shape[1:]
    from repq.progress import Progress

    runs, skipped = _engine_runs(ctx)
    runs = [r for r in runs if not r[3]]  # parity-only runs are accuracy steps, not engines to time
    methods, timings = [], []
    bar = Progress(len(runs), "bench", unit="file")
    for path, entry, target, _ in runs:
        engine, bits = _open_stage_engine(ctx, path, entry, target, s.threads)
        stats = engine.benchmark(image, s.batch_sizes, warmup=s.warmup, runs=s.iters)
        bar.update()
        small, large = min(stats, key=lambda x: x.batch_size), max(stats, key=lambda x: x.batch_size)
        methods.append({"method": entry["method"], "bits": bits, "engine": target,
                        "latency_ms": small.median_ms, "latency_batch": small.batch_size,
                        "throughput": large.fps, "throughput_batch": large.batch_size,
                        "size_mb": path.stat().st_size / 1e6})
        timings += [{"method": entry["method"], "engine": target, **x.as_dict()} for x in stats]
    bar.close()
    return {"outputs": {}, "metrics": {"methods": methods, "timings": timings, "skipped": skipped}}
