"""Does a zoo model fuse exactly, and what does fusing buy: the train form against its fused deploy form
(output error, parameters, eval latency on this CPU). `repq models --check` and `bench/fuse_latency.py` print it.
"""

from __future__ import annotations

import torch
from torch import nn


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
    train_ms, fused_ms = median_latency_ms(model, x, runs), median_latency_ms(fused, x, runs)
    return {
        "model": name,
        "params train form (M)": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "params deploy form (M)": round(sum(p.numel() for p in fused.parameters()) / 1e6, 3),
        "fused vs train rel err": f"{error:.2e}",
        "train form latency ms": round(train_ms, 2),
        "fused latency ms": round(fused_ms, 2),
        "speed-up (train/fused)": round(train_ms / fused_ms, 2),
    }


def median_latency_ms(model: nn.Module, x: torch.Tensor, runs: int, warmup: int = 3) -> float:
    """Median wall time of one no-grad forward of ``x``, in ms (engines.timing's timer and statistics)."""
    from repq.engines.timing import latency_stats, time_calls

    with torch.no_grad():
        times = time_calls(lambda: model(x), warmup=warmup, runs=runs)
    return latency_stats(times, len(x)).median_ms
