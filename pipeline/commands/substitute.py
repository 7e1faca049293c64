"""`repq substitute`: RepVGG blocks -> QARepVGG blocks (QARepVGG paper), then training with plain L2 (its M1).

    repq substitute --checkpoint runs/digits/best.pt --out runs/digits_qa --epochs 6
The 3x3 conv + BN and the 1x1 conv weights are carried over; the identity and the post-BN start fresh, so a few
epochs of training follow (the same loop, checkpoints and torchrun support as `repq train`).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="RepVGG training checkpoint (DIR/best.pt of repq train)")
    parser.add_argument("--data", default="digits", help="ImageFolder tree (train/ [val/]) or `digits`")
    parser.add_argument("--out", required=True, help="run folder: metrics.jsonl, last.pt, best.pt")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")


def run(args: argparse.Namespace) -> int:
    from repq.pipeline.train import TrainSettings, load_model_checkpoint, train
    from repq.reparam import substitute_qarepvgg

    model, ckpt = load_model_checkpoint(args.checkpoint)
    model = substitute_qarepvgg(model)
    base = {k: v for k, v in ckpt.get("settings", {}).items() if k in TrainSettings.model_fields}
    settings = TrainSettings(**{**base, "epochs": args.epochs, "lr": args.lr, "l2": "plain", "warmup_epochs": 0})
    summary = train(settings, args.data, args.out, resume=args.resume, initial_model=model)
    if summary.get("rank", 0) == 0:
        best = summary["best"]
        print(f"QARepVGG: best val top-1 {best['val_top1']:.2f}% (deploy form {best['deploy_val_top1']:.2f}%); "
              f"checkpoints in {args.out}")
    return 0
