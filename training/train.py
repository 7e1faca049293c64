"""Full-precision training of a re-param model, in one process or many (torchrun), resumable bit-exactly.

`train(config, data, out_dir)` writes `out_dir/last.pt`, `out_dir/best.pt` and `out_dir/metrics.jsonl` (one
JSON object per epoch). Each evaluation scores the train-form model and its fused deploy form, which must agree.
The steps run in `repq.training.loop`, the loop toolkit QAT and RepQ fine-tuning share.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from repq.calibration.datasets import ImageData, load_data
from repq.calibration.loaders import build_loaders
from repq.calibration.sr import SRData
from repq.errors import RepqError
from repq.reparam.io import atomic_save, atomic_write_text, load_checkpoint
from repq.reparam.models import model_label
from repq.training.config import SubstituteConfig, TrainConfig
from repq.training.distributed import DistContext, barrier, close_distributed, init_distributed, wrap_distributed
from repq.training.evaluate import evaluate_with_deploy
from repq.training.loop import Loop, LoopState, fit, restore, seed_everything, train_state, warmup_cosine

CHECKPOINT_VERSION = 2  # 2: the resumable state is one `train_state` dict (repq.training.loop)


# ---------------------------------------------------------------------------------------------- model helpers


def build_model(config: TrainConfig, num_classes: int, cifar: bool) -> nn.Module:
    from repq.reparam import create_model

    kwargs = {"num_classes": num_classes, "cifar": cifar, **config.model_kwargs}
    if config.width_mult is not None:
        kwargs["width_mult"] = config.width_mult
    return create_model(config.model, convert=config.convert, **kwargs)


def build_model_for(config: TrainConfig, data: ImageData | SRData) -> nn.Module:
    """The model `config` names, shaped for `data`: its classes (and cifar stem for small images), or its
    super-resolution scale."""
    if isinstance(data, SRData):
        from repq.reparam import create_model

        return create_model(config.model, **{"scale": data.scale, **config.model_kwargs})
    return build_model(config, data.num_classes, cifar=data.preset.image_size <= 64)


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
    if ckpt.get("format") in _QUANTIZED_FORMATS:
        raise RepqError(f"{path} is a quantized model ({ckpt['format']}), not a full-precision checkpoint: pass "
                        "the checkpoint `repq train` wrote (DIR/best.pt), or evaluate this file with `repq eval`")
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


_QUANTIZED_FORMATS = ("repq-toolkit-quant/1", "repq-finetune/1")


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
                        "pass the checkpoint of this architecture") from err


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


def parameter_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """Decay for conv/linear weights only: never BN or biases, nor what custom L2 already covers."""
    skip = custom_l2_parameters(model) if config.l2 == "custom" else set()
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or id(param) in skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)


def regularizer(model: nn.Module, config: TrainConfig) -> torch.Tensor | float:
    """RepVGG's custom L2 enters the loss (as in its code: 0.5 * wd * L2); plain L2 is in the optimizer."""
    if config.l2 != "custom" or config.weight_decay == 0:
        return 0.0
    from repq.reparam import custom_l2

    return 0.5 * config.weight_decay * custom_l2(model)


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training steps; None for plain float32. An explicit bf16 also runs on the CPU
    (1.3-1.5x the images/s of float32 on an AVX512-BF16 CPU); auto keeps the CPU in float32."""
    precision = config.precision
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise RepqError("precision fp16 needs CUDA (its loss scaler is CUDA-only): use bf16 or fp32 on the CPU")
        return torch.float16
    return torch.bfloat16


def use_channels_last(choice: bool | None) -> bool:
    """``choice`` (TrainConfig.channels_last) when set, else NHWC: faster training steps on GPUs and on CPUs
    too (README, "Measurements behind the defaults")."""
    return True if choice is None else choice


def _resized(images: torch.Tensor, size: int, channels_last: bool) -> torch.Tensor:
    images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


# ------------------------------------------------------------------------------------------------- training


def train(
    config: TrainConfig,
    data: ImageData | SRData | str,
    out_dir: str | Path,
    resume: bool = False,
    on_step: Callable[[int, int], None] | None = None,
    recipe: dict | None = None,
    initial_model: nn.Module | None = None,
) -> dict:
    """Train `config.model` on `data` (an ImageData, `digits`, an ImageFolder path, or super-resolution
    SRData) into `out_dir`.

    Runs as one process, or as one rank of a torchrun group (NCCL on GPUs, gloo on CPUs); only rank 0 writes.
    `resume=True` continues from `out_dir/last.pt`. `on_step(epoch, global_step)` is called after every step.
    `initial_model` starts from that model (weights and `repq_arch`) instead of building `config.model`:
    fine-tuning after a substitution.
    `recipe` (the whole recipe, as a dict) is stored in every checkpoint beside the training settings.
    Returns a summary: best and last validation metrics and the checkpoint paths.
    """
    ctx = init_distributed(config.device)
    try:
        return _train(config, data, Path(out_dir), resume, on_step, ctx, recipe, initial_model)
    finally:
        close_distributed(ctx)


def _load_data_once(config: TrainConfig, data, ctx: DistContext) -> ImageData | SRData:
    if isinstance(data, ImageData | SRData):
        return data

    def load() -> ImageData:
        return load_data(data, preset=config.preset, val_size=config.val_size, seed=config.split_seed)

    if ctx.is_main:
        loaded = load()  # rank 0 first: it fills the decode cache the others then read
    barrier(ctx)
    return loaded if ctx.is_main else load()


def _train(config: TrainConfig, data, out: Path, resume, on_step, ctx: DistContext, recipe,
           initial_model=None) -> dict:
    last_path, best_path = out / "last.pt", out / "best.pt"
    if not resume and last_path.exists():
        raise RepqError(f"{out} already holds a training run: pass --resume to continue it or choose another "
                        "--out")
    data = _load_data_once(config, data, ctx)
    if config.low_res_epochs and isinstance(data, SRData):
        raise RepqError("low_res_epochs (progressive resizing) is for classification: super-resolution targets "
                        "are images of a fixed size; set low_res_epochs to 0")
    key = metric_key(data)
    seed_everything(config.seed)
    model = build_model_for(config, data) if initial_model is None else copy.deepcopy(initial_model)
    model = model.to(ctx.device)
    channels_last = use_channels_last(config.channels_last)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config)
    train_loader, val_loader = build_loaders(data, config.batch_size, seed=config.seed,
                                             num_workers=config.num_workers)
    steps_per_epoch = min(len(train_loader), config.max_steps_per_epoch or len(train_loader))
    total = steps_per_epoch * config.epochs
    schedule = warmup_cosine(total, round(config.warmup_epochs * steps_per_epoch), config.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    dtype = autocast_dtype(config, ctx.device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    plan = {"total_steps": total, "steps_per_epoch": steps_per_epoch}
    log = (lambda line: print(line, file=sys.stderr)) if ctx.is_main else (lambda line: None)

    state = LoopState()
    if resume and last_path.exists():
        state = _resume(last_path, model, optimizer, scheduler, scaler, plan, config, log)
        if ctx.is_main:
            _check_best(state.history, key, last_path, best_path, log)
    elif resume:
        log(f"no checkpoint in {out}: starting from scratch")

    if ctx.is_main:
        params = sum(p.numel() for p in model.parameters()) / 1e6
        kind = f"x{data.scale} super-resolution" if isinstance(data, SRData) else f"{data.num_classes} classes"
        log(f"training {model_label(model)} ({params:.2f} M params) on {data.name}: {len(data.train)} train"
            f" / {len(data.val)} val images, {kind}, {ctx.world_size} process(es) on {ctx.device}, "
            f"{dtype or torch.float32}")

    def loss_fn(outputs, images, labels):
        loss = task_loss(outputs, labels, config.label_smoothing)
        return loss + regularizer(model, config), loss

    def prepare(images: torch.Tensor, epoch: int) -> torch.Tensor:
        return _resized(images, config.low_res, channels_last) if epoch < config.low_res_epochs else images

    best = max((h[key] for h in state.history), default=-math.inf)

    def end_epoch(epoch: int, stats: dict) -> None:
        nonlocal best
        metrics = evaluate_with_deploy(model, val_loader, ctx, channels_last)
        record = {"epoch": epoch + 1, **stats, **metrics, "lr": optimizer.param_groups[0]["lr"]}
        state.history.append(record)
        improved = record[key] > best
        best = max(best, record[key])
        if ctx.is_main:
            _report(record, config.epochs)
            ckpt = {"version": CHECKPOINT_VERSION, "arch": model.repq_arch, "state_dict": model.state_dict(),
                    "settings": config.model_dump(), "data": data.describe(), "recipe": recipe,
                    "epoch": epoch + 1, "history": state.history,
                    "train_state": train_state(state, plan, optimizer, scheduler, scaler)}
            # best.pt before last.pt: last.pt is where a resume starts, so it never gets ahead of best.pt (a
            # save that fails, e.g. on a full disk, leaves the previous epoch to redo, and best.pt with it)
            if improved:
                atomic_save(ckpt, best_path)
            atomic_save(ckpt, last_path)
            if config.keep_every and (epoch + 1) % config.keep_every == 0:
                atomic_save(ckpt, out / f"epoch_{epoch + 1:03d}.pt")
            atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in state.history))
        barrier(ctx)

    loop = Loop(model, train_loader, optimizer, scheduler, loss_fn, total, steps_per_epoch, ctx.device, ctx=ctx,
                net=wrap_distributed(model, ctx, config.sync_bn), autocast=dtype, scaler=scaler,
                channels_last=channels_last, prepare=prepare if config.low_res_epochs else None,
                desc=f"train {model_label(model)}", progress=ctx.is_main and config.progress, keep_losses=False)
    fit(loop, state, after_step=on_step, end_epoch=end_epoch)

    history = state.history
    if ctx.is_main and history and not best_path.is_file():
        raise RepqError(f"{best_path} is missing after training (removed while it ran?): train again into another "
                        "--out")
    best_record = max(history, key=lambda h: h[key]) if history else {}
    return {"best": best_record, "last": history[-1] if history else {}, "epochs": len(history),
            "rank": ctx.rank, "last_checkpoint": str(last_path), "best_checkpoint": str(best_path),
            "out_dir": str(out)}


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


def _check_best(history: list[dict], key: str, last_path: Path, best_path: Path, log) -> None:
    """A resumed run's best.pt must hold the best epoch of the history it continues: written by a run from before
    best.pt was saved first, it can be missing (a save that failed); when the best epoch is the last one saved,
    last.pt holds it and is copied, else the run is refused rather than finished without its best weights."""
    if not history or best_path.is_file():
        return
    best_epoch = max(history, key=lambda h: h[key])["epoch"]
    if best_epoch == history[-1]["epoch"]:
        from repq.reparam.io import atomic_write_bytes

        atomic_write_bytes(best_path, last_path.read_bytes())
        log(f"{best_path.name} was missing: restored from {last_path.name} (epoch {best_epoch}, the best so far)")
        return
    raise RepqError(f"{best_path} is missing, and the best epoch ({best_epoch}) is no longer saved anywhere: train "
                    "again into another --out")


def _resume(path: Path, model, optimizer, scheduler, scaler, plan: dict, config: TrainConfig, log) -> LoopState:
    ckpt = load_checkpoint(path)
    if "arch" not in ckpt or "state_dict" not in ckpt:
        raise RepqError(f"{path} lacks 'arch'/'state_dict': it is not a resumable repq checkpoint; use another "
                        "--out")
    if ckpt["arch"] != model.repq_arch:
        raise RepqError(f"{path} was trained as {ckpt['arch']}, but this run builds "
                        f"{model.repq_arch}: resume with the same --model/--width-mult or use another --out")
    _load_weights(model, ckpt["state_dict"], path)
    saved = ckpt.get("train_state")
    if saved is None and "optimizer" in ckpt:  # version 1: the state at the top level, saved at epoch ends
        saved = {"format": "repq-train-state/1", "plan": {}, "step": int(ckpt["epoch"]) * plan["steps_per_epoch"],
                 "losses": [], "history": ckpt.get("history", []), "extra": {}, "optimizer": ckpt["optimizer"],
                 "scheduler": ckpt["scheduler"], "rng": ckpt["rng"]}
    state = restore(saved, path, plan, optimizer, scheduler, scaler, strict_plan=False, log=log)
    log(f"resuming from {path} after epoch {len(state.history)}")
    changed = {k: (v, getattr(config, k)) for k, v in ckpt.get("settings", {}).items()
               if hasattr(config, k) and getattr(config, k) != v and k != "progress"}
    if changed:
        log(f"note: settings changed since the checkpoint (old, new): {changed}")
    return state


def substitute(checkpoint: str | Path, data, config: SubstituteConfig, out_dir: str | Path, *,
               base: TrainConfig | None = None, resume: bool = False, recipe: dict | None = None) -> dict:
    """RepVGG -> QARepVGG blocks in a trained checkpoint's model (the 3x3 conv + BN and the 1x1 weights carried,
    identity and post-BN fresh), then training with plain L2 and no warm-up (the QARepVGG paper's M1). Every
    other training setting is ``base`` (default: the checkpoint's own), the data split the checkpoint's."""
    from repq.reparam import substitute_qarepvgg

    model, ckpt = load_model_checkpoint(checkpoint)
    model = substitute_qarepvgg(model)
    if base is None:
        saved = {k: v for k, v in ckpt.get("settings", {}).items() if k in TrainConfig.model_fields}
        base = TrainConfig(**saved)
    settings = base.model_copy(update={"epochs": config.epochs, "lr": config.lr, "l2": "plain", "warmup_epochs": 0})
    return train(settings, data, out_dir, resume=resume, recipe=recipe, initial_model=model)
