"""QAT with NVIDIA's toolkit: fine-tune a ModelOpt fake-quantized model with the training stage's loop.

The RepQ paper's two toolkit baselines are both this function applied to a different starting point:
**Plain** -- a plain (never re-parametrized) model, trained and quantized as is; **Merged** -- a re-param model
fused to its deploy form, then quantized (`quant.toolkit.quantize(..., fuse=True)`), then fine-tuned here.
The quantizers' amax stay fixed (TensorRT's QAT recipe); gradients pass the rounding by the straight-through
estimator of ModelOpt's fake quant. The epoch loop, DDP wrapping, optimizer and schedule are those of
`pipeline.train`, so a torchrun launch trains on every rank and only rank 0 writes `last.pt`/`best.pt`
(`quant.toolkit.save_quantized` files that load without recalibrating) and `metrics.jsonl`.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from repq.errors import RepqError
from repq.quant.toolkit import load_state_strict, save_quantized
from repq.reparam.io import atomic_write_text, load_checkpoint


def qat(
    model: nn.Module,
    data,
    out_dir: str | Path,
    *,
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int = 128,
    weight_decay: float = 0.0,
    max_steps_per_epoch: int | None = None,
    resume: bool = False,
    device: str = "auto",
    progress: bool = False,
) -> dict:
    """Fine-tune the fake-quantized `model` in place on `data` (ImageData, SRData, `digits` or a folder).

    Returns {"model", "history", "best", "last_checkpoint", "best_checkpoint"}. `resume=True` continues from
    `out_dir/last.pt` (weights, optimizer, schedule and epoch).
    """
    import torch

    from repq.calibration.datasets import ImageData, load_data
    from repq.calibration.loaders import build_loaders, set_loader_epoch
    from repq.calibration.sr import SRData
    from repq.pipeline.distributed import barrier, close_distributed, init_distributed
    from repq.pipeline.train import (
        TrainSettings,
        _train_epoch,
        _wrap,
        evaluate,
        make_optimizer,
        metric_key,
        warmup_cosine,
    )

    if not any(hasattr(m, "weight_quantizer") for m in model.modules()):
        raise RepqError("QAT needs a fake-quantized model: run quant.toolkit.quantize on it first")
    out = Path(out_dir)
    last_path, best_path = out / "last.pt", out / "best.pt"
    if last_path.exists() and not resume:
        raise RepqError(f"{out} already holds a QAT run: pass resume=True (--resume) or choose another output")
    settings = TrainSettings(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                             optimizer="sgd", warmup_epochs=0, l2="plain", precision="fp32",
                             channels_last=False, device=device, max_steps_per_epoch=max_steps_per_epoch,
                             progress=progress)
    ctx = init_distributed(device)
    try:
        data = data if isinstance(data, ImageData | SRData) else load_data(
            data, val_size=5000 if str(data) != "digits" else 0.1)
        key = metric_key(data)
        model.to(ctx.device)
        optimizer = make_optimizer(model, settings)
        train_loader, val_loader = build_loaders(data, batch_size, seed=settings.seed)
        steps = min(len(train_loader), max_steps_per_epoch or len(train_loader))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps * epochs, 0, 0.0))
        start, history = 0, []
        if resume and last_path.exists():
            ckpt = load_checkpoint(last_path)
            load_state_strict(model, ckpt["state_dict"], last_path)
            extra = ckpt.get("extra", {})
            optimizer.load_state_dict(extra["optimizer"])
            scheduler.load_state_dict(extra["scheduler"])
            start, history = int(extra["epoch"]), list(extra.get("history", []))
        net = _wrap(model, settings, ctx)
        best = max((h[key] for h in history), default=-float("inf"))
        for epoch in range(start, epochs):
            set_loader_epoch(train_loader, epoch)
            stats = _train_epoch(net, model, train_loader, optimizer, scheduler, None, None, settings, ctx,
                                 epoch, steps, False, None)
            metrics = evaluate(model, val_loader, ctx)
            record = {"epoch": epoch + 1, **stats, **{f"val_{k}": v for k, v in metrics.items()}}
            history.append(record)
            if ctx.is_main:
                extra = {"epoch": epoch + 1, "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "history": history}
                save_quantized(model, last_path, extra)
                if record[key] > best:
                    save_quantized(model, best_path, extra)
                atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
            best = max(best, record[key])
            barrier(ctx)
    finally:
        close_distributed(ctx)
    model.eval()
    return {"model": model, "history": history, "best": best, "last_checkpoint": str(last_path),
            "best_checkpoint": str(best_path)}
