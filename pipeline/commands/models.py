"""`repq models`: list the zoo, or check that a model fuses exactly and time both forms."""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check", metavar="NAME", help="build NAME, move its BN statistics, and compare the "
                        "train form with the fused deploy form (output error, parameters, CPU latency)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--width-mult", type=float, default=None, help="width multiplier (RepVGG/QARepVGG only)")
    parser.add_argument("--runs", type=int, default=20, help="timed forwards per form (median reported)")


def run(args: argparse.Namespace) -> int:
    from repq.reparam import list_models, model_doc

    if not args.check:
        for name in list_models():
            print(f"{name:18s} {model_doc(name)}")
        return 0
    report = check_fuse(args.check, args.num_classes, args.image_size, args.width_mult, args.runs)
    for key, value in report.items():
        print(f"{key:24s} {value}")
    return 0


def _median_latency_ms(model: torch.nn.Module, x: torch.Tensor, runs: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            model(x)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def check_fuse(name: str, num_classes: int = 1000, image_size: int = 224, width_mult: float | None = None,
               runs: int = 20) -> dict:
    """Fused vs train-form eval output (relative error) and median CPU latency at batch 1."""
    from repq.reparam import create_model, fuse_model, is_super_resolution

    kwargs = {} if width_mult is None else {"width_mult": width_mult}
    if is_super_resolution(name):
        model, shape = create_model(name, **kwargs), (1, 1, image_size, image_size)
    else:
        model, shape = create_model(name, num_classes=num_classes, **kwargs), (1, 3, image_size, image_size)
    model.train()
    with torch.no_grad():
        for _ in range(2):  # move the BN statistics away from their defaults
            model(torch.randn(2, *shape[1:]) * 2 + 0.5)
    model.eval()
    fused = fuse_model(model)
    x = torch.randn(*shape)
    with torch.no_grad():
        reference = model(x)
        error = ((fused(x) - reference).norm() / reference.norm()).item()
    train_ms, fused_ms = _median_latency_ms(model, x, runs), _median_latency_ms(fused, x, runs)
    return {
        "model": name,
        "params train form (M)": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "params deploy form (M)": round(sum(p.numel() for p in fused.parameters()) / 1e6, 3),
        "fused vs train rel err": f"{error:.2e}",
        "train form latency ms": round(train_ms, 2),
        "fused latency ms": round(fused_ms, 2),
        "speed-up (train/fused)": round(train_ms / fused_ms, 2),
    }
