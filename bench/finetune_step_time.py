"""Seconds per RepQ fine-tuning step, as `finetune()` takes it (real batches, distillation teacher), per batch
size: what sizes a fine-tune to a time budget (bench/gpu_session.sh) or compares devices.

    python bench/finetune_step_time.py --checkpoint runs/cifar/best.pt --batch-sizes 128,256,512 --device cuda

Prints one JSON object, {batch size: seconds per step}, on stdout. --method takes the fine-tuning methods of
repq.quant.config.FINETUNE_METHODS; `bnest`, its name before BNEst was split in two, still means bnest_corrected.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from repq.calibration.datasets import load_data
from repq.calibration.loaders import build_loaders
from repq.engines.timing import latency_stats, time_calls
from repq.quant.config import FINETUNE_METHODS, INIT_METHODS
from repq.quant.finetune import distillation_teacher, finetune_loss, on_model_device, quantized_model
from repq.training.distributed import init_distributed
from repq.training.train import load_model_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def seconds_per_step(fp_model, teacher, data, batch_size: int, args) -> float:
    model = quantized_model(copy.deepcopy(fp_model), method=args.method, w_bits=args.bits, a_bits=args.bits,
                            act_unsigned=args.act_unsigned, weight_init=args.weight_init)
    model = model.to(next(fp_model.parameters()).device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader, _ = build_loaders(data, batch_size)
    batches = iter(loader)

    def step() -> None:  # finetune()'s step: it reads each loss back (float), so it waits for the step too
        images, labels = on_model_device(model, *next(batches))
        loss = finetune_loss(model(images), images, labels, 0.0, teacher, args.distill)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        float(loss.detach())

    # the warm-up steps set the LSQ steps and BNEst's corrections
    times = time_calls(step, warmup=args.warmup, runs=args.steps)
    return latency_stats(times, batch_size).mean_ms / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="FP32 re-param checkpoint (repq train)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "cifar10"))
    parser.add_argument("--batch-sizes", default="128")
    parser.add_argument("--method", choices=FINETUNE_METHODS, default="bnest_corrected",
                        type=lambda name: {"bnest": "bnest_corrected"}.get(name, name))
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--act-unsigned", action="store_true")
    parser.add_argument("--weight-init", choices=INIT_METHODS, default="minerror")
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
