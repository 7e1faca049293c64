"""CIFAR-10 training benchmark: RepVGG-A0 vs QARepVGG-A0 (cifar stem) with one recipe.

    python bench/train_cifar.py speed                      # images/s of a training step, both models
    python bench/train_cifar.py run --model repvgg_a0 --epochs 30 --out runs/cifar_repvgg_a0
    python bench/train_cifar.py run --model repvgg_a0 --epochs 42 --precision bf16 --out DIR  # bf16 autocast on the CPU
    python bench/train_cifar.py target --minutes 60        # both models, epochs sized to fit the budget
    python bench/train_cifar.py run --model repvgg_a0 --epochs 52 --low-res 24 --low-res-epochs 34 --out DIR
                                      # progressive resizing: 34 epochs at 24 px (~0.6x the time), 18 at 32
    python bench/train_cifar.py tta --checkpoints DIR/best.pt ...   # val top-1 with test-time flips/shifts

Data: ../shared/datasets/cifar10 (train/ only; 5,000 images, 500 per class, held out for validation with the
fixed split seed 0). Target: RepVGG-A0 >= 88% val top-1 within 60 minutes of training on a 2-core CPU, and
QARepVGG-A0 with the same recipe within 1 point of it. The CPU must be otherwise idle for the timings.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from repq.calibration.datasets import load_data
from repq.calibration.loaders import build_loaders
from repq.reparam import fuse_model
from repq.training.config import TrainConfig
from repq.training.loop import Loop, LoopState, fit, warmup_cosine
from repq.training.train import (
    autocast_dtype,
    build_model,
    load_model_checkpoint,
    make_optimizer,
    regularizer,
    task_loss,
    train,
    use_channels_last,
)

ROOT = Path(__file__).resolve().parents[1]

DATA = ROOT.parent / "shared" / "datasets" / "cifar10"
MODELS = ("repvgg_a0", "qarepvgg_a0")
# The recipe: both models get exactly these settings (QARepVGG: plain L2 is its M1; RepVGG's custom L2 is
# available as --l2 custom, but plain L2 is what "the same recipe" means here).
RECIPE = dict(width_mult=0.25, batch_size=128, optimizer="sgd", lr=0.2, momentum=0.9, nesterov=True,
              weight_decay=5e-4, l2="plain", label_smoothing=0.1, warmup_epochs=1.0, val_size=5000)
TRAIN_IMAGES = 45_000
EVAL_SHARE = 0.15  # evaluation (train + deploy forms, ~6 s at x0.25) and checkpoints: ~12% of a CPU epoch


WARMUP_STEPS = 3


def recipe(model: str, **overrides) -> TrainConfig:
    return TrainConfig(**{**RECIPE, "model": model, **overrides})


def measure_speed(model_name: str, settings: TrainConfig, data, device: str, steps: int) -> dict:
    """Images/s of full training steps as `repq train` takes them (the shared loop's steps: data loading,
    augmentation, forward, loss, backward, SGD, schedule), after WARMUP_STEPS untimed ones."""
    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_model(settings, data.num_classes, cifar=True).to(dev)
    channels_last = use_channels_last(settings.channels_last)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, settings)
    loader, _ = build_loaders(data, settings.batch_size)
    total = WARMUP_STEPS + steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, 0, 0.0))
    dtype = autocast_dtype(settings, dev)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    def loss_fn(outputs, images, labels):
        loss = task_loss(outputs, labels, settings.label_smoothing)
        return loss + regularizer(model, settings), loss

    clocks = {}

    def after_step(epoch: int, step: int) -> None:  # the clocks after the warm-up and after the last step
        if step in (WARMUP_STEPS, total):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            clocks[step] = (time.perf_counter(), time.process_time())

    loop = Loop(model, loader, optimizer, scheduler, loss_fn, total, len(loader), dev, autocast=dtype, scaler=scaler,
                channels_last=channels_last, desc=f"speed {model_name}", progress=False, keep_losses=False)
    fit(loop, LoopState(), after_step=after_step)
    (wall_start, cpu_start), (wall_end, cpu_end) = clocks[WARMUP_STEPS], clocks[total]
    elapsed, cpu_seconds = wall_end - wall_start, cpu_end - cpu_start
    rate = steps * settings.batch_size / elapsed
    return {"model": model_name, "device": device, "precision": str(dtype or torch.float32),
            "width_mult": settings.width_mult, "batch_size": settings.batch_size, "images_per_s": rate,
            "channels_last": channels_last,
            # Images per CPU-second of this process: on a shared machine, with one thread, this is what the
            # step costs regardless of how much wall time other processes take.
            "images_per_cpu_s": steps * settings.batch_size / cpu_seconds,
            "threads": torch.get_num_threads(), "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "epoch_minutes": TRAIN_IMAGES / rate / 60}


def cmd_speed(args) -> dict:
    data = load_data(args.data, val_size=5000)
    results = []
    for model in args.models:
        settings = recipe(model, width_mult=args.width, batch_size=args.batch_size, precision=args.precision)
        result = measure_speed(model, settings, data, args.device, args.steps)
        print(f"{model} (width {args.width}, batch {args.batch_size}) on {args.device} {result['precision']}: "
              f"{result['images_per_s']:.0f} images/s per training step ({result['images_per_cpu_s']:.0f} per "
              f"CPU-second, {result['threads']} threads), {result['epoch_minutes']:.2f} min per 45k-image epoch, "
              f"{result['params_M']:.2f} M params", flush=True)
        results.append(result)
    return {"speed": results}


def cmd_run(args) -> dict:
    settings = recipe(args.model, width_mult=args.width, epochs=args.epochs, lr=args.lr, l2=args.l2,
                      weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
                      low_res=args.low_res, low_res_epochs=args.low_res_epochs, device=args.device,
                      precision=args.precision, progress=not args.no_progress, keep_every=args.keep_every,
                      batch_size=args.batch_size)
    start = time.perf_counter()
    summary = train(settings, args.data, args.out, resume=args.resume)
    minutes = (time.perf_counter() - start) / 60
    best = summary["best"]
    print(f"{args.model}: best val top-1 {best['val_top1']:.2f}% (deploy {best['deploy_val_top1']:.2f}%) at "
          f"epoch {best['epoch']}/{args.epochs}, {minutes:.1f} min wall", flush=True)
    return {"model": args.model, "settings": settings.model_dump(), "best": best, "last": summary["last"],
            "minutes": minutes}


def cmd_target(args) -> dict:
    """Size the epochs to the time budget from a speed measurement, then train both models."""
    data = load_data(args.data, val_size=5000)
    rate = measure_speed(MODELS[0], recipe(MODELS[0], width_mult=args.width, precision=args.precision), data,
                         args.device, 40)
    per_epoch = TRAIN_IMAGES / rate["images_per_s"] / 60 * (1 + EVAL_SHARE)
    epochs = args.epochs or max(1, math.floor(args.minutes / per_epoch))
    print(f"{rate['images_per_s']:.0f} images/s -> {per_epoch:.2f} min per epoch -> {epochs} epochs in "
          f"{args.minutes} min", flush=True)
    runs = {}
    for model in MODELS:
        run_args = argparse.Namespace(**{**vars(args), "model": model, "epochs": epochs,
                                         "out": str(Path(args.out) / model)})
        runs[model] = cmd_run(run_args)
    top = {m: r["best"]["val_top1"] for m, r in runs.items()}
    verdict = {
        "repvgg_a0_ge_88": top["repvgg_a0"] >= 88.0,
        "repvgg_a0_within_minutes": runs["repvgg_a0"]["minutes"] <= args.minutes,
        "qarepvgg_within_1_point": abs(top["qarepvgg_a0"] - top["repvgg_a0"]) <= 1.0,
    }
    print(json.dumps({"val_top1": top, **verdict}), flush=True)
    return {"epochs": epochs, "speed": rate, "runs": runs, "verdict": verdict}


TTA_VIEWS = ("single", "flip", "flip+shift")


def tta_probabilities(model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Softmax summed over test-time views, for each of TTA_VIEWS: the image; + its mirror ("flip"); + both of
    those moved one pixel down-right and one up-left (reflect padding) at half weight ("flip+shift"). Each view
    runs once. An evaluation protocol only: a deployed engine runs one view per image, so `val_top1` in
    metrics.jsonl stays single-view."""
    single = model(images).softmax(1)
    flip = single + model(images.flip(-1)).softmax(1)
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    moved = (padded[..., :-2, :-2], padded[..., 2:, 2:])  # content one pixel down-right, one up-left
    shifts = sum(model(v).softmax(1) + model(v.flip(-1)).softmax(1) for v in moved)
    return {"single": single, "flip": flip, "flip+shift": flip + 0.5 * shifts}


