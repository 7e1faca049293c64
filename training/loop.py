"""The one training loop: FP training, toolkit QAT and RepQ fine-tuning share its step, schedule, distributed
wrapping, progress and resumable state.

A run is ``total`` optimizer steps over ``steps_per_epoch`` batches an epoch. Its state (step, optimizer,
schedule, gradient scaler, RNG, losses, per-epoch history and the caller's extras) is one dict, ``train_state``,
saved beside the model's ``state_dict`` in any checkpoint a caller writes. A run continued from it takes the
batches of the interrupted epoch that were not taken yet (loaders are seeded per epoch), so it ends with the
weights an uninterrupted run ends with, bit for bit.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from repq.errors import RepqError
from repq.progress import Progress

STATE_FORMAT = "repq-train-state/1"


# ------------------------------------------------------------------------------------------------ schedule


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR factor per step: linear warm-up to 1, then cosine down to min_ratio at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# ------------------------------------------------------------------------------------------------ RNG


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_as_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------ state


@dataclass
class LoopState:
    """Where a run is: optimizer steps taken, their losses, one record per finished epoch, caller extras."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def train_state(state: LoopState, plan: dict, optimizer, scheduler, scaler=None) -> dict:
    """The resumable state of a run, as saved in a checkpoint's ``train_state`` (weights are saved beside it)."""
    return {"format": STATE_FORMAT, "plan": plan, "step": state.step, "losses": list(state.losses),
            "history": list(state.history), "extra": dict(state.extra), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_state()}


def restore(saved: dict, source: str | Path, plan: dict, optimizer, scheduler, scaler=None, *,
            strict_plan: bool = True, log: Callable[[str], None] = print) -> LoopState:
    """Put a run back where ``saved`` (a checkpoint's ``train_state``) left it; the model's weights are the
    caller's to load. A different plan (steps, schedule, loss settings) is refused (``strict_plan``) or noted."""
    if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT:
        raise RepqError(f"{source} holds no resumable training state of this repq version: move it away, or "
                        "choose another output folder, to start over")
    differs = [f"{k} {v} there, {plan.get(k)} here" for k, v in saved["plan"].items() if plan.get(k) != v]
    if differs and strict_plan:
        raise RepqError(f"{source} is the state of another run ({'; '.join(differs)}): rerun with its settings "
                        "to continue it, or delete it to start over")
    if differs:
        log(f"note: settings changed since {source} (old, new): {'; '.join(differs)}")
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and saved.get("scaler") is not None:
        scaler.load_state_dict(saved["scaler"])
    set_rng_state(saved["rng"])
    return LoopState(int(saved["step"]), list(saved["losses"]), list(saved["history"]), dict(saved["extra"]))


# ------------------------------------------------------------------------------------------------ batches


