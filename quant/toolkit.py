"""NVIDIA's toolkit adapter: symmetric-INT8 PTQ fake quantization with ModelOpt, saved with its amax values.

The design card names `pytorch-quantization`; NVIDIA deprecated it in favour of ModelOpt
(`nvidia-modelopt`, `modelopt.torch.quantization`), and the PyPI `pytorch-quantization` package is an empty
placeholder, so ModelOpt is the toolkit here. It inserts the same TensorQuantizers (fake quant with a
straight-through estimator, amax-based symmetric scale) that TensorRT's explicit quantization expects.

Quantization as TensorRT runs it: every Conv2d and Linear gets a per-tensor int8 input quantizer and a
per-output-channel (axis 0) int8 weight quantizer, zero point 0, range [-128, 127], first and last layer
included; `skip_layers` keeps named layers in float. Each Conv2d also calibrates an output quantizer that is
then disabled: it never touches the fake-quant forward (TensorRT does not quantize conv outputs), but export
needs that range where ORT quantizes a conv output no other layer consumes (before a pool or a residual Add).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import io
import logging
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from repq.calibration.calibrators import (
    WEIGHT_CFG,
    CalibrationSettings,
    activation_cfg,
    calibrate_histograms,
    settings,
)
from repq.errors import RepqError
from repq.reparam.io import atomic_save, load_checkpoint

FORMAT = "repq-toolkit-quant/1"
# What ModelOpt and the libraries it imports say that tells a repq user nothing: filtered where repq calls them.
_THIRD_PARTY_NOISE = (
    r".*torch\.jit\.script.* is deprecated",  # torch, when ModelOpt's modules are imported
    r"Cannot find transformers package",  # ModelOpt's export helpers, at import
    r"Could not identify the device for TensorQuantizer states",  # ModelOpt restoring quantizers on the CPU
)


@contextlib.contextmanager
def quiet_modelopt():
    """Silence ModelOpt's (and its imports') warnings and prints that say nothing to a repq user, around one
    call into it; repq's own warnings and every error pass."""
    cpp_log = logging.getLogger("torch.utils.cpp_extension")  # "No CUDA runtime is found" on CPU machines
    level = cpp_log.level
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # "Inserted 67 quantizers"
        for pattern in _THIRD_PARTY_NOISE:
            warnings.filterwarnings("ignore", message=pattern)
        cpp_log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            cpp_log.setLevel(level)
QUANTIZED_TYPES = (nn.Conv2d, nn.Linear)


def quant_config(
    calib: CalibrationSettings, skip_layers: Sequence[str] = (), record_outputs: bool = True
) -> dict:
    """The ModelOpt config: what is quantized, as data (wildcards -> quantizer attributes)."""
    act = activation_cfg(calib)
    rules: list[dict] = [{"quantizer_name": "*", "enable": False}]
    for parent in ("nn.Conv2d", "nn.Linear"):
        rules.append({"quantizer_name": "*weight_quantizer", "parent_class": parent, "cfg": dict(WEIGHT_CFG)})
        rules.append({"quantizer_name": "*input_quantizer", "parent_class": parent, "cfg": dict(act)})
    if record_outputs:
        rules.append({"quantizer_name": "*output_quantizer", "parent_class": "nn.Conv2d", "cfg": dict(act)})
    for name in skip_layers:
        rules.append({"quantizer_name": f"{name}.*", "enable": False})
    algorithm = "max" if calib.calibrator.collector == "max" else None
    return {"quant_cfg": rules, "algorithm": algorithm}


def forward_loop(loader: Iterable, num_batches: int | None = None, desc: str = "calibrate"
                 ) -> Callable[[nn.Module], None]:
    """A ModelOpt forward loop over (images, labels) or images batches, with progress; NaN/inf in a batch is
    an error."""
    from repq.progress import Progress

    def loop(model: nn.Module) -> None:
        device = next(model.parameters()).device
        seen = 0
        total = len(loader) if hasattr(loader, "__len__") else 0
        total = min(total, num_batches) if num_batches is not None else total
        with torch.no_grad(), Progress(total, desc, unit="batch") as bar:
            for i, batch in enumerate(loader):
                if num_batches is not None and i >= num_batches:
                    break
                images = batch[0] if isinstance(batch, (list, tuple)) else batch
                if not torch.isfinite(images).all():
                    raise RepqError(f"calibration batch {i} holds NaN or inf values: clean the calibration "
                                    "images (or their normalisation) and calibrate again")
                model(images.to(device))
                seen += 1
                bar.update()
        if seen == 0:
            raise RepqError("the calibration loader yielded no batches: give it at least one image")

    return loop