@torch.no_grad()
def cmd_tta(args) -> dict:
    """Val top-1 of each checkpoint's fused deploy form, single-view and with test-time views."""
    data = load_data(args.data, val_size=5000)
    _, val = build_loaders(data, 256)
    results = {}
    for path in args.checkpoints:
        model = fuse_model(load_model_checkpoint(path)[0].eval())
        hits, count = dict.fromkeys(TTA_VIEWS, 0), 0
        for images, labels in val:
            for views, probs in tta_probabilities(model, images).items():
                hits[views] += int((probs.argmax(1) == labels).sum())
            count += len(labels)
        results[path] = {views: 100.0 * h / count for views, h in hits.items()}
        print(f"{path}: " + ", ".join(f"{v} {t:.2f}%" for v, t in results[path].items()), flush=True)
    return {"tta_val_top1": results}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["speed", "run", "target", "tta"])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--model", default=MODELS[0])
    parser.add_argument("--checkpoints", nargs="+", default=[], help="tta: checkpoints (repq train's best.pt)")
    parser.add_argument("--width", type=float, default=RECIPE["width_mult"])
    parser.add_argument("--batch-size", type=int, default=RECIPE["batch_size"])
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--lr", type=float, default=RECIPE["lr"])
    parser.add_argument("--weight-decay", type=float, default=RECIPE["weight_decay"])
    parser.add_argument("--label-smoothing", type=float, default=RECIPE["label_smoothing"])
    parser.add_argument("--low-res", type=int, default=None,
                        help="progressive resizing: input size of the first --low-res-epochs epochs")
    parser.add_argument("--low-res-epochs", type=int, default=0)
    parser.add_argument("--l2", default=RECIPE["l2"], choices=["plain", "custom"])
    parser.add_argument("--keep-every", type=int, default=None, help="run: keep DIR/epoch_NNN.pt every N epochs")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_cifar"))
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.command == "run" and args.epochs is None:
        parser.error("run needs --epochs")
    if args.command == "tta" and not args.checkpoints:
        parser.error("tta needs --checkpoints")
    result = {"speed": cmd_speed, "run": cmd_run, "target": cmd_target, "tta": cmd_tta}[args.command](args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
