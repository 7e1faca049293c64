"""Stage 1: full-precision training of a re-param model, in one process or many (torchrun), resumable.

`train(settings, data, out_dir)` writes `out_dir/last.pt`, `out_dir/best.pt` and `out_dir/metrics.jsonl`
(one JSON object per epoch). Each evaluation scores the train-form model and its fused deploy form, which must
agree. Checkpoints carry everything a bit-exact resume needs: weights, optimizer, schedule, epoch, RNG states,
settings and the metrics history.
"""

from __future__ import annotations

import copy
import json
import math
import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from repq.calibration.datasets import ImageData, check_finite, load_data
from repq.calibration.loaders import build_loaders, set_loader_epoch
from repq.calibration.sr import SRData
from repq.engines.timing import quality_key
from repq.errors import RepqError
from repq.pipeline.distributed import (
    DistContext,
    all_reduce_sum,
    barrier,
    close_distributed,
    init_distributed,
    sync_batchnorm,
)
from repq.reparam.io import atomic_save, atomic_write_text, load_checkpoint

CHECKPOINT_VERSION = 1


class TrainSettings(BaseModel):
    """How to train: validated data, embedded in the recipe. Learning rate is for the global batch."""

    model_config = ConfigDict(extra="forbid")

    model: str = "repvgg_a0"
    width_mult: float | None = Field(None, gt=0, description="model width multiplier; None keeps the model's")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra create_model arguments")
    epochs: int = Field(10, ge=1)
    low_res: int | None = Field(None, ge=8, description="progressive resizing: the first low_res_epochs train on "
                                "inputs resized to this many pixels (cheaper epochs); later ones at full size")
    low_res_epochs: int = Field(0, ge=0)
    batch_size: int = Field(128, ge=1, description="global batch, split over the processes")
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0, description="never applied to BN parameters or biases")
    l2: Literal["plain", "custom"] = Field(
        "plain", description="custom: RepVGG's L2 on the merged kernel of RepVGG blocks; plain: QARepVGG's M1"
    )
    warmup_epochs: float = Field(1.0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a fraction of lr")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU; bf16 autocasts on the CPU too"
    )
    channels_last: bool | None = Field(None, description="NHWC memory format; None: yes (faster on GPUs and CPUs)")
    device: str = Field("auto", description="auto, cpu or cuda")
    seed: int = 0
    split_seed: int = Field(0, description="seed of the val split carved from train/ (kept apart from seed)")
    preset: Literal["auto", "cifar", "imagenet", "digits"] = "auto"
    val_size: float = Field(0.1, gt=0, description="val split when there is no val/: a fraction or a count")
    num_workers: int = Field(0, ge=0)
    sync_bn: bool = Field(True, description="BatchNorm statistics over all processes' batches")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap on steps per epoch (quick probes)")
    progress: bool = True

    @model_validator(mode="after")
    def _full_size_last(self) -> TrainSettings:
        if self.low_res_epochs and self.low_res is None:
            raise ValueError("low_res_epochs needs low_res (the input size of those epochs)")
        if self.low_res_epochs >= self.epochs:
            raise ValueError(f"low_res_epochs ({self.low_res_epochs}) must leave full-size epochs of the "
                             f"{self.epochs}: evaluation and deployment run at full size")
        return self


# ---------------------------------------------------------------------------------------------- model helpers


def build_model(settings: TrainSettings, num_classes: int, cifar: bool) -> nn.Module:
    from repq.reparam import create_model

    kwargs = {"num_classes": num_classes, "cifar": cifar, **settings.model_kwargs}
    if settings.width_mult is not None:
        kwargs["width_mult"] = settings.width_mult
    return create_model(settings.model, **kwargs)


def build_model_for(settings: TrainSettings, data: ImageData | SRData) -> nn.Module:
    """The model `settings` names, shaped for `data`: its classes (and cifar stem for small images), or its
    super-resolution scale."""
    if isinstance(data, SRData):
        from repq.reparam import create_model

        return create_model(settings.model, **{"scale": data.scale, **settings.model_kwargs})
    return build_model(settings, data.num_classes, cifar=data.preset.image_size <= 64)


