"""Seconds per RepQ fine-tuning step, as `finetune()` takes it (real batches, distillation teacher), per batch
size: what sizes a fine-tune to a time budget (bench/gpu_session.sh) or compares devices.

    python bench/finetune_step_time.py --checkpoint runs/cifar/best.pt --batch-sizes 128,256,512 --device cuda

Prints one JSON object, {batch size: seconds per step}, on stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from repq.calibration.datasets import load_data
from repq.calibration.loaders import build_loaders
from repq.pipeline.commands.finetune import (
    METHODS,
    distillation_teacher,
    finetune_loss,
    on_model_device,
    quantized_model,
)
from repq.pipeline.distributed import init_distributed
from repq.pipeline.train import load_model_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def seconds_per_step(fp_model, teacher, data, batch_size: int, args) -> float:
    model = quantized_model(copy.deepcopy(fp_model), args.method, args.bits, args.bits, not args.act_unsigned,
                            weight_init=args.weight_init).to(next(fp_model.parameters()).device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader, _ = build_loaders(data, batch_size)
    batches = iter(loader)

    def step() -> None:
        images, labels = on_model_device(model, *next(batches))
        loss = finetune_loss(model(images), images, labels, 0.0, teacher, args.distill)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def synchronize() -> None:
        if next(model.parameters()).is_cuda:
            torch.cuda.synchronize()

    for _ in range(args.warmup):  # the first step sets the LSQ steps and BNEst's corrections
        step()
    synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize()
    return (time.perf_counter() - start) / args.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="FP32 re-param checkpoint (repq train)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "cifar10"))
    parser.add_argument("--batch-sizes", default="128")
    parser.add_argument("--method", choices=METHODS, default="bnest")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--act-unsigned", action="store_true")
    parser.add_argument("--weight-init", default="minerror")
    parser.add_argument("--distill", type=float, default=1.0)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    ctx = init_distributed(args.device)
    data = load_data(args.data, val_size=5000, seed=0)
    fp_model = load_model_checkpoint(args.checkpoint)[0].to(ctx.device)
    teacher = distillation_teacher(fp_model, args.distill)
    result = {}
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        result[batch_size] = seconds_per_step(fp_model, teacher, data, batch_size, args)
        print(f"batch {batch_size} on {ctx.device}: {1000 * result[batch_size]:.1f} ms per step", file=sys.stderr,
              flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
