"""RepQ fine-tuning: quantization-aware training through each re-param block's merged kernel (RepQ paper), or
LSQ on the fused convs (its Merged baseline), in the training loop FP training and toolkit QAT share.

`finetune(model, loader, config)` trains a model made by `quantized_model(float_model, config)`;
`finetune_checkpoint(...)` is the whole operation on files, which `repq finetune` and `repq run` both call.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from repq.errors import RepqError
from repq.quant.config import FinetuneConfig

FORMAT = "repq-finetune/1"
STATE_NAME = "finetune_state.pt"
# Running BN statistics this far (either way, median over a BN's channels) from the first batch's are stale:
# an untrained model, or data other than the model's. RepQ merges with the running variance (Algorithm 1, line 6),
# so stale statistics mis-scale the first kernels and their lag can drive training to inf (README, "Measurements
# behind the defaults").
STALE_BN_RATIO = 4.0
STALE_BN_BATCHES = 8


def finetune_config(config: FinetuneConfig | None = None, **overrides) -> FinetuneConfig:
    """``config`` with keyword overrides, validated (one-line errors)."""
    from pydantic import ValidationError

    base = (config or FinetuneConfig()).model_dump()
    try:
        return FinetuneConfig(**{**base, **overrides})
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        flag = "--" + where.replace("_", "-")
        raise RepqError(f"fine-tuning setting {where} ({flag}): {first['msg']} (got {first.get('input')!r})") from None


# ------------------------------------------------------------------------------------------------ model


def quantized_model(float_model: nn.Module, config: FinetuneConfig | None = None, **overrides) -> nn.Module:
    """The model to fine-tune, in place: RepQ-wrapped blocks, or (``merged``) LSQ on the fused convs."""
    from repq.quant.lsq import quantize_plain_layers
    from repq.quant.repq import raise_first_last_bits, sign_first_input, wrap_model
    from repq.quant.toolkit import fold_batchnorm
    from repq.reparam import fuse_model

    c = finetune_config(config, **overrides)
    signed = not c.act_unsigned
    if c.method == "merged":
        fused = fold_batchnorm(fuse_model(float_model))  # a plain model's conv+BN pairs fold like the blocks
        model = quantize_plain_layers(fused, c.w_bits, c.a_bits, act_signed=signed, init=c.init,
                                      weight_init=c.weight_init)
        if c.first_last_bits is not None and min(c.w_bits, c.a_bits) < c.first_last_bits:
            raise_first_last_bits(model, c.first_last_bits, act_signed=signed, init=c.init)
        sign_first_input(model)
        model.repq_quant = {"method": "merged", "w_bits": c.w_bits, "a_bits": c.a_bits, "act_signed": signed,
                            "first_last_bits": c.first_last_bits, "weight_init": c.weight_init}
    else:
        mode = "bnest" if c.method.startswith("bnest") else c.method
        model = wrap_model(float_model, mode, c.w_bits, c.a_bits, act_signed=signed, init=c.init,
                           first_last_bits=c.first_last_bits, bnest_calibrate=c.method == "bnest_corrected",
                           weight_init=c.weight_init)
    model.repq_quant["finetune_method"] = c.method
    return model


def saved_method(quant: dict) -> str:
    """The fine-tuning method a saved model's quantizer record describes (files from before bnest was split
    into bnest_paper and bnest_corrected say mode bnest and whether the correction was on)."""
    if "finetune_method" in quant:
        return quant["finetune_method"]
    if quant["method"] != "repq":
        return quant["method"]
    if quant["mode"] == "bnest":
        return "bnest_corrected" if quant.get("bnest_calibrate", True) else "bnest_paper"
    return quant["mode"]


def rebuild(ckpt: dict) -> nn.Module:
    """The fine-tuned model of a DIR/repq.pt payload, weights and steps loaded."""
    from repq.reparam import model_from_arch

    quant = ckpt["quant"]
    model = quantized_model(model_from_arch(ckpt["arch"]), method=saved_method(quant), w_bits=quant["w_bits"],
                            a_bits=quant["a_bits"], act_unsigned=not quant.get("act_signed", True),
                            first_last_bits=quant.get("first_last_bits", 8))
    model.load_state_dict(ckpt["state_dict"])
    return model


def load_finetuned(path: str | Path) -> nn.Module:
    """The fine-tuned model a `repq finetune` (or `repq run`) wrote, rebuilt from its own record."""
    from repq.reparam.io import load_checkpoint

    payload = load_checkpoint(path)
    if payload.get("format") != FORMAT:
        raise RepqError(f"{path} is not a fine-tuned model ({FORMAT}): pass the DIR/repq.pt `repq finetune` wrote")
    try:
        return rebuild(payload)
    except RuntimeError as err:
        raise RepqError(f"{path} does not match the model its record describes ({str(err).splitlines()[0]}): "
                        "re-create it") from err


# The quantizer settings a continued fine-tune must share with the one it continues (how steps started does not
# matter once they are learned).
_CONTINUE_KEYS = ("finetune_method", "w_bits", "a_bits", "act_signed", "first_last_bits", "quantize_plain")


def continue_from(model: nn.Module, path: str | Path, arch: dict) -> None:
    """Load a previous fine-tune's DIR/repq.pt into ``model`` (built from the checkpoint of ``arch`` with the
    same method and widths), so a fine-tune continues where that one ended; one-line errors otherwise."""
    from repq.reparam.io import load_checkpoint

    payload = load_checkpoint(path)
    if payload.get("format") != FORMAT:
        raise RepqError(f"{path} is not a `repq finetune` output: pass the DIR/repq.pt a fine-tune wrote")
    if payload["arch"] != arch:
        raise RepqError(f"{path} fine-tuned another model ({payload['arch'].get('name')}, {payload['arch']}): "
                        f"pass the --checkpoint that fine-tune started from")
    wanted, saved = model.repq_quant, {**payload["quant"], "finetune_method": saved_method(payload["quant"])}
    differs = [f"{k} {saved.get(k)} there, {wanted.get(k)} here"
               for k in _CONTINUE_KEYS if saved.get(k) != wanted.get(k)]
    if differs:
        raise RepqError(f"{path} was fine-tuned with other quantizer settings ({'; '.join(differs)}): pass the "
                        f"same --method, --w-bits, --a-bits and --act-unsigned")
    model.load_state_dict(payload["state_dict"])


def export_quantized(model: nn.Module, path: str | Path, target: str = "tensorrt",
                     input_shape=(1, 3, 32, 32), **kwargs) -> Path:
    """QDQ ONNX of a fine-tuned model through engines.export: fused (weights = Q(M(W))), LSQ steps as amax."""
    from repq.engines.export import LayerQuant, export_onnx
    from repq.quant.lsq import export_ranges, without_quantizers
    from repq.reparam import fuse_model

    deployed = fuse_model(model).cpu().eval()  # a CPU copy: a model fine-tuned on CUDA exports the same
    specs = {name: LayerQuant(amax_in, amax_w.numpy().copy(), None)
             for name, (amax_in, amax_w) in export_ranges(deployed).items()}
    return export_onnx(without_quantizers(deployed), path, target, input_shape, specs=specs, **kwargs)


# ------------------------------------------------------------------------------------------------ training


def finetune(model: nn.Module, train_loader, config: FinetuneConfig | None = None, *,
             teacher: nn.Module | None = None, state_path: str | Path | None = None, log=print,
             **overrides) -> list[float]:
    """SGD (momentum 0.9, cosine to 0) over ``config.epochs`` of ``train_loader``; returns the step losses.

    BN statistics: re-estimated over ``recalibrate_bn`` batches after the last step; with ``freeze_bn_at`` f,
    after a share f of the steps instead, and then frozen (quant.repq.freeze_bn_statistics): the remaining steps
    train the deploy kernel itself. Running statistics that do not describe the data at all (an untrained model,
    another dataset; STALE_BN_RATIO) are re-estimated before the first step, and the log says so.

    ``teacher`` (the FP model) and ``distill`` in [0, 1]: the loss is ``(1 - distill) * CE(labels) + distill *
    CE(teacher's softmax)`` (knowledge distillation).

    ``state_path``: every ``save_every`` steps, at the freeze and after the last step, the resumable state is
    saved there; if the file exists when this starts, the fine-tune continues from it to the same weights as an
    uninterrupted run. The caller deletes it once its own output is written.

    NCHW, unlike FP training: NHWC slows RepQ-BN's tap convs on the CPU (`bench/repq_speed.py --channels-last`).
    """
    from repq.quant.repq import freeze_bn_statistics
    from repq.reparam.io import atomic_save, load_checkpoint
    from repq.training.loop import Loop, LoopState, fit, restore, train_state, warmup_cosine

    c = finetune_config(config, **overrides)
    per_epoch = min(len(train_loader), c.max_steps_per_epoch or len(train_loader))
    total = max(1, int(math.ceil(c.epochs * per_epoch)))
    freeze_step = None if c.freeze_bn_at is None else min(int(c.freeze_bn_at * total), total - 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=0.9, weight_decay=c.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, 0, 0.0))
    distill = c.distill if teacher is not None else 0.0
    plan = {"total_steps": total, "steps_per_epoch": per_epoch, "lr": c.lr, "weight_decay": c.weight_decay,
            "label_smoothing": c.label_smoothing, "distill": distill, "recalibrate_bn": c.recalibrate_bn,
            "freeze_step": freeze_step}
    path = Path(state_path) if state_path is not None else None
    model.train()
    state = LoopState(extra={"frozen": False})
    if path is not None and path.exists():
        saved = load_checkpoint(path)
        if not isinstance(saved.get("train_state"), dict) or "state_dict" not in saved:
            raise RepqError(f"{path} is not a fine-tune's resumable state: move it away or choose another output "
                            "folder")
        try:
            model.load_state_dict(saved["state_dict"])
        except (KeyError, RuntimeError) as err:
            detail = str(err).strip().splitlines()[0] if str(err).strip() else "no weights"
            raise RepqError(f"{path} holds another model's fine-tune ({detail}): delete it to start over") from err
        state = restore(saved.get("train_state"), path, plan, optimizer, scheduler)
        if state.extra.get("frozen"):
            freeze_bn_statistics(model)
        log(f"resuming the fine-tune from {path} at step {state.step}/{total}")
    else:
        _refresh_stale_bn(model, train_loader, log)

    def save() -> None:
        if path is not None:
            atomic_save({"state_dict": model.state_dict(),
                         "train_state": train_state(state, plan, optimizer, scheduler)}, path)

    def before_step(step: int) -> None:
        if step == freeze_step and not state.extra["frozen"]:
            _freeze_bn(model, train_loader, c.recalibrate_bn, log)
            state.extra["frozen"] = True
            save()

    def after_step(epoch: int, step: int) -> None:
        if step % c.save_every == 0 or step == total:
            save()

    def train_mode() -> None:
        model.train()
        if state.extra["frozen"]:
            freeze_bn_statistics(model)

    def loss_fn(outputs, images, labels):
        loss = finetune_loss(outputs, images, labels, c.label_smoothing, teacher, distill)
        return loss, loss

    label = model.repq_quant.get("finetune_method", "fine-tune") if hasattr(model, "repq_quant") else "fine-tune"
    loop = Loop(model, train_loader, optimizer, scheduler, loss_fn, total, per_epoch,
                next(model.parameters()).device, train_mode=train_mode, desc=f"finetune {label}",
                progress=c.progress, failure_hint="lower --lr")
    fit(loop, state, before_step=before_step, after_step=after_step)
    if freeze_step is None:
        recalibrate_bn(model, train_loader, c.recalibrate_bn)
    return state.losses


def _refresh_stale_bn(model: nn.Module, loader, log) -> None:
    ratio = bn_statistics_mismatch(model, loader)
    if ratio > STALE_BN_RATIO:
        count = recalibrate_bn(model, loader, STALE_BN_BATCHES)
        log(f"BN running statistics are up to {ratio:.1f}x off this data's (an untrained model, or other data): "
            f"{count} BNs re-estimated over {STALE_BN_BATCHES} batches before fine-tuning")


@torch.no_grad()
def bn_statistics_mismatch(model: nn.Module, loader) -> float:
    """How far the running BN variances are from the first batch's, as the largest ratio (either way) of a BN's
    median channel; 1.0 when no BN is measured (RepQ mode and merged models do not run their BNs). The batch's
    are exact (BNEst blocks measure as RepQ-BN here): BNEst's estimate differs from the exact variance by design
    (a median 3x under it, measured on CIFAR RepVGG-A0), which is not staleness."""
    from repq.quant.repq import RepQBlock

    probe = copy.deepcopy(model)
    for block in probe.modules():
        if isinstance(block, RepQBlock) and block.mode == "bnest":
            block.mode, block.bnest_calibrate = "bn", False
    bns = dict(_batchnorms(probe))
    before = {name: bn.running_var.clone() for name, bn in bns.items()}
    for bn in bns.values():
        bn.reset_running_stats()
        bn.momentum = None
    probe.train()
    images, _ = next(iter(loader))
    probe(on_model_device(probe, images)[0])
    worst = 1.0
    for name, bn in bns.items():
        if int(bn.num_batches_tracked) == 0:
            continue
        ratio = float(torch.median(bn.running_var.clamp_min(1e-12) / before[name].clamp_min(1e-12)))
        worst = max(worst, ratio, 1.0 / max(ratio, 1e-12))
    return worst


def _batchnorms(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.running_var is not None]


def _freeze_bn(model: nn.Module, train_loader, recalibrate_batches: int, log) -> None:
    from repq.quant.repq import freeze_bn_statistics

    recalibrated = recalibrate_bn(model, train_loader, recalibrate_batches)
    frozen = freeze_bn_statistics(model)
    log(f"BN statistics frozen ({frozen} RepQ blocks; {recalibrated} BNs re-estimated over "
        f"{recalibrate_batches} batches first)")


@torch.no_grad()
def recalibrate_bn(model: nn.Module, train_loader, batches: int) -> int:
    """Re-estimate every BN's running statistics with the current weights: reset, then the plain average
    (momentum None) over ``batches`` training batches, forward only, in training mode, so each RepQ mode
    measures its statistics as it trained (RepQ-BN exact, RepQ-BNEst estimated). BNs the forward does not run
    (RepQ mode, frozen statistics) keep theirs. Returns the number of BNs re-estimated."""
    bns = [m for _, m in _batchnorms(model)]
    if not bns or batches <= 0:
        return 0
    saved = [(bn.momentum, copy.deepcopy(bn.state_dict())) for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    was_training = model.training
    model.train()
    for seen, (images, _) in enumerate(train_loader, start=1):
        model(on_model_device(model, images)[0])
        if seen >= batches:
            break
    model.train(was_training)
    updated = 0
    for bn, (momentum, state) in zip(bns, saved, strict=True):
        bn.momentum = momentum
        if int(bn.num_batches_tracked) == 0:  # a BN the forward never ran (RepQ's frozen-statistics mode)
            bn.load_state_dict(state)
        else:
            updated += 1
    return updated


def on_model_device(model: nn.Module, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Batches (CPU tensors from the loaders) moved to the device the model's parameters are on."""
    device = next(model.parameters()).device
    return tuple(t.to(device, non_blocking=True) for t in tensors)


def finetune_loss(outputs, images, labels, label_smoothing: float, teacher: nn.Module | None, distill: float):
    from repq.training.train import task_loss

    loss = task_loss(outputs, labels, label_smoothing)
    if teacher is None or distill == 0.0:
        return loss
    with torch.no_grad():
        target = teacher(images).float()
    if labels.is_floating_point():  # image targets (super-resolution): L1 to the teacher's image
        return (1 - distill) * loss + distill * F.l1_loss(outputs.float(), target)
    return (1 - distill) * loss + distill * F.cross_entropy(outputs.float(), torch.softmax(target, dim=1))


def distillation_teacher(float_model: nn.Module, distill: float) -> nn.Module | None:
    """The FP model a fine-tune distils from: its fused deploy form in eval (one cheap forward per step)."""
    from repq.reparam import fuse_model

    if not 0.0 <= distill <= 1.0:
        raise RepqError(f"--distill {distill} is outside [0, 1]: it is the weight of the teacher's loss")
    if distill == 0.0:
        return None
    return fuse_model(copy.deepcopy(float_model)).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------ on files


def finetune_checkpoint(checkpoint: str | Path, data, config: FinetuneConfig, out_dir: str | Path, *,
                        resume: bool = False, start_from: str | Path | None = None, export: bool = True,
                        float_model: nn.Module | None = None, log=print) -> dict:
    """The whole RepQ fine-tune on files: the FP checkpoint's model, quantized per ``config``, fine-tuned on
    ``data`` (an ImageData/SRData, or a spec read with the checkpoint's own val split), written to
    ``out_dir/repq.pt`` with ``metrics.json``; for 8-bit signed activations (``export``) also the QDQ ONNX file
    and ONNX Runtime's accuracy on it. An interrupted run continues from ``out_dir/finetune_state.pt`` with
    ``resume``. Returns the metrics."""
    from repq.calibration.loaders import build_loaders
    from repq.reparam.io import atomic_save, atomic_write_json
    from repq.training.distributed import init_distributed
    from repq.training.evaluate import evaluate
    from repq.training.train import load_model_checkpoint

    out = Path(out_dir)
    state = out / STATE_NAME
    if state.exists() and not resume:
        raise RepqError(f"{state} holds an interrupted fine-tune: pass --resume to continue it, or choose another "
                        "--out")
    torch.manual_seed(config.seed)
    loaded, ckpt = load_model_checkpoint(checkpoint)
    float_model = loaded if float_model is None else float_model
    data = resolve_data(data, ckpt)
    train_loader, val_loader = build_loaders(data, min(config.batch_size, len(data.train)), seed=config.seed)
    ctx = init_distributed(config.device)
    float_model = float_model.to(ctx.device)
    fp = evaluate(copy.deepcopy(float_model), val_loader, ctx, progress=config.progress,
                  desc="float model: evaluate")
    log(f"float model: val {_describe(fp)} (on {ctx.device})")
    teacher = distillation_teacher(float_model, config.distill)
    model = quantized_model(copy.deepcopy(float_model), config).to(ctx.device)
    if start_from:
        continue_from(model, start_from, float_model.repq_arch)
    losses = finetune(model, train_loader, config, teacher=teacher, state_path=state, log=log)
    fake = evaluate(model, val_loader, ctx, progress=config.progress, desc=f"{config.label}: evaluate")
    metrics = {**config.model_dump(mode="json"), "label": config.label, "fp32": fp, "fake_quant": fake,
               "started_from": str(start_from) if start_from else None, "steps": len(losses),
               "final_loss": sum(losses[-20:]) / len(losses[-20:])}
    log(f"fine-tuned ({config.label}): fake-quant val {_describe(fake)}")
    atomic_save({"format": FORMAT, "arch": float_model.repq_arch, "quant": model.repq_quant,
                 "state_dict": model.state_dict(), "data": data.describe(), "metrics": metrics}, out / "repq.pt")
    state.unlink(missing_ok=True)
    if export and config.a_bits == 8 and not config.act_unsigned:
        from repq.engines.onnxruntime import OrtEngine

        onnx_path = export_quantized(model, out / "model_int8.onnx", "tensorrt", data.input_shape,
                                     dynamic_batch=True)
        metrics["onnx"] = str(onnx_path)
        metrics["onnxruntime"] = OrtEngine(onnx_path).evaluate(val_loader)
        log(f"exported {onnx_path}: ONNX Runtime val {_describe(metrics['onnxruntime'])}")
    atomic_write_json(out / "metrics.json", metrics)
    return {"model": model, "metrics": metrics}


def resolve_data(data, ckpt: dict):
    """``data`` as loaded data: as given when already loaded, else read with the split the checkpoint's model
    was trained with, so it is scored on images it never trained on."""
    from repq.calibration.datasets import ImageData, check_record_classes, load_data
    from repq.calibration.sr import SRData
    from repq.training.train import trained_split

    if isinstance(data, ImageData | SRData):
        return check_record_classes(data, ckpt.get("data"))
    return check_record_classes(load_data(data, **trained_split(ckpt)), ckpt.get("data"))


def _describe(result: dict) -> str:
    if "psnr" in result:
        return f"PSNR {result['psnr']:.2f} dB"
    return f"top-1 {result['top1']:.2f}%"
