"""The stages of `repq run`: each reads earlier stages' artifacts and writes its own into ``ctx.dir``.

Every stage reports two kinds of metrics for the report (engines/report.py): ``ladder`` entries (the same
method's top-1 at each step: train form -> fused -> fake-quant PyTorch -> QDQ ONNX in ONNX Runtime -> the INT8
engine) and ``methods`` rows (accuracy on an engine, latency, throughput, size), merged by method/bits/engine.
A quantized artifact is named by its method (``qarepvgg_a0 PTQ max``, ``qarepvgg_a0 RepQ-bnest W4A4``), and
that name follows it through export, engine and bench.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path

import numpy as np
import torch

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


def _torch_score(model: torch.nn.Module, loader) -> dict:
    """Top-1/top-5 in PyTorch over the val split (PSNR for super-resolution)."""
    from repq.engines.timing import score

    model.eval()

    def predict(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(images)).float().numpy()

    return score(predict, loader)


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


def _quantized_artifacts(ctx: StageContext) -> dict[str, tuple[str, Path, str]]:
    """method -> (kind, file, base) of every quantized model written upstream (kind: toolkit or repq; base: the
    label of the float model it comes from)."""
    artifacts = {}
    for record in ctx.upstream.values():
        for method, entry in record.metrics.get("artifacts", {}).items():
            artifacts[method] = (entry["kind"], record.dir / entry["file"], entry["base"])
    return artifacts


# ------------------------------------------------------------------------------------------------ stages


def _trained_result(summary: dict, label: str) -> dict:
    best = summary["best"]
    return {"outputs": {"checkpoint": "best.pt", "last": "last.pt"},
            "metrics": {"label": label, "epochs": summary["epochs"],
                        **{k: v for k, v in best.items() if k.startswith(("val_", "deploy_val_"))},
                        "ladder": _float_ladder(label, best)}}


def train_stage(ctx: StageContext):
    from repq.pipeline.recipe import train_settings
    from repq.pipeline.train import train

    summary = train(train_settings(ctx.recipe), _data(ctx), ctx.dir,
                    resume=ctx.resume and (ctx.dir / "last.pt").exists(), recipe=ctx.recipe.to_dict())
    return None if ctx.rank else _trained_result(summary, ctx.recipe.model.name)


def substitute_stage(ctx: StageContext):
    """RepVGG -> QARepVGG blocks (weights carried), then training with plain L2 (the QARepVGG paper's M1)."""
    from repq.pipeline.recipe import train_settings
    from repq.pipeline.train import load_model_checkpoint, train
    from repq.reparam import substitute_qarepvgg

    model, _ = load_model_checkpoint(ctx.input("train", "checkpoint"))
    model = substitute_qarepvgg(model)
    settings = train_settings(ctx.recipe).model_copy(
        update={"epochs": ctx.settings.epochs, "lr": ctx.settings.lr, "l2": "plain", "warmup_epochs": 0})
    summary = train(settings, _data(ctx), ctx.dir, resume=ctx.resume and (ctx.dir / "last.pt").exists(),
                    recipe=ctx.recipe.to_dict(), initial_model=model)
    label = ctx.recipe.model.name.replace("repvgg", "qarepvgg", 1) if ctx.recipe.model.name.startswith(
        "repvgg") else f"{ctx.recipe.model.name}+qarepvgg"
    return None if ctx.rank else _trained_result(summary, label)


def ptq_stage(ctx: StageContext):
    """ModelOpt PTQ of every trained checkpoint with every calibrator; fake-quant accuracy in PyTorch."""
    from repq.calibration.loaders import calibration_loader
    from repq.pipeline.train import load_model_checkpoint
    from repq.quant.toolkit import quantize, save_quantized

    s, data = ctx.settings, _data(ctx)
    calib = calibration_loader(data, min(s.calib_size, len(data.train)), seed=ctx.recipe.seed)
    val = _val_loader(data)
    artifacts, ladder = {}, []
    for label, (path, trained) in _checkpoints(ctx).items():
        model, _ = load_model_checkpoint(path)
        for calibrator in s.calibrators:
            method = f"{label} PTQ {calibrator}"
            quantized = quantize(model.eval(), calib, calibrator, s.percentile, skip_layers=s.skip_layers)
            file = f"{_slug(method)}.pt"
            save_quantized(quantized, ctx.path(file), {"data": data.describe(), "source": str(path)})
            artifacts[method] = {"kind": "toolkit", "file": file, "base": label}
            accuracy = _torch_score(quantized, val)
            ctx.log(f"  {method}: fake-quant {_describe(accuracy)}")
            ladder += [*_float_ladder(method, trained), {"step": "fakequant", "method": method, **accuracy}]
    return {"outputs": {}, "metrics": {"artifacts": artifacts, "ladder": ladder}}


def qat_stage(ctx: StageContext):
    """Toolkit QAT (the RepQ paper's Merged baseline): fine-tune the PTQ model of the last trained checkpoint,
    ModelOpt's fake quantizers and amax kept, with the training loop (resumable, torchrun-ready)."""
    from repq.pipeline.qat import qat
    from repq.quant.toolkit import load_quantized

    s = ctx.settings
    label, _, trained = _last_checkpoint(ctx)
    source = f"{label} PTQ {s.calibrator}"
    artifacts = _quantized_artifacts(ctx)
    if source not in artifacts:
        raise RepqError(f"stages.qat.calibrator={s.calibrator} has no PTQ model to start from: add it to "
                        f"stages.ptq.calibrators")
    result = qat(load_quantized(artifacts[source][1]), _data(ctx), ctx.dir, epochs=s.epochs, lr=s.lr,
                 resume=ctx.resume and (ctx.dir / "last.pt").exists())
    if ctx.rank:
        return None
    method = f"{label} QAT {s.calibrator}"
    accuracy = _torch_score(result["model"], _val_loader(_data(ctx)))
    return {"outputs": {}, "metrics": {
        "artifacts": {method: {"kind": "toolkit", "file": "best.pt", "base": label}},
        "ladder": [*_float_ladder(method, trained), {"step": "fakequant", "method": method, **accuracy}]}}


def repq_stage(ctx: StageContext):
    """RepQ fine-tuning through each block's merged kernel, per mode and bit width (RepQ paper). An interrupted
    attempt keeps the fine-tunes it finished and continues the one it was in from its last saved state."""
    from repq.calibration.loaders import build_loaders
    from repq.pipeline.commands.finetune import FORMAT, distillation_teacher, finetune, quantized_model, rebuild
    from repq.pipeline.train import load_model_checkpoint
    from repq.reparam.io import atomic_save, load_checkpoint

    s, data = ctx.settings, _data(ctx)
    label, path, trained = _last_checkpoint(ctx)
    float_model, _ = load_model_checkpoint(path)
    train_loader, val = build_loaders(data, min(s.batch_size, len(data.train)), seed=ctx.recipe.seed)
    teacher = distillation_teacher(float_model, s.distill)
    artifacts, ladder = {}, []
    for mode in s.modes:
        for bits in s.bits:
            torch.manual_seed(ctx.recipe.seed)
            method = f"{label} RepQ-{mode} W{bits}A{bits}"
            file, state = f"{_slug(method)}.pt", ctx.path(f"{_slug(method)}.state.pt")
            if ctx.resume and ctx.path(file).exists():  # finished before the interruption
                ctx.log(f"  {method}: fine-tuned before the interruption, kept")
                model = rebuild(load_checkpoint(ctx.path(file)))
            else:
                model = quantized_model(copy.deepcopy(float_model), mode, bits, bits)
                finetune(model, train_loader, s.epochs, s.lr, log=lambda line, m=method: ctx.log(f"  {m}: {line}"),
                         teacher=teacher, distill=s.distill, recalibrate_batches=s.recalibrate_bn,
                         freeze_bn_at=s.freeze_bn_at, state_path=state)
                atomic_save({"format": FORMAT, "arch": float_model.repq_arch, "quant": model.repq_quant,
                             "state_dict": model.state_dict(), "data": data.describe()}, ctx.path(file))
                state.unlink(missing_ok=True)
            artifacts[method] = {"kind": "repq", "file": file, "base": label}
            ladder += _float_ladder(method, trained)
            ladder.append({"step": "fakequant", "method": method, **_torch_score(model, val)})
    return {"outputs": {}, "metrics": {"artifacts": artifacts, "ladder": ladder}}


def _load_quantized_model(kind: str, path: Path) -> torch.nn.Module:
    from repq.pipeline.commands.finetune import rebuild
    from repq.quant.toolkit import load_quantized
    from repq.reparam.io import load_checkpoint

    return load_quantized(path) if kind == "toolkit" else rebuild(load_checkpoint(path))


def export_stage(ctx: StageContext):
    """QDQ ONNX per quantized model and per placement, plus the fused FP32 model as the engines' reference."""
    from repq.engines.export import export_float
    from repq.engines.targets import get_target
    from repq.pipeline.commands.finetune import export_quantized
    from repq.pipeline.train import load_model_checkpoint
    from repq.quant.toolkit import deploy_copy
    from repq.reparam.io import atomic_write_bytes

    s, data = ctx.settings, _data(ctx)
    shape, dynamic_size = data.input_shape, data.task == "super_resolution"
    meta = json.dumps(data.describe())
    files = {}
    for label, (path, _) in _checkpoints(ctx).items():
        model, _ = load_model_checkpoint(path)
        graph = export_float(deploy_copy(model.eval()), shape, s.opset, s.dynamic_batch,
                             dynamic_size=dynamic_size)
        graph.metadata_props.add(key="repq.data", value=meta)
        file = f"{_slug(label)}_fp32.onnx"
        atomic_write_bytes(ctx.path(file), graph.SerializeToString())
        files[file] = {"method": f"{FLOAT_LABEL} {label}", "bits": 32, "placement": "float", "base": label}
    placements = {get_target(t).placement for t in s.targets}
    for method, (kind, path, base) in _quantized_artifacts(ctx).items():
        model = _load_quantized_model(kind, path)
        for placement in sorted(placements):
            file = f"{_slug(method)}{get_target(placement).suffix}"
            if kind == "repq":
                export_quantized(model, ctx.path(file), placement, shape, opset=s.opset,
                                 dynamic_batch=s.dynamic_batch, dynamic_size=dynamic_size)
            else:
                from repq.engines.export import export_onnx

                export_onnx(model, ctx.path(file), placement, shape, opset=s.opset, dynamic_batch=s.dynamic_batch,
                            dynamic_size=dynamic_size)
            _add_metadata(ctx.path(file), meta)
            files[file] = {"method": method, "bits": _bits(method), "placement": placement, "base": base}
    return {"outputs": {}, "metrics": {"files": files}}


def _bits(method: str) -> int:
    match = re.search(r"W(\d)A\d", method)
    return int(match.group(1)) if match else 8


def _add_metadata(path: Path, data_json: str) -> None:
    import onnx

    from repq.reparam.io import atomic_write_bytes

    graph = onnx.load(str(path))
    graph.metadata_props.add(key="repq.data", value=data_json)
    atomic_write_bytes(path, graph.SerializeToString())


def _engine_runs(ctx: StageContext) -> tuple[list[tuple[Path, dict, str, bool]], list[str]]:
    """([(file, entry, engine, parity_only)], skipped) over every exported file and CPU engine of the recipe.

    ``parity_only``: ONNX Runtime running the TensorRT-placement file, the ladder's "QDQ ONNX" step, not an
    engine of the methods table. GPU targets (TensorRT) are listed as skipped: engines/tensorrt.py builds them
    on a GPU machine (bench/engines.py). So are OpenVINO's INT8 runs on a CPU whose INT8 kernels it computes
    inexactly (`engines.openvino.openvino_int8_problem`).
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
            elif row.needs_gpu:
                skipped.append(f"{target}: {file} (needs a GPU with TensorRT)")
            elif target == "openvino" and entry["placement"] != "float" and _openvino_int8_problem():
                skipped.append(f"{target}: {file} ({_openvino_int8_problem()})")
            else:
                runs.append((export.dir / file, entry, target, False))
    return runs, skipped


def _openvino_int8_problem() -> str | None:
    from repq.engines.openvino import openvino_available, openvino_int8_problem

    return None if openvino_available() else openvino_int8_problem()  # not installed: open_engine says so


def open_engine(path: str | Path, target: str, threads: int | None = None):
    """A CPU engine on an ONNX file: onnxruntime or openvino (TensorRT needs a GPU: engines/tensorrt.py)."""
    if target == "onnxruntime":
        from repq.engines.onnxruntime import OrtEngine

        return OrtEngine(path, threads=threads)
    if target == "openvino":
        from repq.engines.openvino import OpenVinoEngine

        return OpenVinoEngine(path, threads=threads)
    raise RepqError(f"engine target {target} is not a CPU engine: build TensorRT engines with engines/tensorrt.py "
                    "on a GPU machine (docker/), or drop it from stages.engine.targets")


def engine_stage(ctx: StageContext):
    """Accuracy measured on each engine itself, over the validation split."""
    val = _val_loader(_data(ctx))
    runs, skipped = _engine_runs(ctx)
    ladder, methods = [], []
    for path, entry, target, parity_only in runs:
        accuracy = open_engine(path, target).evaluate(val)
        if parity_only:
            ladder.append({"step": "qdq_onnx", "method": entry["method"], **accuracy})
            continue
        if entry["placement"] == "onnxruntime":
            ladder.append({"step": "engine", "method": entry["method"], **accuracy})
        methods.append({"method": entry["method"], "bits": entry["bits"], "engine": target, "base": entry["base"],
                        **accuracy})
        ctx.log(f"  {entry['method']} on {target}: {_describe(accuracy)}")
    return {"outputs": {}, "metrics": {"ladder": ladder, "methods": methods, "skipped": skipped}}


def bench_stage(ctx: StageContext):
    """Latency and throughput of each engine file at each batch size, and its size on disk.

    The methods table shows latency at the smallest batch and throughput at the largest; metrics.json keeps
    every batch size.
    """
    s = ctx.settings
    data = _data(ctx)
    image = data.input_shape[1:]
    methods, timings = [], []
    for path, entry, target, parity_only in _engine_runs(ctx)[0]:
        if parity_only:
            continue
        stats = open_engine(path, target, s.threads).benchmark(image, s.batch_sizes, warmup=s.warmup, runs=s.iters)
        small, large = min(stats, key=lambda x: x.batch_size), max(stats, key=lambda x: x.batch_size)
        methods.append({"method": entry["method"], "bits": entry["bits"], "engine": target,
                        "batch_size": f"{small.batch_size}/{large.batch_size}", "latency_ms": small.median_ms,
                        "throughput": large.fps, "size_mb": path.stat().st_size / 1e6})
        timings += [{"method": entry["method"], "engine": target, **x.as_dict()} for x in stats]
    return {"outputs": {}, "metrics": {"methods": methods, "timings": timings}}