def deploy_copy(model: nn.Module, fuse: bool = True) -> nn.Module:
    """A deep copy in deploy form (every re-param block fused into one conv) unless `fuse=False`."""
    if not fuse:
        return copy.deepcopy(model)
    from repq.reparam import fuse_model

    return fold_batchnorm(fuse_model(model))


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every Conv2d -> BatchNorm2d pair (plain CNNs: ResNet-18) into the conv, as TensorRT would.

    Re-param blocks fuse their own BNs; this covers the BNs that sit beside ordinary convs, so the quantized
    weight is the one the engine runs. The pairs come from torch.fx's graph; a model fx cannot trace gets the
    pairs that are provably adjacent (a conv and the BN right after it in an nn.Sequential), and a BN that is
    still left is refused in one line: the fake-quant model and the engine would differ.
    """
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        return model
    from torch.fx.experimental.optimization import fuse

    try:
        folded = fuse(model.eval())
    except Exception:  # noqa: BLE001 -- untraceable control flow: fold what is provably adjacent
        folded = _fold_sequential_pairs(copy.deepcopy(model).eval())
    left = [n for n, m in folded.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if left:
        raise RepqError(f"BatchNorm {left[0]} (and {len(left) - 1} more) cannot be folded into a conv: torch.fx "
                        "cannot trace the model and the BN does not directly follow a conv in an nn.Sequential; "
                        "fold it into its conv before quantizing")
    if hasattr(model, "repq_arch"):
        folded.repq_arch = model.repq_arch
    return folded


def _fold_sequential_pairs(model: nn.Module) -> nn.Module:
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:], strict=False):
            conv, bn = module._modules[first], module._modules[second]
            if type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d:
                module._modules[first] = fuse_conv_bn_eval(conv, bn)
                module._modules[second] = nn.Identity()
    return model


def check_skip_layers(model: nn.Module, skip_layers: Sequence[str]) -> None:
    names = [n for n, m in model.named_modules() if isinstance(m, QUANTIZED_TYPES)]
    for name in skip_layers:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RepqError(f"skip_layers names {name!r}, which is no Conv2d/Linear of this model{hint}: "
                            f"use a name from model.named_modules()")


def quantize(
    model: nn.Module,
    calib_loader: Iterable,
    method: str = "max",
    percentile: float = 99.99,
    *,
    fuse: bool = True,
    skip_layers: Sequence[str] = (),
    num_batches: int | None = None,
    record_outputs: bool = True,
) -> nn.Module:
    """A fake-quantized copy of `model` calibrated on `calib_loader` with `method`; `model` is untouched."""
    with quiet_modelopt():
        import modelopt.torch.quantization as mtq

    calib = settings(method, percentile, num_batches)
    work = deploy_copy(model, fuse).eval()
    check_skip_layers(work, skip_layers)
    loop = forward_loop(calib_loader, num_batches, desc=f"calibrate ({calib.describe()})")
    config = quant_config(calib, skip_layers, record_outputs)
    with quiet_modelopt():
        if config["algorithm"] is None:  # histogram calibrators: mtq.quantize cannot compute their amax (0.47)
            work = mtq.quantize(work, config, None)
            calibrate_histograms(work, loop, calib)
        else:
            work = mtq.quantize(work, config, loop)
    for module in work.modules():
        if isinstance(module, nn.Conv2d) and hasattr(module, "output_quantizer"):
            module.output_quantizer.disable()  # keeps its amax for export, leaves the forward as TensorRT's
    work.repq_quant = {"calibration": calib.model_dump(), "fused": fuse, "skip_layers": list(skip_layers)}
    return work


def ptq_checkpoint(checkpoint: str | Path, data, config, out: str | Path, *, model: nn.Module | None = None,
                   log=print) -> dict:
    """The whole toolkit PTQ on files: the checkpoint's model, calibrated on ``config.calib_size`` training
    images of ``data`` (read with the checkpoint's own split when a spec), written to ``out``; returns its
    fake-quant accuracy on the val split and the file's record."""
    from repq.calibration.loaders import build_loaders, calibration_loader
    from repq.quant.finetune import resolve_data
    from repq.training.evaluate import evaluate
    from repq.training.train import load_model_checkpoint

    loaded, ckpt = load_model_checkpoint(checkpoint) if model is None else (model, {})
    data = resolve_data(data, ckpt) if model is None else data
    calib = calibration_loader(data, min(config.calib_size, len(data.train)), config.batch_size, config.seed)
    extra = {"data": data.describe(), "source": str(checkpoint), "config": config.model_dump(mode="json")}
    if config.method == "auto":
        from repq.calibration.loaders import calibration_check_loader
        from repq.quant.auto_calibrator import choose_calibrator

        drawn = min(config.calib_size, len(data.train))
        check = calibration_check_loader(data, drawn, min(config.check_size, len(data.train) - drawn),
                                         config.batch_size, config.seed)
        quantized, extra["auto"] = choose_calibrator(loaded.eval(), calib, check, percentile=config.percentile,
                                                     fuse=config.fuse, skip_layers=config.skip_layers, log=log)
    else:
        quantized = quantize(loaded.eval(), calib, config.method, config.percentile, fuse=config.fuse,
                             skip_layers=config.skip_layers)
    _, val = build_loaders(data, min(64, len(data.train)), eval_batch_size=256)
    if config.budget is not None:
        from repq.calibration.sr import SRData
        from repq.quant.fallback import fallback_search

        quantized, extra["fallback"] = fallback_search(
            quantized, deploy_copy(loaded.eval(), config.fuse), calib, val, config.budget,
            (1, *data.input_shape[1:]), metric="psnr" if isinstance(data, SRData) else "top1",
            rank_by=config.rank_by, log=log)
    save_quantized(quantized, out, extra)
    accuracy = evaluate(quantized, val, progress=config.progress if hasattr(config, "progress") else False,
                        desc=f"ptq {config.method}: evaluate")
    accuracy.pop("count", None)
    method = f"auto: {extra['auto']['method']}" if "auto" in extra else config.method
    kept = extra.get("fallback", {}).get("float_layers", [])
    log(f"{len(quantized_layers(quantized)) - len(kept)} layers quantized ({method})"
        + (f", {len(kept)} kept in float ({', '.join(kept)})" if kept else "") + "; fake-quant val "
        + (f"PSNR {accuracy['psnr']:.2f} dB" if "psnr" in accuracy else f"top-1 {accuracy['top1']:.2f}%"))
    fallback = {"fallback": extra["fallback"]} if "fallback" in extra else {}
    return {"fakequant": accuracy, "file": str(out), **fallback}


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv2d/Linear modules that carry ModelOpt quantizers, by name."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, QUANTIZED_TYPES) and hasattr(m, "weight_quantizer")}


def save_quantized(model: nn.Module, path: str | Path, extra: dict | None = None) -> Path:
    """Weights + quantizer state (amax included) so a later run loads it without recalibrating."""
    with quiet_modelopt():
        import modelopt.torch.opt as mto

        state = mto.modelopt_state(model)
    payload = {
        "format": FORMAT,
        "modelopt_state": state,
        "state_dict": model.state_dict(),
        "arch": getattr(model, "repq_arch", None),
        "quant": getattr(model, "repq_quant", {}),
        "extra": extra or {},
    }
    return atomic_save(payload, path)


def load_quantized(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """The fake-quantized model saved by `save_quantized`; `model` (float, same form) or its recorded arch."""
    with quiet_modelopt():
        import modelopt.torch.opt as mto

    ckpt = load_checkpoint(path)
    if ckpt.get("format") != FORMAT:
        raise RepqError(f"{path} is not a quantized-model file ({FORMAT}): "
                        "pass the output of `repq ptq` or `repq qat`")
    quant = ckpt.get("quant") or {}
    if model is None:
        arch = ckpt.get("arch")
        if not arch:
            raise RepqError(f"{path} records no model architecture: pass the float model to load_quantized")
        from repq.reparam import model_from_arch

        model = deploy_copy(model_from_arch({**arch, "deploy": False}), quant.get("fused", True))
    else:
        model = copy.deepcopy(model)
    try:
        with quiet_modelopt():
            model = mto.restore_from_modelopt_state(model.eval(), ckpt["modelopt_state"])
    except Exception as err:  # ModelOpt raises ApplyModeError/KeyError for a quantizer layout it cannot map
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise RepqError(f"checkpoint {path} does not match the model ({first}): load it into the model "
                        "(and form, fused or not) it was saved from") from err
    load_state_strict(model, ckpt["state_dict"], path)
    model.repq_quant = quant
    return model


def load_state_strict(model: nn.Module, state: dict, source: str | Path) -> None:
    """load_state_dict with a one-line error naming the first mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"shape of {shapes[0]} is {tuple(state[shapes[0]].shape)}, model has "
                  f"{tuple(own[shapes[0]].shape)}")
        raise RepqError(f"checkpoint {source} does not match the model ({detail}): load it into the model "
                        "(and form, fused or not) it was saved from")
    model.load_state_dict(state)
