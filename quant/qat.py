"""QAT with NVIDIA's toolkit: fine-tune a ModelOpt fake-quantized model in the shared training loop.

The RepQ paper's two toolkit baselines are both this function applied to a different starting point:
**Plain** -- a plain (never re-parametrized) model, trained and quantized as is; **Merged** -- a re-param model
fused to its deploy form, then quantized (`repq.quant.toolkit.quantize(..., fuse=True)`), then fine-tuned here.
The quantizers' amax stay fixed (TensorRT's QAT recipe); gradients pass the rounding by the straight-through
estimator of ModelOpt's fake quant. A torchrun launch trains on every rank and only rank 0 writes
`last.pt`/`best.pt` (`save_quantized` files that load without recalibrating) and `metrics.jsonl`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from torch import nn

from repq.errors import RepqError
from repq.quant.config import QATConfig
from repq.quant.toolkit import load_quantized, load_state_strict, save_quantized
from repq.reparam.io import atomic_write_text, load_checkpoint


def qat(model: nn.Module, data, out_dir: str | Path, config: QATConfig | None = None, *, resume: bool = False,
        **overrides) -> dict:
    """Fine-tune the fake-quantized `model` in place on `data` (ImageData or SRData, or a spec loaded with the
    default split); `overrides` are QATConfig fields.

    Returns {"model", "history", "best", "last_checkpoint", "best_checkpoint"}. `resume=True` continues from
    `out_dir/last.pt` (weights, optimizer, schedule, RNG and step) to the weights an uninterrupted run reaches.
    """
    import torch

    from repq.calibration.datasets import ImageData, load_data
    from repq.calibration.loaders import build_loaders
    from repq.calibration.sr import SRData
    from repq.training.config import TrainConfig
    from repq.training.distributed import barrier, close_distributed, init_distributed, wrap_distributed
    from repq.training.evaluate import evaluate
    from repq.training.loop import Loop, LoopState, fit, restore, train_state, warmup_cosine
    from repq.training.train import make_optimizer, metric_key, task_loss

    c = (config or QATConfig()).model_copy(update=overrides)
    c = QATConfig(**c.model_dump())  # validate the overrides
    if not any(hasattr(m, "weight_quantizer") for m in model.modules()):
        raise RepqError("QAT needs a fake-quantized model: run repq.ptq (quant.toolkit.quantize) on it first")
    out = Path(out_dir)
    last_path, best_path = out / "last.pt", out / "best.pt"
    if last_path.exists() and not resume:
        raise RepqError(f"{out} already holds a QAT run: pass resume=True (--resume) or choose another output")
    ctx = init_distributed(c.device)
    try:
        data = data if isinstance(data, ImageData | SRData) else load_data(data)
        key = metric_key(data)
        model.to(ctx.device)
        optimizer = make_optimizer(model, TrainConfig(optimizer="sgd", lr=c.lr, weight_decay=c.weight_decay,
                                                      l2="plain"))
        train_loader, val_loader = build_loaders(data, min(c.batch_size, len(data.train)), seed=c.seed)
        per_epoch = min(len(train_loader), c.max_steps_per_epoch or len(train_loader))
        total = per_epoch * c.epochs
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, 0, 0.0))
        plan = {"total_steps": total, "steps_per_epoch": per_epoch, "lr": c.lr, "weight_decay": c.weight_decay}
        state = LoopState()
        if resume and last_path.exists():
            ckpt = load_checkpoint(last_path)
            load_state_strict(model, ckpt["state_dict"], last_path)
            state = restore(ckpt.get("extra", {}).get("train_state"), last_path, plan, optimizer, scheduler)
        best = max((h[key] for h in state.history), default=-math.inf)

        def end_epoch(epoch: int, stats: dict) -> None:
            nonlocal best
            metrics = evaluate(model, val_loader, ctx)
            record = {"epoch": epoch + 1, **stats, **{f"val_{k}": v for k, v in metrics.items()}}
            state.history.append(record)
            if ctx.is_main:
                extra = {"data": data.describe(), "history": state.history,
                         "train_state": train_state(state, plan, optimizer, scheduler)}
                if record[key] > best:  # best.pt first: last.pt, where a resume starts, never gets ahead of it
                    save_quantized(model, best_path, extra)
                save_quantized(model, last_path, extra)
                atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in state.history))
            best = max(best, record[key])
            barrier(ctx)

        def loss_fn(outputs, images, labels):
            loss = task_loss(outputs, labels)
            return loss, loss

        loop = Loop(model, train_loader, optimizer, scheduler, loss_fn, total, per_epoch, ctx.device, ctx=ctx,
                    net=wrap_distributed(model, ctx), desc="qat", progress=ctx.is_main and c.progress,
                    keep_losses=False)
        fit(loop, state, end_epoch=end_epoch)
    finally:
        close_distributed(ctx)
    model.eval()
    return {"model": model, "history": state.history, "best": best, "last_checkpoint": str(last_path),
            "best_checkpoint": str(best_path)}


def qat_file(quantized: str | Path, data, config: QATConfig, out_dir: str | Path, *, resume: bool = False) -> dict:
    """Toolkit QAT of a `repq ptq` file: its model, on ``data`` read with the split that file records (so the
    model is validated on images it never trained on), into ``out_dir``."""
    from repq.calibration.datasets import data_from_record

    model = load_quantized(quantized)
    record = load_checkpoint(quantized).get("extra", {}).get("data", {})
    return qat(model, data_from_record(data, record), out_dir, config, resume=resume)
