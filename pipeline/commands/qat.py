"""`repq qat`: fine-tune a `repq ptq` model with its fake quantizers (the toolkit's QAT: Plain / Merged baselines).

    repq qat --quantized runs/a0/ptq_max.pt --data ../shared/datasets/cifar10 --epochs 3 --lr 1e-3 --out runs/a0/qat
    torchrun --nproc_per_node 2 -m pipeline.cli qat ...          # DDP, as `repq train`
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantized", required=True, help="output of `repq ptq`")
    parser.add_argument("--data", default="digits", help="ImageFolder tree or `digits`")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-steps-per-epoch", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument("--out", required=True, help="run folder: last.pt, best.pt, metrics.jsonl")


def run(args: argparse.Namespace) -> int:
    from repq.pipeline.qat import qat
    from repq.quant.toolkit import load_quantized

    model = load_quantized(args.quantized)
    result = qat(model, args.data, args.out, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                 max_steps_per_epoch=args.max_steps_per_epoch, resume=args.resume, device=args.device)
    print(f"QAT done: best val top-1 {result['best']:.2f}%, checkpoints in {args.out}")
    return 0