def metric_key(data: ImageData | SRData) -> str:
    """The validation figure training keeps the best checkpoint by (higher is better)."""
    return "val_psnr" if isinstance(data, SRData) else "val_top1"


def task_loss(outputs: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy on class labels; L1 on images (super-resolution targets, as ECBSR trains)."""
    if targets.is_floating_point():
        return F.l1_loss(outputs.float(), targets)
    return F.cross_entropy(outputs.float(), targets, label_smoothing=label_smoothing)


def load_model_checkpoint(path: str | Path, expect_arch: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the train-form model a checkpoint describes, with its weights; returns (model, checkpoint).

    Raises RepqError for a missing, truncated or foreign file, or an architecture other than `expect_arch`.
    """
    ckpt = load_checkpoint(path)
    arch = ckpt.get("arch")
    if not isinstance(arch, dict) or "name" not in arch or "state_dict" not in ckpt:
        raise RepqError(f"checkpoint {path} is not a repq training checkpoint (no arch/state_dict): "
                        "pass a DIR/last.pt or DIR/best.pt written by `repq train`")
    if expect_arch is not None and arch["name"] != expect_arch:
        raise RepqError(f"checkpoint {path} holds a {arch['name']}, not a {expect_arch}: "
                        f"pass a {expect_arch} checkpoint or ask for {arch['name']}")
    from repq.reparam import model_from_arch

    model = model_from_arch(arch)
    _load_weights(model, ckpt["state_dict"], path)
    return model, ckpt


def trained_split(ckpt: dict) -> dict:
    """The val split a checkpoint's model was trained with (``load_data``'s val_size and seed), so later stages
    score it on images it never trained on."""
    settings = ckpt.get("settings", {})
    return {"val_size": settings.get("val_size", 0.1), "seed": settings.get("split_seed", 0)}


def _load_weights(model: nn.Module, state_dict: dict, path) -> None:
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        detail = str(err).strip().splitlines()[0]
        raise RepqError(f"checkpoint {path} does not fit {model.repq_arch['name']} ({detail}): "
                        "train again or pass the checkpoint of this architecture") from err


def _check_same_arch(ckpt: dict, model: nn.Module, path: Path) -> None:
    if ckpt.get("arch") != model.repq_arch:
        raise RepqError(f"{path} was trained as {ckpt.get('arch')}, but this run builds "
                        f"{model.repq_arch}: resume with the same --model/--width-mult or use another --out")


# ------------------------------------------------------------------------------------------- optimisation


def custom_l2_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters RepVGG's custom L2 regularises (found from its gradient, not from names)."""
    from repq.reparam import custom_l2

    params = [p for p in model.parameters() if p.requires_grad]
    term = custom_l2(model)
    if not torch.is_tensor(term) or not term.requires_grad:
        return set()
    grads = torch.autograd.grad(term, params, allow_unused=True)
    return {id(p) for p, g in zip(params, grads, strict=True) if g is not None}


def parameter_groups(model: nn.Module, settings: TrainSettings) -> list[dict]:
    """Decay for conv/linear weights only: never BN or biases, nor what custom L2 already covers."""
    skip = custom_l2_parameters(model) if settings.l2 == "custom" else set()
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or id(param) in skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    groups = parameter_groups(model, settings)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=settings.lr)
    return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum, nesterov=settings.nesterov)


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR factor per step: linear warm-up to 1, then cosine down to min_ratio at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def regularizer(model: nn.Module, settings: TrainSettings) -> torch.Tensor | float:
    """RepVGG's custom L2 enters the loss (as in its code: 0.5 * wd * L2); plain L2 is in the optimizer."""
    if settings.l2 != "custom" or settings.weight_decay == 0:
        return 0.0
    from repq.reparam import custom_l2

    return 0.5 * settings.weight_decay * custom_l2(model)


