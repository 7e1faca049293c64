"""The re-param block families. Each merges exactly into one kxk conv; activations live outside the blocks.

Papers: RepVGG (Ding et al., CVPR 2021), QARepVGG (Chu et al., AAAI 2024), ACNet (Ding et al., ICCV 2019),
DBB (Ding et al., CVPR 2021), OREPA (Hu et al., CVPR 2022), ECBSR (Zhang et al., ACM MM 2021).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repq.errors import RepqError
from repq.reparam.block import BNStats, BNTap, ConvBN, PointwiseConv, ReparamBlock, copy_bn, silence_bn, stats_for
from repq.reparam.kernels import (
    Kernel,
    avg_kernel,
    bn_fold,
    compose,
    compose_depthwise,
    identity_kernel,
    pad_to,
)
from repq.reparam.mobileone import MobileOneBlock


def pad_with(x: Tensor, value: Tensor, pad: int) -> Tensor:
    """Pad ``x`` by ``pad`` pixels with a per-channel ``value`` instead of zeros."""
    value = value.reshape(1, -1, 1, 1)
    return F.pad(x - value, [pad] * 4) + value


def _load_main(branch: ConvBN, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        branch.conv.weight.copy_(conv.weight)
    copy_bn(branch.bn, bn, conv.bias)


def _identity_tap(bn: nn.BatchNorm2d, channels: int, groups: int) -> BNTap:
    def kernel(stats=None):
        return identity_kernel(channels, groups, like=bn.running_var), None

    return BNTap(bn, kernel, 1, 0, groups)


class PlainBlock(ReparamBlock):
    """One kxk conv-BN, no extra branches: the baseline trained without re-parametrization (RepQ's Plain,
    RepVGG's VGG-style plain model). It fuses like the others (BN folded), so every tool treats it alike."""

    def _build_branches(self) -> None:
        self.conv_bn = ConvBN(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                              self.groups)

    def _train_forward(self, x: Tensor) -> Tensor:
        return self.conv_bn(x)

    def load_conv_bn(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        _load_main(self.conv_bn, conv, bn)

    def bn_taps(self) -> dict[str, BNTap]:
        return {"conv_bn": self.conv_bn.tap()}

    def branch_kernels(self, bn_stats: BNStats | None = None) -> dict[str, Kernel]:
        return {"conv_bn": self.conv_bn.folded(bn_stats, "conv_bn")}


class RepVGGBlock(ReparamBlock):
    """kxk conv-BN + 1x1 conv-BN + identity-BN (identity only when shapes allow)."""

    def _build_branches(self) -> None:
        c_in, c_out, k, s, g = self.in_channels, self.out_channels, self.kernel_size, self.stride, self.groups
        self.rbr_dense = ConvBN(c_in, c_out, k, s, self.padding, g)
        self.rbr_1x1 = ConvBN(c_in, c_out, 1, s, 0, g)
        self.rbr_identity = nn.BatchNorm2d(c_out) if c_in == c_out and s == 1 else None

    def _train_forward(self, x: Tensor) -> Tensor:
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        return out + self.rbr_identity(x) if self.rbr_identity is not None else out

    def load_conv_bn(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        _load_main(self.rbr_dense, conv, bn)
        silence_bn(self.rbr_1x1.bn)
        if self.rbr_identity is not None:
            silence_bn(self.rbr_identity)

    def bn_taps(self) -> dict[str, BNTap]:
        taps = {"rbr_dense": self.rbr_dense.tap(), "rbr_1x1": self.rbr_1x1.tap()}
        if self.rbr_identity is not None:
            taps["rbr_identity"] = _identity_tap(self.rbr_identity, self.out_channels, self.groups)
        return taps

    def branch_kernels(self, bn_stats: BNStats | None = None) -> dict[str, Kernel]:
        w3, b3 = self.rbr_dense.folded(bn_stats, "rbr_dense")
        w1, b1 = self.rbr_1x1.folded(bn_stats, "rbr_1x1")
        pieces = {"rbr_dense": (w3, b3), "rbr_1x1": (pad_to(w1, self.kernel_hw), b1)}
        if self.rbr_identity is not None:
            ident = identity_kernel(self.out_channels, self.groups, self.kernel_hw, like=w3)
            pieces["rbr_identity"] = bn_fold(ident, None, self.rbr_identity, stats_for(bn_stats, "rbr_identity"))
        return pieces

    def custom_l2(self) -> Tensor:
        """RepVGG's L2 on the merged kernel: plain L2 on the kxk ring, and on the centre the L2 of the
        equivalent (BN-scaled) centre of kxk + 1x1, normalised to stay comparable with plain L2."""
        k3, k1 = self.rbr_dense.conv.weight, self.rbr_1x1.conv.weight
        t3 = _bn_scale(self.rbr_dense.bn).detach().reshape(-1, 1, 1, 1)
        t1 = _bn_scale(self.rbr_1x1.bn).detach().reshape(-1, 1, 1, 1)
        c = self.kernel_size // 2
        centre = k3[:, :, c:c + 1, c:c + 1]
        ring = (k3 ** 2).sum() - (centre ** 2).sum()
        equivalent = centre * t3 + k1 * t1
        return ring + (equivalent ** 2 / (t3 ** 2 + t1 ** 2)).sum()


def _bn_scale(bn: nn.BatchNorm2d) -> Tensor:
    return bn.weight / torch.sqrt(bn.running_var + bn.eps)


def _fold_shares(pre_bn: dict[str, tuple[Tensor, Tensor | None]], bn: nn.BatchNorm2d,
                 stats: tuple[Tensor, Tensor] | None) -> dict[str, Kernel]:
    """The shares of branches summed before one BN: each scaled by the BN, and the BN's shift as ``bn_shift``."""
    zero = torch.zeros_like(next(iter(pre_bn.values()))[0])
    scale_only, shift = bn_fold(zero, None, bn, stats)
    scale = bn_fold(torch.ones_like(shift).reshape(-1, 1, 1, 1), None, bn, stats)[0].reshape(-1)
    shares = {name: (weight * scale.reshape(-1, 1, 1, 1), torch.zeros_like(shift) if bias is None else bias * scale)
              for name, (weight, bias) in pre_bn.items()}
    shares["bn_shift"] = (scale_only, shift)
    return shares


class QARepVGGBlock(ReparamBlock):
    """QARepVGG: kxk conv-BN + 1x1 conv (no BN) + bare identity, then one BN after the sum."""

    def _build_branches(self) -> None:
        c_in, c_out, k, s, g = self.in_channels, self.out_channels, self.kernel_size, self.stride, self.groups
        self.rbr_dense = ConvBN(c_in, c_out, k, s, self.padding, g)
        self.rbr_1x1 = PointwiseConv(c_in, c_out, s, g)
        self.has_identity = c_in == c_out and s == 1
        self.post_bn = nn.BatchNorm2d(c_out)

    def _train_forward(self, x: Tensor) -> Tensor:
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        return self.post_bn(out + x if self.has_identity else out)

    def _pre_bn_kernel(self, bn_stats: BNStats | None = None) -> Kernel:
        w3, b3 = self.rbr_dense.folded(bn_stats, "rbr_dense")
        weight = w3 + pad_to(self.rbr_1x1.weight, self.kernel_hw)
        if self.has_identity:
            weight = weight + identity_kernel(self.out_channels, self.groups, self.kernel_hw, like=w3)
        return weight, b3

    def bn_taps(self) -> dict[str, BNTap]:
        return {"rbr_dense": self.rbr_dense.tap(),
                "post_bn": BNTap(self.post_bn, self._pre_bn_kernel, self.stride, self.padding, self.groups)}

    def merged_kernel(self, bn_stats: BNStats | None = None) -> Kernel:
        weight, bias = self._pre_bn_kernel(bn_stats)
        return bn_fold(weight, bias, self.post_bn, stats_for(bn_stats, "post_bn"))

    def branch_kernels(self, bn_stats: BNStats | None = None) -> dict[str, Kernel]:
        """Each branch scaled by the post-BN (equal to merged_kernel up to float rounding); its shift is
        ``post_bn``."""
        w3, b3 = self.rbr_dense.folded(bn_stats, "rbr_dense")
        pre = {"rbr_dense": (w3, b3), "rbr_1x1": (pad_to(self.rbr_1x1.weight, self.kernel_hw), None)}
        if self.has_identity:
            pre["identity"] = (identity_kernel(self.out_channels, self.groups, self.kernel_hw, like=w3), None)
        return _fold_shares(pre, self.post_bn, stats_for(bn_stats, "post_bn"))


class ACBlock(ReparamBlock):
    """ACNet's asymmetric convolution block: kxk, 1xk and kx1 convs, each with BN."""

    def _build_branches(self) -> None:
        c_in, c_out, k, s, g, p = (self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                   self.groups, self.padding)
        self.square = ConvBN(c_in, c_out, (k, k), s, (p, p), g)
        self.hor = ConvBN(c_in, c_out, (1, k), s, (0, p), g)
        self.ver = ConvBN(c_in, c_out, (k, 1), s, (p, 0), g)

    def _train_forward(self, x: Tensor) -> Tensor:
        return self.square(x) + self.hor(x) + self.ver(x)

    def load_conv_bn(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        _load_main(self.square, conv, bn)
        silence_bn(self.hor.bn)
        silence_bn(self.ver.bn)

    def bn_taps(self) -> dict[str, BNTap]:
        return {"square": self.square.tap(), "hor": self.hor.tap(), "ver": self.ver.tap()}

    def branch_kernels(self, bn_stats: BNStats | None = None) -> dict[str, Kernel]:
        pieces = {}
        for name in ("square", "hor", "ver"):
            w, b = getattr(self, name).folded(bn_stats, name)
            pieces[name] = (pad_to(w, self.kernel_hw), b)
        return pieces


class BNAndPad(nn.Module):
    """BN whose output is padded with the value BN gives a zero input (DBB), so a following unpadded conv
    equals a conv of the zero-padded block input: the merge stays exact at the borders."""

    def __init__(self, channels: int, pad: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn(x)
        if self.pad == 0:
            return out
        if self.bn.training:
            mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
        else:
            mean, var = self.bn.running_mean, self.bn.running_var
        value = self.bn.bias - mean * self.bn.weight * torch.rsqrt(var + self.bn.eps)
        return pad_with(out, value, self.pad)


class IdentityBased1x1(nn.Conv2d):
    """A 1x1 conv parametrised as identity + W (DBB/OREPA), so the branch starts as a pass-through. With more
    outputs than inputs (OREPA's doubled width at groups > 4) output i copies input i modulo the group's width."""

    def __init__(self, channels: int, groups: int, out_channels: int | None = None):
        out_channels = out_channels or channels
        super().__init__(channels, out_channels, 1, groups=groups, bias=False)
        nn.init.zeros_(self.weight)
        eye = torch.zeros_like(self.weight.detach())
        rows = torch.arange(out_channels)
        eye[rows, rows % (channels // groups)] = 1.0
        self.register_buffer("eye", eye, persistent=False)

    def effective_weight(self) -> Tensor:
        return self.weight + self.eye

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.effective_weight(), None, 1, 0, 1, self.groups)


class DBBlock(ReparamBlock):
    """Diverse Branch Block: kxk-BN, 1x1-BN, 1x1-BN-avg-BN and 1x1-BN-kxk-BN branches."""

    def _build_branches(self) -> None:
        c_in, c_out, k, s, g, p = (self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                   self.groups, self.padding)
        if g >= c_out and c_in != c_out:
            raise RepqError(f"DBBlock with groups={g} >= out_channels needs in == out channels, got {c_in}->{c_out}")
        self.depthwise = g >= c_out
        self.origin = ConvBN(c_in, c_out, k, s, p, g)
        if not self.depthwise:
            self.one = ConvBN(c_in, c_out, 1, s, 0, g)
            self.avg_conv = nn.Conv2d(c_in, c_out, 1, 1, 0, groups=g, bias=False)
            self.avg_pad = BNAndPad(c_out, p)
        self.avg_bn = nn.BatchNorm2d(c_out)
        internal = c_in if not self.depthwise else 2 * c_in
        self.kk_1x1 = IdentityBased1x1(c_in, g) if internal == c_in else nn.Conv2d(c_in, internal, 1, groups=g,
                                                                                    bias=False)
        self.kk_pad = BNAndPad(internal, p)
        self.kk_conv = nn.Conv2d(internal, c_out, k, s, 0, groups=g, bias=False)
        self.kk_bn = nn.BatchNorm2d(c_out)

    def load_conv_bn(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        _load_main(self.origin, conv, bn)
        for branch_bn in (self.avg_bn, self.kk_bn) + (() if self.depthwise else (self.one.bn,)):
            silence_bn(branch_bn)

    def _kk_first_weight(self) -> Tensor:
        return self.kk_1x1.effective_weight() if isinstance(self.kk_1x1, IdentityBased1x1) else self.kk_1x1.weight

    def _train_forward(self, x: Tensor) -> Tensor:
        k, s, p = self.kernel_size, self.stride, self.padding
        out = self.origin(x)
        if self.depthwise:
            out = out + self.avg_bn(F.avg_pool2d(x, k, s, p))
        else:
            out = out + self.one(x)
            out = out + self.avg_bn(F.avg_pool2d(self.avg_pad(self.avg_conv(x)), k, s, 0))
        inner = self.kk_pad(F.conv2d(x, self._kk_first_weight(), None, 1, 0, 1, self.groups))
        return out + self.kk_bn(self.kk_conv(inner))

    # Kernels of the BN inputs, as convs of the block input.
    def _avg_input(self, bn_stats=None) -> Kernel:
        hw = self.kernel_hw
        if self.depthwise:
            return avg_kernel(self.in_channels, self.groups, hw, like=self.origin.conv.weight), None
        w, b = bn_fold(self.avg_conv.weight, None, self.avg_pad.bn, stats_for(bn_stats, "avg_pad"))
        return w.expand(-1, -1, *hw) / (hw[0] * hw[1]), b

    def _kk_input(self, bn_stats=None) -> Kernel:
        first = bn_fold(self._kk_first_weight(), None, self.kk_pad.bn, stats_for(bn_stats, "kk_pad"))
        return compose(first, (self.kk_conv.weight, None), self.groups)

    def bn_taps(self) -> dict[str, BNTap]:
        s, p, g = self.stride, self.padding, self.groups
        taps = {"origin": self.origin.tap()}
        if not self.depthwise:
            taps["one"] = self.one.tap()
            avg_conv = self.avg_conv
            taps["avg_pad"] = BNTap(self.avg_pad.bn, lambda stats=None: (avg_conv.weight, None), 1, 0, g)
        taps["avg_bn"] = BNTap(self.avg_bn, self._avg_input, s, p, g)
        taps["kk_pad"] = BNTap(self.kk_pad.bn, lambda stats=None: (self._kk_first_weight(), None), 1, 0, g)
        taps["kk_bn"] = BNTap(self.kk_bn, self._kk_input, s, p, g)
        return taps

    def branch_kernels(self, bn_stats: BNStats | None = None) -> dict[str, Kernel]:
        pieces = {"origin": self.origin.folded(bn_stats, "origin"),
                  "avg": bn_fold(*self._avg_input(bn_stats), self.avg_bn, stats_for(bn_stats, "avg_bn")),
                  "kk": bn_fold(*self._kk_input(bn_stats), self.kk_bn, stats_for(bn_stats, "kk_bn"))}
        if not self.depthwise:
            w1, b1 = self.one.folded(bn_stats, "one")
            pieces["one"] = (pad_to(w1, self.kernel_hw), b1)
        return pieces


class OREPABlock(ReparamBlock):
    """Online re-parametrization (Hu et al., CVPR 2022) with the authors' six branches, each scaled per output
    channel and merged into one kernel during training too, then one BN: kxk; 1x1; 1x1 then kxk average; 1x1 then
    a fixed frequency prior per output channel; identity-based 1x1 then kxk (twice the input width at groups > 4);
    depthwise kxk (8 per input channel) then 1x1, the depthwise-separable branch.

    The authors' names (JUGGHM/OREPA_CVPR2022, blocks.py, class OREPA) are ``AUTHORS_NAMES``' keys; their
    ``vector`` row i is ``branch_scale`` row ``AUTHORS_VECTOR_ROWS[i]``. The prior is a saved buffer, so their
    checkpoints bring their own. Initialisation differs from the authors' on purpose: the origin scale starts at 1
    and every other at 0.25 (theirs starts the prior at 0), so every branch weight learns from the first step.
    """

    BRANCHES = ("origin", "one", "avg", "one_kxk", "prior", "dws")
    AUTHORS_VECTOR_ROWS = (0, 2, 4, 3, 1, 5)  # their rows: origin, avg, prior, 1x1_kxk, 1x1, dws
    AUTHORS_NAMES = {
        "weight_orepa_origin": "weight_origin", "weight_orepa_1x1": "weight_one",
        "weight_orepa_avg_conv": "weight_avg", "weight_orepa_pfir_conv": "weight_prior_conv",
        "weight_orepa_prior": "prior", "weight_orepa_1x1_kxk_idconv1": "one_kxk_first.weight",
        "weight_orepa_1x1_kxk_conv2": "weight_one_kxk", "weight_orepa_gconv_dw": "weight_dws_dw",
        "weight_orepa_gconv_pw": "weight_dws_pw", "vector": "branch_scale",
    }  # and bn.* as is; their id_tensor and weight_orepa_avg_avg are constants repq rebuilds
    DWS_EXPANSION = 8

    def _build_branches(self) -> None:
        c_in, c_out, k, g = self.in_channels, self.out_channels, self.kernel_size, self.groups
        per_group = c_in // g
        internal = c_in if g <= 4 else 2 * c_in  # the authors' width of the 1x1-kxk branch
        expanded = self.DWS_EXPANSION * c_in
        self.weight_origin = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(c_out, per_group, k, k), a=5 ** 0.5))
        self.weight_one = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(c_out, per_group, 1, 1), a=1.0))
        self.weight_avg = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(c_out, per_group, 1, 1), a=1.0))
        self.one_kxk_first = IdentityBased1x1(c_in, g, internal)
        self.weight_one_kxk = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(c_out, internal // g, k, k),
                                                                    a=5 ** 0.5))
        self.weight_prior_conv = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(c_out, per_group, 1, 1), a=1.0))
        self.register_buffer("prior", frequency_prior(c_out, k))
        self.weight_dws_dw = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(expanded, 1, k, k), a=5 ** 0.5))
        self.weight_dws_pw = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(c_out, expanded // g, 1, 1), a=1.0))
        # Branch scales: the origin starts at 1, the others small but non-zero so every branch learns.
        start = torch.tensor([1.0] + [0.25] * (len(self.BRANCHES) - 1))
        self.branch_scale = nn.Parameter(start.repeat(c_out, 1).T.contiguous())
        self.bn = nn.BatchNorm2d(c_out)

    def load_conv_bn(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        with torch.no_grad():
            self.weight_origin.copy_(conv.weight)
            self.branch_scale.zero_()
            self.branch_scale[0] = 1.0
        copy_bn(self.bn, bn, conv.bias)

    def _dws_kernel(self) -> Tensor:
        """Depthwise kxk then 1x1 as one kernel. The 1x1 rows are read in the authors' order (row a*groups + c
        feeds output a of group c), so their weights load as they are; at groups=1 that is the plain order."""
        g, hw = self.groups, self.kernel_hw
        in_per_group, out_per_group = self.in_channels // g, self.out_channels // g
        dw = self.weight_dws_dw.reshape(g, in_per_group, self.DWS_EXPANSION, *hw)
        pw = self.weight_dws_pw.reshape(out_per_group, g, in_per_group, self.DWS_EXPANSION)
        return torch.einsum("cjthw,acjt->cajhw", dw, pw).reshape(self.out_channels, in_per_group, *hw)

    def _scaled_branches(self) -> dict[str, Tensor]:
        """Each branch's kernel times its scale, before the BN, by name (BRANCHES order)."""
        hw = self.kernel_hw
        one_kxk, _ = compose((self.one_kxk_first.effective_weight(), None), (self.weight_one_kxk, None), self.groups)
        kernels = {"origin": self.weight_origin,
                   "one": pad_to(self.weight_one, hw),
                   "avg": self.weight_avg.expand(-1, -1, *hw) / (hw[0] * hw[1]),
                   "one_kxk": one_kxk,
                   "prior": self.weight_prior_conv * self.prior.unsqueeze(1),
                   "dws": self._dws_kernel()}
        return {name: scale.reshape(-1, 1, 1, 1) * kernels[name]
                for name, scale in zip(self.BRANCHES, self.branch_scale, strict=True)}

    def _pre_bn_kernel(self, bn_stats=None) -> Kernel:
        return sum(self._scaled_branches().values()), None

    def _train_forward(self, x: Tensor) -> Tensor:
        weight, _ = self._pre_bn_kernel()
        return self.bn(F.conv2d(x, weight, None, **self.conv_kwargs()))

    def bn_taps(self) -> dict[str, BNTap]:
        return {"bn": BNTap(self.bn, self._pre_bn_kernel, self.stride, self.padding, self.groups)}

    def merged_kernel(self, bn_stats: BNStats | None = None) -> Kernel:
        return bn_fold(*self._pre_bn_kernel(), self.bn, stats_for(bn_stats, "bn"))

    def branch_kernels(self, bn_stats: BNStats | None = None) -> dict[str, Kernel]:
        """Each scaled branch through the BN (equal to merged_kernel up to float rounding); its shift is ``bn``."""
        pre = {name: (kernel, None) for name, kernel in self._scaled_branches().items()}
        return _fold_shares(pre, self.bn, stats_for(bn_stats, "bn"))


def frequency_prior(channels: int, kernel_size: int) -> Tensor:
    """OREPA's prior kernels: a DCT-like cosine per output channel, along the rows for the first half of the
    channels and along the columns for the rest (the authors' formula, which they wrote for 3x3)."""
    k, half = kernel_size, channels / 2
    pos = torch.arange(k, dtype=torch.float64) + 0.5
    prior = torch.empty(channels, k, k, dtype=torch.float64)
    for i in range(channels):
        if i < half:
            prior[i] = torch.cos(torch.pi * pos * (i + 1) / k).reshape(k, 1).expand(k, k)
        else:
            prior[i] = torch.cos(torch.pi * pos * (i + 1 - half) / k).reshape(1, k).expand(k, k)
    return prior.to(torch.get_default_dtype())


def _edge_masks(like: Tensor) -> dict[str, Tensor]:
    sobel_x = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
    laplacian = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
    return {"sbx": sobel_x.to(like), "sby": sobel_x.T.contiguous().to(like), "lpl": laplacian.to(like)}


class ECBlock(ReparamBlock):
    """ECBSR's edge-oriented convolution block (no BN): 3x3, 1x1->3x3, 1x1->Sobel-x, 1x1->Sobel-y,
    1x1->Laplacian, and an optional identity. The 1x1->3x3 intermediate map is padded with the 1x1 bias so the
    merge is exact at the borders."""

    SUPPORTED_STRIDES = (1,)

    def __init__(self, in_channels: int, out_channels: int, depth_multiplier: float = 2.0, with_identity=False,
                 deploy: bool = False):
        self.mid_channels = int(out_channels * depth_multiplier)
        self.with_identity = with_identity and in_channels == out_channels
        super().__init__(in_channels, out_channels, 3, 1, 1, deploy)

    def _build_branches(self) -> None:
        c_in, c_out, mid = self.in_channels, self.out_channels, self.mid_channels
        self.conv3x3 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.expand_1x1 = nn.Conv2d(c_in, mid, 1)
        self.expand_3x3 = nn.Conv2d(mid, c_out, 3)
        for name in ("sbx", "sby", "lpl"):
            # No bias: the edge masks sum to zero, so a bias before them would never reach the output.
            setattr(self, f"{name}_1x1", nn.Conv2d(c_in, c_out, 1, bias=False))
            setattr(self, f"{name}_scale", nn.Parameter(torch.randn(c_out, 1, 1, 1) * 1e-3))
            setattr(self, f"{name}_bias", nn.Parameter(torch.randn(c_out) * 1e-3))
        for name, mask in _edge_masks(self.expand_1x1.weight.detach()).items():
            self.register_buffer(f"{name}_mask", mask.expand(c_out, 1, 3, 3).clone(), persistent=False)

    def _edge_depthwise(self, name: str) -> Kernel:
        return getattr(self, f"{name}_scale") * getattr(self, f"{name}_mask"), getattr(self, f"{name}_bias")

    def _train_forward(self, x: Tensor) -> Tensor:
        out = self.conv3x3(x)
        out = out + self.expand_3x3(pad_with(self.expand_1x1(x), self.expand_1x1.bias, 1))
        for name in ("sbx", "sby", "lpl"):
            conv1x1 = getattr(self, f"{name}_1x1")
            inner = F.pad(conv1x1(x), [1] * 4)
            weight, bias = self._edge_depthwise(name)
            out = out + F.conv2d(inner, weight, bias, groups=self.out_channels)
        return out + x if self.with_identity else out

    def branch_kernels(self, bn_stats: BNStats | None = None) -> dict[str, Kernel]:
        pieces = {"conv3x3": (self.conv3x3.weight, self.conv3x3.bias),
                  "expand": compose((self.expand_1x1.weight, self.expand_1x1.bias),
                                    (self.expand_3x3.weight, self.expand_3x3.bias), 1)}
        for name in ("sbx", "sby", "lpl"):
            conv1x1 = getattr(self, f"{name}_1x1")
            pieces[name] = compose_depthwise((conv1x1.weight, None), self._edge_depthwise(name))
        if self.with_identity:
            pieces["identity"] = (identity_kernel(self.out_channels, 1, (3, 3), like=self.conv3x3.weight), None)
        return pieces


BLOCKS: dict[str, type[ReparamBlock]] = {
    "plain": PlainBlock,
    "repvgg": RepVGGBlock,
    "qarepvgg": QARepVGGBlock,
    "acb": ACBlock,
    "dbb": DBBlock,
    "orepa": OREPABlock,
    "ecb": ECBlock,
    "mobileone": MobileOneBlock,
}
