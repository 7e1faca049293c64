"""Process groups for data-parallel training: torchrun's environment, NCCL on GPUs, gloo on CPUs.

One process (no torchrun) is a world of one and needs no process group. BatchNorm statistics are synchronised
across ranks (torch's SyncBatchNorm on CUDA, `GlobalBatchNorm2d` below on CPUs, where torch's has no kernel),
so N processes train exactly like one process on the same global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from repq.errors import RepqError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # this module created the process group and should destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"


def single_process(device: torch.device | str = "cpu") -> DistContext:
    """A world of one on ``device`` (no process group)."""
    return DistContext(0, 1, 0, torch.device(device), owns_group=False)


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """The torch device a device setting (auto, cpu, cuda[:N]) means for the process of ``local_rank``."""
    import re

    if not re.match(DEVICE_PATTERN, str(device)):
        raise RepqError(f"unknown device {device!r}: use auto (CUDA when present), cpu or cuda (cuda:N)")
    want_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        raise RepqError(f"device {device!r} asked for CUDA but none is available: use --device cpu")
    if not want_cuda:
        return torch.device("cpu")
    torch.cuda.set_device(local_rank % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK), or run as one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world == 1 and not dist.is_initialized():
        return DistContext(0, 1, 0, dev, owns_group=False)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns_group=owns)


def close_distributed(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    """Sum a few float counters across ranks (float64, so image counts stay exact)."""
    if not ctx.distributed:
        return list(values)
    dev = ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(tensor)
    return tensor.tolist()


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum over ranks of the incoming gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(tensor)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span all ranks, on any backend (gloo included).

    Mean and variance come from two differentiable all-reduces, so gradients flow through the global
    statistics exactly as through one BatchNorm on the whole batch. Same parameters, buffers and state_dict
    keys as BatchNorm2d; outside training or outside a process group it is plain BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels = x.shape[1]
        local = torch.tensor([x.numel() / channels], dtype=x.dtype, device=x.device)
        stats = _all_reduce(torch.cat([x.sum((0, 2, 3)), local]))
        count = stats[-1]
        mean = stats[:channels] / count
        centred = x - mean.view(1, -1, 1, 1)
        var = _all_reduce((centred * centred).sum((0, 2, 3))) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (count / (count - 1)), alpha=m)
        out = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out


def sync_batchnorm(model: nn.Module, ctx: DistContext) -> nn.Module:
    """Make every BatchNorm2d compute its batch statistics over all ranks (no-op in one process)."""
    if not ctx.distributed:
        return model
    if ctx.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = GlobalBatchNorm2d  # same tensors and keys, only forward changes
    return model



def wrap_distributed(model: nn.Module, ctx: DistContext, sync_bn: bool = True) -> nn.Module:
    """The module a training step runs: the model itself in one process, DDP over it (BN statistics synced
    across ranks when ``sync_bn``) under torchrun."""
    if not ctx.distributed:
        return model
    if sync_bn:
        model = sync_batchnorm(model, ctx)
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)