# ------------------------------------------------------------------------------------------ RNG and precision


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_as_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def autocast_dtype(settings: TrainSettings, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training steps; None for plain float32. An explicit bf16 also runs on the CPU
    (1.3-1.5x the images/s of float32 on an AVX512-BF16 CPU); auto keeps the CPU in float32."""
    precision = settings.precision
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise RepqError("precision fp16 needs CUDA (its loss scaler is CUDA-only): use bf16 or fp32 on the CPU")
        return torch.float16
    return torch.bfloat16


# ------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate(model: nn.Module, loader, ctx: DistContext, channels_last: bool = False,
             reference: nn.Module | None = None) -> dict:
    """Top-1 (and top-5 over more than 5 classes) in percent, counted over all ranks; or, for a val set that
    scores itself (super-resolution), its score (PSNR), which every rank computes over all images.

    With `reference`, also the largest |output difference| between the two models on the same images and, for
    classification, the reference's own top-1/top-5 from the same pass (``result["reference"]``).
    """
    model.eval()
    if reference is not None:
        reference.eval()
    if hasattr(loader, "score"):
        return _self_scored(model, loader, ctx, reference)
    models = [model] if reference is None else [model, reference]
    correct = torch.zeros(len(models), 2, dtype=torch.float64)  # per model: top-1 hits, top-5 hits
    count, gap, scale, num_classes = 0.0, 0.0, 0.0, 0
    for images, labels in loader:
        images, labels = _to_device(images, labels, ctx.device, channels_last, _dtype_of(model))
        outputs = [m(images).float() for m in models]
        num_classes = outputs[0].shape[1]
        for i, logits in enumerate(outputs):
            hits = logits.topk(min(5, num_classes), dim=1).indices == labels[:, None]
            correct[i, 0] += float(hits[:, 0].sum())
            correct[i, 1] += float(hits.any(dim=1).sum())
        count += len(labels)
        if reference is not None:
            gap = max(gap, float((outputs[0] - outputs[1]).abs().max()))
            scale = max(scale, float(outputs[1].abs().max()))
    *totals, count = all_reduce_sum([*correct.flatten().tolist(), count], ctx)
    scores = [_topk(totals[2 * i], totals[2 * i + 1], count, num_classes) for i in range(len(models))]
    result = {**scores[0], "count": int(count)}
    if reference is not None:
        result["reference"] = scores[1]
        result["max_logit_diff"], result["logit_scale"] = all_reduce_max(gap, ctx), all_reduce_max(scale, ctx)
    return result


def _topk(correct1: float, correct5: float, count: float, num_classes: int) -> dict:
    result = {"top1": 100.0 * correct1 / max(count, 1)}
    if num_classes > 5:
        result["top5"] = 100.0 * correct5 / max(count, 1)
    return result


def _self_scored(model: nn.Module, loader, ctx: DistContext, reference: nn.Module | None) -> dict:
    gap, scale = 0.0, 0.0

    def predict(images: np.ndarray) -> np.ndarray:
        nonlocal gap, scale
        x = torch.from_numpy(images).to(ctx.device, _dtype_of(model))
        out = model(x).float()
        if reference is not None:
            other = reference(x).float()
            gap, scale = max(gap, float((out - other).abs().max())), max(scale, float(other.abs().max()))
        return out.cpu().numpy()

    result = loader.score(predict)
    result["count"] = result.pop("images")
    if reference is not None:
        result["max_logit_diff"], result["logit_scale"] = gap, scale
    return result


def evaluate_with_deploy(model: nn.Module, loader, ctx: DistContext, channels_last: bool) -> dict:
    """Score the train-form model and its fused deploy form; they must agree (printed as a sanity check)."""
    from repq.reparam import fuse_model

    plain = _plain_copy(model)
    deploy_form = evaluate(fuse_model(plain), loader, ctx, channels_last, reference=plain)  # fuses a copy
    # classification scores the train form in the same pass; a self-scoring (SR) set needs its own
    train_form = deploy_form.get("reference") or evaluate(plain, loader, ctx, channels_last)
    gap = deploy_form["max_logit_diff"]
    agrees = gap <= 1e-3 * max(1.0, deploy_form["logit_scale"])
    key = quality_key(train_form)
    metrics = {f"val_{key}": train_form[key], f"deploy_val_{key}": deploy_form[key],
               "deploy_max_logit_diff": gap, "deploy_agrees": agrees}
    if "top5" in train_form:
        metrics["val_top5"], metrics["deploy_val_top5"] = train_form["top5"], deploy_form["top5"]
    return metrics


def all_reduce_max(value: float, ctx: DistContext) -> float:
    if not ctx.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_reduce_device(ctx))
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return float(tensor.item())


def _reduce_device(ctx: DistContext) -> torch.device:
    return ctx.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")


def _dtype_of(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _plain_copy(model: nn.Module) -> nn.Module:
    """A fresh model of the same arch with the same weights: plain BatchNorm2d, no DDP, on the same device."""
    from repq.reparam import model_from_arch

    copy = model_from_arch(model.repq_arch)
    copy.load_state_dict(model.state_dict())
    return copy.to(device=next(model.parameters()).device, dtype=_dtype_of(model))


def _to_device(images, labels, device, channels_last, dtype=torch.float32):
    images = images.to(device, dtype=dtype, non_blocking=True)  # inputs follow the model's dtype
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def _resized(images: torch.Tensor, size: int, channels_last: bool) -> torch.Tensor:
    images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


# ------------------------------------------------------------------------------------------------- training


def train(
    settings: TrainSettings,
    data: ImageData | SRData | str,
    out_dir: str | Path,
    resume: bool = False,
    on_step: Callable[[int, int], None] | None = None,
    recipe: dict | None = None,
    initial_model: nn.Module | None = None,
) -> dict:
    """Train `settings.model` on `data` (an ImageData, `digits`, an ImageFolder path, or super-resolution
    SRData) into `out_dir`.

    Runs as one process, or as one rank of a torchrun group (NCCL on GPUs, gloo on CPUs); only rank 0 writes.
    `resume=True` continues from `out_dir/last.pt`. `on_step(epoch, global_step)` is called after every step.
    `initial_model` starts from that model (weights and `repq_arch`) instead of building `settings.model`:
    fine-tuning after a substitution.
    `recipe` (the whole recipe, as a dict) is stored in every checkpoint beside the training settings.
    Returns a summary: best and last validation metrics and the checkpoint paths.
    """
    ctx = init_distributed(settings.device)
    try:
        return _train(settings, data, Path(out_dir), resume, on_step, ctx, recipe, initial_model)
    finally:
        close_distributed(ctx)


def _load_data_once(settings: TrainSettings, data, ctx: DistContext) -> ImageData | SRData:
    if isinstance(data, ImageData | SRData):
        return data
    def load() -> ImageData:
        return load_data(data, preset=settings.preset, val_size=settings.val_size, seed=settings.split_seed)

    if ctx.is_main:
        loaded = load()  # rank 0 first: it fills the decode cache the others then read
    barrier(ctx)
    return loaded if ctx.is_main else load()


def _train(settings, data, out: Path, resume, on_step, ctx: DistContext, recipe, initial_model=None) -> dict:
    last_path, best_path = out / "last.pt", out / "best.pt"
    if not resume and last_path.exists():
        raise RepqError(f"{out} already holds a training run: pass --resume to continue it or choose another "
                        "--out")
    data = _load_data_once(settings, data, ctx)
    if settings.low_res_epochs and isinstance(data, SRData):
        raise RepqError("low_res_epochs (progressive resizing) is for classification: super-resolution targets "
                        "are images of a fixed size; set low_res_epochs to 0")
    key = metric_key(data)
    seed_everything(settings.seed)
    if initial_model is None:
        model = build_model_for(settings, data).to(ctx.device)
    else:
        model = copy.deepcopy(initial_model).to(ctx.device)
    channels_last = use_channels_last(settings.channels_last)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, settings)
    train_loader, val_loader = build_loaders(data, settings.batch_size, seed=settings.seed,
                                             num_workers=settings.num_workers)
    steps_per_epoch = len(train_loader)
    if settings.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, settings.max_steps_per_epoch)
    total = steps_per_epoch * settings.epochs
    schedule = warmup_cosine(total, round(settings.warmup_epochs * steps_per_epoch), settings.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    start_epoch, history = 0, []
    if resume and last_path.exists():
        start_epoch, history = _resume(last_path, model, optimizer, scheduler, settings, ctx)
    elif resume and ctx.is_main:
        print(f"no checkpoint in {out}: starting from scratch", file=sys.stderr)

    dtype = autocast_dtype(settings, ctx.device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    net = _wrap(model, settings, ctx)
    best = max((h[key] for h in history), default=-math.inf)
    if ctx.is_main:
        params = sum(p.numel() for p in model.parameters()) / 1e6
        kind = f"x{data.scale} super-resolution" if isinstance(data, SRData) else f"{data.num_classes} classes"
        print(f"training {settings.model} ({params:.2f} M params) on {data.name}: {len(data.train)} train / "
              f"{len(data.val)} val images, {kind}, {ctx.world_size} process(es) on "
              f"{ctx.device}, {dtype or torch.float32}", file=sys.stderr)

    for epoch in range(start_epoch, settings.epochs):
        set_loader_epoch(train_loader, epoch)
        stats = _train_epoch(net, model, train_loader, optimizer, scheduler, scaler, dtype, settings, ctx,
                             epoch, steps_per_epoch, channels_last, on_step)
        metrics = evaluate_with_deploy(model, val_loader, ctx, channels_last)
        record = {"epoch": epoch + 1, **stats, **metrics, "lr": optimizer.param_groups[0]["lr"]}
        history.append(record)
        improved = record[key] > best
        best = max(best, record[key])
        if ctx.is_main:
            _report(record, settings.epochs)
            ckpt = _checkpoint(model, optimizer, scheduler, epoch + 1, settings, data, history, recipe)
            atomic_save(ckpt, last_path)
            if improved:
                atomic_save(ckpt, best_path)
            atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
        barrier(ctx)

    best_record = max(history, key=lambda h: h[key]) if history else {}
    return {"best": best_record, "last": history[-1] if history else {}, "epochs": len(history),
            "rank": ctx.rank, "last_checkpoint": str(last_path), "best_checkpoint": str(best_path),
            "out_dir": str(out)}


def use_channels_last(choice: bool | None) -> bool:
    """``choice`` (TrainSettings.channels_last) when set, else NHWC: measured faster on the CPU too (CIFAR
    RepVGG-A0 x0.25 steps 1.35x, 224 px RepVGG-A0 and QARepVGG-A0 steps 1.1x)."""
    return True if choice is None else choice


def _wrap(model: nn.Module, settings: TrainSettings, ctx: DistContext) -> nn.Module:
    if not ctx.distributed:
        return model
    if settings.sync_bn:
        model = sync_batchnorm(model, ctx)
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _train_epoch(net, model, loader, optimizer, scheduler, scaler, dtype, settings, ctx, epoch, steps,
                 channels_last, on_step) -> dict:
    from tqdm import tqdm

    net.train()
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{settings.epochs}", unit="step", leave=False,
               disable=not (ctx.is_main and settings.progress), file=sys.stderr, mininterval=1.0)
    loss_sum = correct = seen = 0.0
    classifying = True
    start = time.perf_counter()
    for step, (images, labels) in enumerate(loader):
        if step >= steps:
            break
        check_finite(images, f"epoch {epoch + 1}, batch {step}")
        classifying = not labels.is_floating_point()
        images, labels = _to_device(images, labels, ctx.device, channels_last, _dtype_of(model))
        if epoch < settings.low_res_epochs:
            images = _resized(images, settings.low_res, channels_last)
        with torch.autocast(ctx.device.type, dtype=dtype) if dtype else nullcontext():
            logits = net(images)
            loss = task_loss(logits, labels, settings.label_smoothing)
        total_loss = loss + regularizer(model, settings)
        if not torch.isfinite(loss):
            raise RepqError(f"the loss became {loss.item()} at epoch {epoch + 1}, step {step}: "
                            "lower --lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total_loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            total_loss.backward()
            optimizer.step()
        scheduler.step()
        loss_sum += float(loss.detach()) * len(labels)
        if classifying:
            correct += float((logits.argmax(1) == labels).sum())
        seen += len(labels)
        if on_step is not None:
            on_step(epoch, epoch * steps + step + 1)
        rate = seen * ctx.world_size / (time.perf_counter() - start)
        accuracy = {"acc": f"{100 * correct / seen:.1f}"} if classifying else {}
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", **accuracy, img_s=f"{rate:.0f}", refresh=False)
        bar.update(1)
    bar.close()
    elapsed = time.perf_counter() - start
    loss_sum, correct, seen = all_reduce_sum([loss_sum, correct, seen], ctx)
    stats = {"train_loss": loss_sum / max(seen, 1), "images_per_s": seen / elapsed, "epoch_seconds": elapsed}
    if not classifying:
        return stats
    return {**stats, "train_top1": 100.0 * correct / max(seen, 1)}


def _report(record: dict, epochs: int) -> None:
    verdict = "agree" if record["deploy_agrees"] else "DISAGREE (fusion is broken)"
    if "val_psnr" in record:
        print(f"epoch {record['epoch']}/{epochs}: train L1 {record['train_loss']:.5f}, val PSNR "
              f"{record['val_psnr']:.3f} dB, {record['images_per_s']:.0f} patches/s", flush=True)
        print(f"  deploy check: fused PSNR {record['deploy_val_psnr']:.3f} dB, max |output diff| "
              f"{record['deploy_max_logit_diff']:.2e}: {verdict}", flush=True)
        return
    top5 = f", top-5 {record['val_top5']:.2f}%" if "val_top5" in record else ""
    print(f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f}, "
          f"train top-1 {record['train_top1']:.2f}%, val top-1 {record['val_top1']:.2f}%{top5}, "
          f"{record['images_per_s']:.0f} img/s", flush=True)
    print(f"  deploy check: fused val top-1 {record['deploy_val_top1']:.2f}% vs train-form "
          f"{record['val_top1']:.2f}%, max |logit diff| {record['deploy_max_logit_diff']:.2e}: {verdict}",
          flush=True)


def _checkpoint(model, optimizer, scheduler, epoch, settings, data: ImageData | SRData, history, recipe) -> dict:
    return {
        "version": CHECKPOINT_VERSION,
        "arch": model.repq_arch,
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "rng": rng_state(),
        "settings": settings.model_dump(),
        "data": data.describe(),
        "history": history,
        "recipe": recipe,
    }


def _resume(path: Path, model, optimizer, scheduler, settings, ctx) -> tuple[int, list]:
    ckpt = load_checkpoint(path)
    for key in ("arch", "state_dict", "optimizer", "scheduler", "epoch", "rng", "history"):
        if key not in ckpt:
            raise RepqError(f"{path} lacks {key!r}: it is not a resumable repq checkpoint; use another --out")
    _check_same_arch(ckpt, model, path)
    _load_weights(model, ckpt["state_dict"], path)
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"])
    changed = {k: (v, getattr(settings, k)) for k, v in ckpt.get("settings", {}).items()
               if hasattr(settings, k) and getattr(settings, k) != v and k != "progress"}
    if ctx.is_main:
        print(f"resuming from {path} after epoch {ckpt['epoch']}", file=sys.stderr)
        if changed:
            print(f"note: settings changed since the checkpoint (old, new): {changed}", file=sys.stderr)
    return int(ckpt["epoch"]), list(ckpt["history"])
