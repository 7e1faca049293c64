"""A user's own timm RepVGG-A0 trained on CIFAR-10, the input `recipes/from_checkpoint.yaml` starts from.

    python bench/timm_checkpoint.py train --epochs 15 --out DIR     # DIR/timm_a0.pth.tar (resumes from DIR/last.pth.tar)
    repq run recipes/from_checkpoint.yaml model.checkpoint=DIR/timm_a0.pth.tar --out RUN

The model is timm's `repvgg_a0` unchanged (its stride-2 stem: a 32x32 image ends as a 1x1 map), trained by a plain
PyTorch loop the way a timm user would, and saved in timm's training-checkpoint container (`arch`, `state_dict`,
`optimizer`, `args`, `metric`). repq's only part is the data: the same 45,000 / 5,000 split of
../shared/datasets/cifar10 the recipe scores on (split seed 0), so the recipe's val images were never trained on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from repq.calibration.datasets import load_data
from repq.calibration.loaders import build_loaders, set_loader_epoch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "cifar10"


def evaluate(model: torch.nn.Module, loader) -> float:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for images, labels in loader:
            right += (model(images).argmax(1) == labels).sum().item()
            total += len(labels)
    return 100.0 * right / total


def save(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(args: argparse.Namespace) -> dict:
    import timm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(args.data, preset="cifar", val_size=args.val_size, seed=0)
    train_loader, val_loader = build_loaders(data, args.batch_size, seed=args.seed)
    torch.manual_seed(args.seed)
    model = timm.create_model("repvgg_a0", num_classes=data.num_classes)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=args.lr, momentum=0.9, nesterov=True)
    steps_per_epoch = len(train_loader)
    total, warmup = args.epochs * steps_per_epoch, steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, total) / total)))
    start, history = 0, []
    last = out / "last.pth.tar"
    if last.exists():
        state = torch.load(last, map_location="cpu", weights_only=True)
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["scheduler"])
        start, history = state["epoch"], state["history"]
        print(f"resumed after epoch {start}")
    for epoch in range(start, args.epochs):
        began = time.perf_counter()
        model.train()
        set_loader_epoch(train_loader, epoch)
        for step, (images, labels) in enumerate(train_loader):
            if args.max_steps and step >= args.max_steps:
                break
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        top1 = evaluate(model, val_loader)
        history.append({"epoch": epoch + 1, "val_top1": top1, "loss": loss.item(),
                        "seconds": round(time.perf_counter() - began, 1)})
        print(json.dumps(history[-1]), flush=True)
        save({"epoch": epoch + 1, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
              "scheduler": schedule.state_dict(), "history": history}, last)
    # timm's train.py checkpoint: the weights under state_dict, beside the run's settings and metric
    final = {"epoch": args.epochs, "arch": "repvgg_a0", "state_dict": model.state_dict(),
             "optimizer": optimizer.state_dict(), "version": 2, "args": args, "metric": history[-1]["val_top1"]}
    save(final, out / "timm_a0.pth.tar")
    summary = {"model": "timm repvgg_a0", "val_top1": history[-1]["val_top1"], "epochs": history,
               "threads": torch.get_num_threads(), "settings": {k: v for k, v in vars(args).items()
                                                                if k != "func"}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("train", help="train timm's repvgg_a0 on CIFAR-10 and save a timm checkpoint")
    run.add_argument("--out", required=True)
    run.add_argument("--data", default=str(DATA))
    run.add_argument("--epochs", type=int, default=15)
    run.add_argument("--batch-size", type=int, default=128)
    run.add_argument("--lr", type=float, default=0.1)
    run.add_argument("--weight-decay", type=float, default=5e-4)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--bf16", action="store_true", help="bf16 autocast on the CPU")
    run.add_argument("--val-size", type=float, default=5000, help="held-out images (the recipe's data.val_size)")
    run.add_argument("--max-steps", type=int, default=0, help="steps per epoch at most (0: all; for a smoke test)")
    args = parser.parse_args(argv)
    summary = train(args)
    print(f"timm repvgg_a0: val top-1 {summary['val_top1']:.2f}% after {args.epochs} epochs")


if __name__ == "__main__":
    main()
