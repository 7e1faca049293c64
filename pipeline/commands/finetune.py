"""`repq finetune`: RepQ quantization-aware fine-tuning of a trained re-param model (stage 4).

    repq finetune --checkpoint runs/cifar/best.pt --data ../shared/datasets/cifar10 --method bnest --out DIR
    repq finetune ... --method merged          # the paper's Merged baseline: fuse first, then LSQ QAT
    repq finetune ... --start-from DIR/repq.pt --out DIR2   # extend a fine-tune with a fresh schedule
    repq finetune ... --resume                 # continue one a kill interrupted (DIR/finetune_state.pt)
    repq finetune ... --device cuda            # fine-tune on a GPU (default auto: CUDA when present)

Methods: ``repq`` / ``bn`` / ``bnest`` train through each block's merged kernel (quant.repq); ``merged``
fuses the blocks and trains LSQ on the plain convs (Table 1's Merged; on a plain model it is the Plain
baseline). Writes DIR/repq.pt (the fine-tuned model, rebuildable), DIR/metrics.json and, for 8-bit
activations, DIR/model_int8.onnx with ONNX Runtime's accuracy on it.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from repq.errors import RepqError
from repq.quant.lsq import INIT_METHODS

METHODS = ("repq", "bn", "bnest", "merged")
FORMAT = "repq-finetune/1"
SAVE_EVERY = 500  # steps between resumable states: ~3 minutes of a CIFAR RepVGG-A0 fine-tune on 2 CPU cores
STATE_FORMAT = "repq-finetune-state/1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="full-precision checkpoint from `repq train`")
    parser.add_argument("--data", default="digits", help="ImageFolder tree (train/ [val/]) or `digits`")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--method", choices=METHODS, default="bnest")
    parser.add_argument("--w-bits", type=int, default=8)
    parser.add_argument("--a-bits", type=int, default=8)
    parser.add_argument("--act-unsigned", action="store_true",
                        help="unsigned activation quantizers (simulation only: TensorRT needs signed)")
    parser.add_argument("--epochs", type=float, default=1.0, help="may be fractional")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01, help="SGD, cosine to 0")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="as the FP training used, if any")
    parser.add_argument("--distill", type=float, default=0.0,
                        help="weight in [0, 1] of the loss against the FP model's outputs (knowledge distillation)")
    parser.add_argument("--recalibrate-bn", type=int, default=0, metavar="BATCHES",
                        help="after fine-tuning (or at --freeze-bn-at), re-estimate BN running statistics over "
                             "this many batches")
    parser.add_argument("--freeze-bn-at", type=float, default=None, metavar="SHARE",
                        help="after this share of the steps (0-1), recalibrate and freeze BN statistics: the "
                             "last steps train the deploy kernel itself")
    parser.add_argument("--init", choices=INIT_METHODS, default="minerror",
                        help="activation step initialisation on the first batch")
    parser.add_argument("--weight-init", choices=INIT_METHODS, default=None,
                        help="weight step initialisation (default: max from 4 bits up, MinError below)")
    parser.add_argument("--val-size", type=float, default=None,
                        help="val split carved from train (count or fraction; default: the checkpoint's training "
                             "split, so the model is scored on images it never trained on)")
    parser.add_argument("--split-seed", type=int, default=None, help="default: the checkpoint's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-from", metavar="REPQ_PT",
                        help="continue a previous fine-tune of this checkpoint (its DIR/repq.pt, same --method, "
                             "bit widths and --act-unsigned) with a fresh schedule of --epochs: learned steps are "
                             "kept, not re-measured")
    parser.add_argument("--resume", action="store_true",
                        help="continue the fine-tune a kill interrupted, from OUT/finetune_state.pt")
    parser.add_argument("--no-export", action="store_true", help="skip the ONNX export and ORT evaluation")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when present), cpu or cuda; the export and ONNX Runtime stay on the CPU")


# ------------------------------------------------------------------------------------------------ model


def quantized_model(float_model: nn.Module, method: str, w_bits: int, a_bits: int, act_signed: bool = True,
                    bnest_calibrate: bool = True, init: str = "minerror", weight_init: str | None = None
                    ) -> nn.Module:
    """The model to fine-tune: RepQ-wrapped blocks, or (merged) LSQ on the fused convs. ``init``: how the
    activation steps start, on the first batch (quant.lsq.INIT_METHODS); ``weight_init``: the weight steps
    (None: by bit width, quant.lsq.weight_quantizer)."""
    from repq.quant.lsq import quantize_plain_layers
    from repq.quant.repq import raise_first_last_bits, sign_first_input, wrap_model
    from repq.quant.toolkit import fold_batchnorm
    from repq.reparam import fuse_model

    if method not in METHODS:
        raise RepqError(f"unknown fine-tuning method {method!r}: use one of {', '.join(METHODS)}")
    if method == "merged":
        fused = fold_batchnorm(fuse_model(float_model))  # a plain model's conv+BN pairs fold like the blocks
        if any(isinstance(m, nn.BatchNorm2d) for m in fused.modules()):
            raise RepqError("the fused model still has BatchNorm layers that torch.fx could not fold into their "
                            "convs (the model does not trace): LSQ on conv+BN pairs is not supported; fold "
                            "the BNs into the convs before fine-tuning")
        model = quantize_plain_layers(fused, w_bits, a_bits, act_signed=act_signed, init=init,
                                      weight_init=weight_init)
        if min(w_bits, a_bits) < 8:  # as wrap_model does: first and last layer keep 8 bits
            raise_first_last_bits(model, 8, act_signed=act_signed, init=init)
        sign_first_input(model)
        model.repq_quant = {"method": "merged", "w_bits": w_bits, "a_bits": a_bits, "act_signed": act_signed,
                            "weight_init": weight_init}
        return model
    return wrap_model(float_model, method, w_bits, a_bits, act_signed=act_signed, bnest_calibrate=bnest_calibrate,
                      init=init, weight_init=weight_init)


def rebuild(ckpt: dict) -> nn.Module:
    """The fine-tuned model of a DIR/repq.pt payload, weights and steps loaded."""
    from repq.reparam import model_from_arch

    quant = ckpt["quant"]
    method = quant.get("mode", quant["method"]) if quant["method"] == "repq" else quant["method"]
    model = quantized_model(model_from_arch(ckpt["arch"]), method, quant["w_bits"], quant["a_bits"],
                            quant.get("act_signed", True), quant.get("bnest_calibrate", True))
    model.load_state_dict(ckpt["state_dict"])
    return model


# The quantizer settings a continued fine-tune must share with the one it continues (how steps started does not
# matter once they are learned).
_CONTINUE_KEYS = ("method", "mode", "w_bits", "a_bits", "act_signed", "first_last_bits", "quantize_plain")


def load_finetuned(model: nn.Module, path: str | Path, arch: dict) -> None:
    """Load a previous fine-tune's DIR/repq.pt into ``model`` (built from the checkpoint of ``arch`` with the
    same method and widths), so a fine-tune continues where that one ended; one-line errors otherwise."""
    from repq.reparam.io import load_checkpoint

    payload = load_checkpoint(path)
    if payload.get("format") != FORMAT:
        raise RepqError(f"{path} is not a `repq finetune` output: pass the DIR/repq.pt a fine-tune wrote")
    if payload["arch"] != arch:
        raise RepqError(f"{path} fine-tuned another model ({payload['arch'].get('name')}, {payload['arch']}): "
                        f"pass the --checkpoint that fine-tune started from")
    wanted, saved = model.repq_quant, payload["quant"]
    differs = [f"{k} {saved.get(k)} there, {wanted.get(k)} here"
               for k in _CONTINUE_KEYS if saved.get(k) != wanted.get(k)]
    if differs:
        raise RepqError(f"{path} was fine-tuned with other quantizer settings ({'; '.join(differs)}): pass the "
                        f"same --method, --w-bits, --a-bits and --act-unsigned")
    model.load_state_dict(payload["state_dict"])


# ------------------------------------------------------------------------------------------------ export


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


def finetune(model: nn.Module, train_loader, epochs: float, lr: float, weight_decay: float = 0.0,
             log=print, label_smoothing: float = 0.0, teacher: nn.Module | None = None,
             distill: float = 0.0, recalibrate_batches: int = 0, freeze_bn_at: float | None = None,
             state_path: str | Path | None = None, save_every: int | None = None) -> list[float]:
    """SGD (momentum 0.9, cosine to 0) over ``epochs`` of ``train_loader``; returns the per-step losses.

    BN statistics: by default they are re-estimated over ``recalibrate_batches`` batches after the last step
    (recalibrate_bn). With ``freeze_bn_at`` f in [0, 1), that happens after a share f of the steps instead, and
    the statistics then stay frozen (quant.repq.freeze_bn_statistics): the remaining steps train the deploy
    kernel itself, so nothing the deployed model computes changes after the weights last moved.

    ``teacher`` (the full-precision model) and ``distill`` in [0, 1]: the loss mixes the label loss with the
    cross-entropy against the teacher's softmax, ``(1 - distill) * CE(labels) + distill * CE(teacher)``
    (knowledge distillation: the quantized model learns the FP function rather than refitting the labels).

    ``state_path``: every ``save_every`` (default SAVE_EVERY) steps, at the freeze and after the last step,
    everything a resume needs (weights, steps, optimizer, schedule, losses, RNG) is saved there atomically; if
    the file exists when this starts, the fine-tune continues from it, to the same weights as an uninterrupted
    run (the batches of an epoch come in a seeded order, so a resume skips those already taken). The caller
    deletes it once its own output is written.

    NCHW, unlike FP training: NHWC slows RepQ-BN's tap convs on the CPU (ResNet-18-ACB at 32 px: 181% -> 210%
    of plain LSQ's step, `bench/repq_speed.py --channels-last`)."""
    from repq.calibration.loaders import set_loader_epoch
    from repq.pipeline.train import warmup_cosine

    total = max(1, int(math.ceil(epochs * len(train_loader))))
    if freeze_bn_at is not None and not 0.0 <= freeze_bn_at < 1.0:
        raise RepqError(f"--freeze-bn-at {freeze_bn_at} is outside [0, 1): it is the share of the steps "
                        f"after which BN statistics freeze")
    freeze_step = None if freeze_bn_at is None else min(int(freeze_bn_at * total), total - 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, 0, 0.0))
    plan = {"steps": total, "batches_per_epoch": len(train_loader), "lr": lr, "weight_decay": weight_decay,
            "label_smoothing": label_smoothing, "distill": distill if teacher is not None else 0.0,
            "recalibrate_batches": recalibrate_batches, "freeze_step": freeze_step}
    model.train()
    state = FinetuneState(state_path, plan, model, optimizer, scheduler)
    save_every = save_every or SAVE_EVERY
    losses, frozen = state.resume(log)
    start = time.time()
    while len(losses) < total:
        epoch, taken = divmod(len(losses), len(train_loader))
        set_loader_epoch(train_loader, epoch)
        for images, labels in itertools.islice(train_loader, taken, None):
            images, labels = on_model_device(model, images, labels)
            if len(losses) == freeze_step and not frozen:
                _freeze_bn(model, train_loader, recalibrate_batches, log)
                frozen = True
                state.save(losses, frozen)
            loss = finetune_loss(model(images), images, labels, label_smoothing, teacher, distill)
            if not torch.isfinite(loss):
                raise RepqError(f"fine-tuning loss became {loss.item()} at step {len(losses)}: lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            if len(losses) % 50 == 0 or len(losses) == total:
                log(f"step {len(losses)}/{total} loss {sum(losses[-50:]) / len(losses[-50:]):.4f} "
                    f"({time.time() - start:.0f}s)")
            if len(losses) % save_every == 0 or len(losses) == total:
                state.save(losses, frozen)
            if len(losses) >= total:
                break
    if freeze_step is None:
        recalibrate_bn(model, train_loader, recalibrate_batches)
    return losses


def state_file(path: str | Path, resume: bool) -> Path:
    """Where a fine-tune keeps its resumable state; one an interrupted run left is continued only when asked."""
    path = Path(path)
    if path.exists() and not resume:
        raise RepqError(f"{path} holds an interrupted fine-tune: pass --resume to continue it, or choose another "
                        "--out")
    return path


class FinetuneState:
    """The resumable state of one fine-tune in a file (none when ``path`` is None): saved atomically, and
    loaded only into the same plan (steps, schedule, loss settings) and the same model."""

    def __init__(self, path: str | Path | None, plan: dict, model: nn.Module, optimizer, scheduler):
        self.path, self.plan = (Path(path) if path is not None else None), plan
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler

    def save(self, losses: list[float], frozen: bool) -> None:
        from repq.pipeline.train import rng_state
        from repq.reparam.io import atomic_save

        if self.path is None:
            return
        atomic_save({"format": STATE_FORMAT, "plan": self.plan, "losses": losses, "frozen": frozen,
                     "state_dict": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "rng": rng_state()}, self.path)

    def resume(self, log) -> tuple[list[float], bool]:
        """(losses so far, BN statistics frozen): empty and False when there is nothing to resume."""
        from repq.pipeline.train import set_rng_state
        from repq.quant.repq import freeze_bn_statistics
        from repq.reparam.io import load_checkpoint

        if self.path is None or not self.path.exists():
            return [], False
        saved = load_checkpoint(self.path)
        if saved.get("format") != STATE_FORMAT:
            raise RepqError(f"{self.path} is not a fine-tune's resumable state: move it away or choose another "
                            "output folder")
        differs = [f"{k} {v} there, {self.plan.get(k)} here" for k, v in saved["plan"].items()
                   if self.plan.get(k) != v]
        if differs:
            raise RepqError(f"{self.path} is the state of another fine-tune ({'; '.join(differs)}): rerun with "
                            "its settings to continue it, or delete it to start over")
        try:
            self.model.load_state_dict(saved["state_dict"])
        except RuntimeError as err:
            detail = str(err).strip().splitlines()[0]
            raise RepqError(f"{self.path} holds another model's fine-tune ({detail}): delete it to start "
                            "over") from err
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"])
        if saved["frozen"]:
            freeze_bn_statistics(self.model)
        log(f"resuming the fine-tune from {self.path} at step {len(saved['losses'])}/{self.plan['steps']}")
        return list(saved["losses"]), bool(saved["frozen"])


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
    measures its statistics as it trained (RepQ-BN exact, RepQ-BNEst estimated). The deploy model folds the
    running statistics; at the end of fine-tuning they are a momentum average over the last few batches only,
    each taken with older weights. BNs the forward does not run (RepQ mode, frozen statistics) keep theirs.
    Returns the number of BNs re-estimated."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
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
    from repq.pipeline.train import task_loss

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


def run(args: argparse.Namespace) -> int:
    from repq.calibration.datasets import load_data
    from repq.calibration.loaders import build_loaders
    from repq.engines.onnxruntime import OrtEngine
    from repq.pipeline.distributed import init_distributed
    from repq.pipeline.train import evaluate, load_model_checkpoint, trained_split
    from repq.reparam.io import atomic_save, atomic_write_json

    out = Path(args.out)
    state = state_file(out / "finetune_state.pt", args.resume)
    torch.manual_seed(args.seed)
    float_model, ckpt = load_model_checkpoint(args.checkpoint)
    split = trained_split(ckpt)
    data = load_data(args.data, val_size=split["val_size"] if args.val_size is None else args.val_size,
                     seed=split["seed"] if args.split_seed is None else args.split_seed)
    train_loader, val_loader = build_loaders(data, args.batch_size, seed=args.seed)
    ctx = init_distributed(args.device)
    float_model = float_model.to(ctx.device)
    fp_top1 = evaluate(copy.deepcopy(float_model), val_loader, ctx)["top1"]
    print(f"float model: val top-1 {fp_top1:.2f}% (on {ctx.device})")
    teacher = distillation_teacher(float_model, args.distill)
    model = quantized_model(float_model, args.method, args.w_bits, args.a_bits, not args.act_unsigned,
                            init=args.init, weight_init=args.weight_init).to(ctx.device)
    if args.start_from:
        load_finetuned(model, args.start_from, float_model.repq_arch)
    losses = finetune(model, train_loader, args.epochs, args.lr, args.weight_decay,
                      label_smoothing=args.label_smoothing, teacher=teacher, distill=args.distill,
                      recalibrate_batches=args.recalibrate_bn, freeze_bn_at=args.freeze_bn_at, state_path=state)
    metrics = {"method": args.method, "w_bits": args.w_bits, "a_bits": args.a_bits,
               "act_signed": not args.act_unsigned, "distill": args.distill,
               "recalibrate_bn": args.recalibrate_bn, "freeze_bn_at": args.freeze_bn_at, "fp32_top1": fp_top1,
               "started_from": args.start_from,
               "steps": len(losses),
               "final_loss": sum(losses[-20:]) / len(losses[-20:]),
               "fake_quant_top1": evaluate(model, val_loader, ctx)["top1"]}
    print(f"fine-tuned ({args.method}, W{args.w_bits}A{args.a_bits}): fake-quant val top-1 "
          f"{metrics['fake_quant_top1']:.2f}%")
    atomic_save({"format": FORMAT, "arch": float_model.repq_arch, "quant": model.repq_quant,
                 "state_dict": model.state_dict(), "data": data.describe(), "metrics": metrics}, out / "repq.pt")
    state.unlink(missing_ok=True)
    if not args.no_export and args.a_bits == 8 and not args.act_unsigned:
        shape = (1, *next(iter(val_loader))[0].shape[1:])
        onnx_path = export_quantized(model, out / "model_int8.onnx", "tensorrt", shape, dynamic_batch=True)
        metrics["onnx"] = str(onnx_path)
        metrics["ort_top1"] = OrtEngine(onnx_path).evaluate(val_loader)["top1"]
        print(f"exported {onnx_path}: ONNX Runtime val top-1 {metrics['ort_top1']:.2f}%")
    atomic_write_json(out / "metrics.json", metrics)
    return 0