def to_device(images: torch.Tensor, labels: torch.Tensor, device, channels_last: bool = False,
              dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch on the model's device and dtype, NHWC when asked."""
    images = images.to(device, dtype=dtype, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def check_finite(images: torch.Tensor, where: str) -> None:
    """Stop on NaN or Inf input before it poisons the weights."""
    if not torch.isfinite(images).all():
        bad = int((~torch.isfinite(images)).sum())
        raise RepqError(f"{where}: the input batch holds {bad} NaN/Inf values: check the data and its "
                        "transform")


# ------------------------------------------------------------------------------------------------ the loop


@dataclass
class EpochStats:
    """Running sums of one epoch (this rank's): loss weighted by batch, correct predictions, images."""

    loss_sum: float = 0.0
    correct: float = 0.0
    seen: float = 0.0
    classifying: bool = True


@dataclass
class Loop:
    """Everything one optimizer step needs. ``loss_fn(outputs, images, labels)`` returns (the loss to
    back-propagate, the loss to report); ``net`` is the (possibly DDP-wrapped) module the batch goes through."""

    model: nn.Module
    loader: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: Callable
    total: int
    steps_per_epoch: int
    device: torch.device
    ctx: Any = None  # training.distributed.DistContext; None: one process
    net: nn.Module | None = None
    autocast: torch.dtype | None = None
    scaler: Any = None
    channels_last: bool = False
    prepare: Callable[[torch.Tensor, int], torch.Tensor] | None = None  # (images, epoch) -> images
    train_mode: Callable[[], None] | None = None  # called at each epoch start; default model.train()
    desc: str = "train"
    progress: bool = True
    keep_losses: bool = True  # every step's loss in the state (a fine-tune's record; an FP run keeps epochs)
    failure_hint: str = "lower the learning rate (--lr) or check the data"


def fit(loop: Loop, state: LoopState, *, before_step: Callable[[int], None] | None = None,
        after_step: Callable[[int, int], None] | None = None,
        end_epoch: Callable[[int, dict], None] | None = None) -> LoopState:
    """Run ``loop`` from ``state.step`` to ``loop.total`` steps; the hooks get the step about to run
    (``before_step``), the epoch and steps taken after each step (``after_step``), and each finished epoch with
    its training statistics (``end_epoch``: train_loss, train_top1 when classifying, images_per_s,
    epoch_seconds, summed over the ranks of a process group)."""
    import time

    from repq.calibration.loaders import set_loader_epoch
    from repq.training.distributed import all_reduce_sum

    net = loop.net or loop.model
    dtype = next(loop.model.parameters()).dtype
    bar = Progress(loop.total, loop.desc, initial=state.step, enabled=loop.progress)
    try:
        while state.step < loop.total:
            epoch, taken = divmod(state.step, loop.steps_per_epoch)
            set_loader_epoch(loop.loader, epoch)
            (loop.train_mode or net.train)()
            stats, start = EpochStats(), time.perf_counter()
            for images, labels in itertools.islice(loop.loader, taken, loop.steps_per_epoch):
                if before_step is not None:
                    before_step(state.step)
                check_finite(images, f"{loop.desc}: epoch {epoch + 1}, step {state.step}")
                stats.classifying = not labels.is_floating_point()
                images, labels = to_device(images, labels, loop.device, loop.channels_last, dtype)
                if loop.prepare is not None:
                    images = loop.prepare(images, epoch)
                with torch.autocast(loop.device.type, dtype=loop.autocast) if loop.autocast else nullcontext():
                    outputs = net(images)
                    loss, shown = loop.loss_fn(outputs, images, labels)
                if not torch.isfinite(shown) or not torch.isfinite(loss):
                    bad = shown if not torch.isfinite(shown) else loss
                    raise RepqError(f"{loop.desc}: the loss became {bad.item()} at step {state.step} (epoch "
                                    f"{epoch + 1}): {loop.failure_hint}")
                _optimizer_step(loop, loss)
                value = float(shown.detach())
                state.step += 1
                if loop.keep_losses:
                    state.losses.append(value)
                stats.loss_sum += value * len(labels)
                if stats.classifying and outputs.dim() == 2:
                    stats.correct += float((outputs.argmax(1) == labels).sum())
                stats.seen += len(labels)
                bar.update(loss=f"{stats.loss_sum / stats.seen:.4f}")
                if after_step is not None:
                    after_step(epoch, state.step)
                if state.step >= loop.total:
                    break
            if end_epoch is not None and (state.step % loop.steps_per_epoch == 0 or state.step >= loop.total):
                elapsed = time.perf_counter() - start
                sums = [stats.loss_sum, stats.correct, stats.seen]
                loss_sum, correct, seen = all_reduce_sum(sums, loop.ctx) if loop.ctx is not None else sums
                record = {"train_loss": loss_sum / max(seen, 1), "images_per_s": seen / max(elapsed, 1e-9),
                          "epoch_seconds": elapsed}
                if stats.classifying:
                    record["train_top1"] = 100.0 * correct / max(seen, 1)
                end_epoch(epoch, record)
    finally:
        bar.close()
    return state


def _optimizer_step(loop: Loop, loss: torch.Tensor) -> None:
    loop.optimizer.zero_grad(set_to_none=True)
    if loop.scaler is not None:
        loop.scaler.scale(loss).backward()
        loop.scaler.step(loop.optimizer)
        loop.scaler.update()
    else:
        loss.backward()
        loop.optimizer.step()
    loop.scheduler.step()
