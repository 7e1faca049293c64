"""PyTorch evaluation: top-1/top-5 (or PSNR) of a model over a loader, counted over every rank of a group.

Every evaluation batch is checked for NaN/Inf first: a broken image must stop the run, not move the score.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from repq.engines.timing import quality_key
from repq.progress import Progress
from repq.training.distributed import DistContext, all_reduce_sum, single_process
from repq.training.loop import check_finite, to_device


@torch.no_grad()
def evaluate(model: nn.Module, loader, ctx: DistContext | None = None, channels_last: bool = False,
             reference: nn.Module | None = None, *, progress: bool = False, desc: str = "evaluate") -> dict:
    """Top-1 (and top-5 over more than 5 classes) in percent, counted over all ranks; or, for a val set that
    scores itself (super-resolution), its score (PSNR), which every rank computes over all images.

    With `reference`, also the largest |output difference| between the two models on the same images and, for
    classification, the reference's own top-1/top-5 from the same pass (``result["reference"]``).
    """
    ctx = ctx or single_process(next(model.parameters()).device)
    model.eval()
    if reference is not None:
        reference.eval()
    if hasattr(loader, "score"):
        return _self_scored(model, loader, ctx, reference)
    models = [model] if reference is None else [model, reference]
    correct = torch.zeros(len(models), 2, dtype=torch.float64)  # per model: top-1 hits, top-5 hits
    count, gap, scale, num_classes = 0.0, 0.0, 0.0, 0
    bar = Progress(len(loader) if hasattr(loader, "__len__") else 0, desc, unit="batch",
                   enabled=progress and ctx.is_main)
    for images, labels in loader:
        check_finite(images, f"{desc}: an evaluation batch")
        images, labels = to_device(images, labels, ctx.device, channels_last, _dtype_of(model))
        outputs = [m(images).float() for m in models]
        num_classes = outputs[0].shape[1]
        for i, logits in enumerate(outputs):
            hits = logits.topk(min(5, num_classes), dim=1).indices == labels[:, None]
            correct[i, 0] += float(hits[:, 0].sum())
            correct[i, 1] += float(hits.any(dim=1).sum())
        count += len(labels)
        if reference is not None:
            gap = max(gap, float((outputs[0] - outputs[1]).abs().max()))
            scale = max(scale, float(outputs[1].abs().max()))
        bar.update()
    bar.close()
    *totals, count = all_reduce_sum([*correct.flatten().tolist(), count], ctx)
    scores = [_topk(totals[2 * i], totals[2 * i + 1], count, num_classes) for i in range(len(models))]
    result = {**scores[0], "count": int(count)}
    if reference is not None:
        result["reference"] = scores[1]
        result["max_logit_diff"], result["logit_scale"] = all_reduce_max(gap, ctx), all_reduce_max(scale, ctx)
    return result


def _topk(correct1: float, correct5: float, count: float, num_classes: int) -> dict:
    result = {"top1": 100.0 * correct1 / max(count, 1)}
    if num_classes > 5:
        result["top5"] = 100.0 * correct5 / max(count, 1)
    return result


def _self_scored(model: nn.Module, loader, ctx: DistContext, reference: nn.Module | None) -> dict:
    gap, scale = 0.0, 0.0

    def predict(images: np.ndarray) -> np.ndarray:
        nonlocal gap, scale
        check_finite(torch.from_numpy(images), "an evaluation image")
        x = torch.from_numpy(images).to(ctx.device, _dtype_of(model))
        out = model(x).float()
        if reference is not None:
            other = reference(x).float()
            gap, scale = max(gap, float((out - other).abs().max())), max(scale, float(other.abs().max()))
        return out.cpu().numpy()

    result = loader.score(predict)
    result["count"] = result.pop("images")
    if reference is not None:
        result["max_logit_diff"], result["logit_scale"] = gap, scale
    return result


def evaluate_with_deploy(model: nn.Module, loader, ctx: DistContext, channels_last: bool) -> dict:
    """Score the train-form model and its fused deploy form; they must agree (printed as a sanity check)."""
    from repq.reparam import fuse_model

    plain = _plain_copy(model)
    deploy_form = evaluate(fuse_model(plain), loader, ctx, channels_last, reference=plain)  # fuses a copy
    # classification scores the train form in the same pass; a self-scoring (SR) set needs its own
    train_form = deploy_form.get("reference") or evaluate(plain, loader, ctx, channels_last)
    gap = deploy_form["max_logit_diff"]
    agrees = gap <= 1e-3 * max(1.0, deploy_form["logit_scale"])
    key = quality_key(train_form)
    metrics = {f"val_{key}": train_form[key], f"deploy_val_{key}": deploy_form[key],
               "deploy_max_logit_diff": gap, "deploy_agrees": agrees}
    if "top5" in train_form:
        metrics["val_top5"], metrics["deploy_val_top5"] = train_form["top5"], deploy_form["top5"]
    return metrics


def all_reduce_max(value: float, ctx: DistContext) -> float:
    if not ctx.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_reduce_device(ctx))
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return float(tensor.item())


def _reduce_device(ctx: DistContext) -> torch.device:
    return ctx.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")


def _dtype_of(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _plain_copy(model: nn.Module) -> nn.Module:
    """A fresh model of the same arch with the same weights: plain BatchNorm2d, no DDP, on the same device."""
    import copy

    from repq.reparam import model_from_arch

    if getattr(model, "repq_arch", None) is None:  # a user's own model: a copy (DDP-free by construction)
        return copy.deepcopy(model)
    plain = model_from_arch(model.repq_arch)
    plain.load_state_dict(model.state_dict())
    return plain.to(device=next(model.parameters()).device, dtype=_dtype_of(model))
