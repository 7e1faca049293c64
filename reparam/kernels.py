"""Pure tensor functions that merge branch kernels into one conv kernel.

Every function is differentiable and free of in-place ops on its inputs: RepQ trains through them.
Kernels use PyTorch's layout ``[out, in/groups, kh, kw]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Kernel = tuple[Tensor, Tensor]  # (weight, bias)


def bn_fold(weight: Tensor, bias: Tensor | None, bn: nn.BatchNorm2d, stats: tuple[Tensor, Tensor] | None = None
            ) -> Kernel:
    """conv(x, weight) + bias followed by ``bn`` in eval mode, as one (weight, bias).

    ``stats`` = (mean, var) replaces the running statistics: RepQ-BN folds with the batch mean and the updated
    running variance (RepQ paper, Algorithm 1, lines 5-6).
    """
    mean, var = stats if stats is not None else (bn.running_mean, bn.running_var)
    inv_std = torch.rsqrt(var + bn.eps)
    scale = bn.weight * inv_std if bn.affine else inv_std
    shift = bn.bias if bn.affine else torch.zeros_like(mean)
    conv_bias = bias if bias is not None else torch.zeros_like(mean)
    return weight * scale.reshape(-1, 1, 1, 1), shift + (conv_bias - mean) * scale


def pad_to(weight: Tensor, size: tuple[int, int]) -> Tensor:
    """Zero-pad a smaller odd kernel to ``size``, centred (a 1x1 or 1x3 branch inside a 3x3 conv)."""
    dh, dw = size[0] - weight.shape[2], size[1] - weight.shape[3]
    if dh < 0 or dw < 0 or dh % 2 or dw % 2:
        raise ValueError(f"cannot centre a {tuple(weight.shape[2:])} kernel in {size}")
    return F.pad(weight, (dw // 2, dw // 2, dh // 2, dh // 2))


def identity_kernel(channels: int, groups: int, size: tuple[int, int] = (1, 1), *, like: Tensor) -> Tensor:
    """The kernel of the identity map: channel c reads its own input at the kernel centre."""
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, *size, dtype=like.dtype, device=like.device)
    index = torch.arange(channels, device=like.device)
    kernel[index, index % per_group, size[0] // 2, size[1] // 2] = 1.0
    return kernel


def avg_kernel(channels: int, groups: int, size: tuple[int, int], *, like: Tensor) -> Tensor:
    """The kernel of a channel-wise average pool (count_include_pad) over ``size``."""
    point = identity_kernel(channels, groups, (1, 1), like=like)
    return point.expand(-1, -1, *size) / (size[0] * size[1])


def compose(first: Kernel, second: Kernel, groups: int) -> Kernel:
    """A 1x1 conv ``first`` followed by a kxk conv ``second``, both with ``groups``, as one kxk conv.

    Exact when the intermediate map is padded with the 1x1 conv's bias (DBB's BNAndPad, ECB's bias padding):
    then the kxk conv over that map equals the merged conv over the zero-padded input.
    """
    (w1, b1), (w2, b2) = first, second
    mid, in_per_group = w1.shape[0], w1.shape[1]
    out, mid_per_group, kh, kw = w2.shape
    w1g = w1.reshape(groups, mid // groups, in_per_group)
    w2g = w2.reshape(groups, out // groups, mid_per_group, kh, kw)
    weight = torch.einsum("gomhw,gmi->goihw", w2g, w1g).reshape(out, in_per_group, kh, kw)
    bias = torch.zeros(out, dtype=w2.dtype, device=w2.device) if b2 is None else b2
    if b1 is not None:
        bias = bias + torch.einsum("gomhw,gm->go", w2g, b1.reshape(groups, mid // groups)).reshape(out)
    return weight, bias


def compose_depthwise(first: Kernel, depthwise: Kernel) -> Kernel:
    """A dense 1x1 conv followed by a depthwise kxk conv, as one kxk conv (ECB's Sobel/Laplacian branches)."""
    (w1, b1), (w2, b2) = first, depthwise
    weight = w2 * w1  # [out,1,kh,kw] * [out,in,1,1] -> [out,in,kh,kw]
    return weight, b2 if b1 is None else b2 + w2.sum(dim=(1, 2, 3)) * b1
