"""LSQ: fake quantization with a learned step size (Esser et al., ICLR 2020).

``Q(x) = round(clamp(x / s, Qn, Qp)) * s``. The rounding passes the gradient straight through, so the
gradient of ``Q`` with respect to ``s`` is LSQ's ``round(x/s) - x/s`` inside the range and ``Qn``/``Qp``
outside it, scaled by ``1 / sqrt(N * Qp)`` (N = elements that share one step).

Weights: signed symmetric, per output channel (default) or per tensor. Activations: per tensor, signed
symmetric with zero-point 0 (what TensorRT's Q/DQ takes); unsigned is allowed for simulation only.
Steps start from the first batch: MinError (the step minimising the quantization MSE, as RepQ does) or max.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repq.errors import RepqError
from repq.quant.config import INIT_METHODS, MAX_BITS, MIN_BITS

MAX_INIT_MIN_BITS = 4  # weight steps start at max from this width up (weight_quantizer)
_MIN_STEP = 1e-8  # a dead channel (all zeros) gets this step instead of 0
# MinError looks at a random subset: at most this many elements in all (at least 256 per step, all when
# fewer): the MSE curve is flat near its minimum, so a subset finds the same step at a fraction of the cost.
_MINERROR_SAMPLES = 1 << 15
_MINERROR_GRID = 20


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range (Qn, Qp): signed two's complement [-2^(b-1), 2^(b-1)-1], unsigned [0, 2^b-1]."""
    if not MIN_BITS <= int(bits) <= MAX_BITS:
        raise RepqError(f"{bits}-bit quantization is not supported: use {MIN_BITS} to {MAX_BITS} bits")
    bits = int(bits)
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def _grad_scale(x: Tensor, scale: float) -> Tensor:
    """Identity forward; gradient multiplied by ``scale``."""
    return (x - x * scale).detach() + x * scale


def _round_ste(x: Tensor) -> Tensor:
    """round() forward; gradient 1 (straight-through estimator)."""
    return (x.round() - x).detach() + x


def lsq_fake_quant(x: Tensor, step: Tensor, qn: int, qp: int, grad_scale: float) -> Tensor:
    """The LSQ function on a step that broadcasts against ``x`` (torch.round: half to even, as ONNX)."""
    s = _grad_scale(step, grad_scale)
    return _round_ste(torch.clamp(x / s, qn, qp)) * s


def _per_step_rows(x: Tensor, channel_axis: int | None) -> Tensor:
    """``x`` as [steps, elements]: one row per step."""
    if channel_axis is None:
        return x.reshape(1, -1)
    return x.movedim(channel_axis, 0).reshape(x.shape[channel_axis], -1)


def _subsample(rows: Tensor, limit: int) -> Tensor:
    limit = max(limit // rows.shape[0], 256)
    if rows.shape[1] <= limit:
        return rows
    generator = torch.Generator().manual_seed(0)
    index = torch.randperm(rows.shape[1], generator=generator)[:limit].to(rows.device)
    return rows[:, index]


def max_step(rows: Tensor, qn: int, qp: int) -> Tensor:
    """The smallest step that clips nothing: per row, max(max/Qp, min/Qn)."""
    step = rows.amax(dim=1).clamp_min(0) / qp
    if qn < 0:
        step = torch.maximum(step, rows.amin(dim=1).clamp_max(0) / qn)
    return step.clamp_min(_MIN_STEP)


def _quant_mse(rows: Tensor, step: Tensor, qn: int, qp: int) -> Tensor:
    s = step.unsqueeze(1)
    return (torch.clamp(torch.round(rows / s), qn, qp) * s - rows).pow(2).mean(dim=1)


def minerror_step(rows: Tensor, qn: int, qp: int, grid: int = _MINERROR_GRID) -> Tensor:
    """Per row, the step in (0, max_step] that minimises the quantization MSE.

    A grid over fractions of the max step, then two finer grids around the best point.
    """
    rows = rows.detach().float()
    top = max_step(rows, qn, qp)
    best_err = _quant_mse(rows, top, qn, qp)
    best = top.clone()

    def search(fractions: Tensor, around: Tensor) -> None:
        nonlocal best, best_err
        for fraction in fractions:
            step = (around * fraction).clamp_min(_MIN_STEP)
            err = _quant_mse(rows, step, qn, qp)
            better = err < best_err
            best = torch.where(better, step, best)
            best_err = torch.where(better, err, best_err)

    search(torch.arange(1, grid + 1, dtype=torch.float64) / grid, top)
    width = 1.0 / grid
    for _ in range(2):
        centre = best.clone()
        relative = width * top / centre  # the last grid's spacing, relative to the centre
        for fraction in torch.linspace(-1, 1, 11, dtype=torch.float64):
            search_one = (centre * (1 + fraction * relative)).clamp(_MIN_STEP)
            err = _quant_mse(rows, search_one, qn, qp)
            better = err < best_err
            best, best_err = torch.where(better, search_one, best), torch.where(better, err, best_err)
        width /= 5
    return torch.minimum(best, top)


class LSQQuantizer(nn.Module):
    """A fake quantizer with a learned step: per tensor (``channels=None``) or one step per channel.

    The step is initialised from the first tensor it sees (``init``: "minerror" or "max") unless it was set
    already (``initialized`` is a buffer, so a loaded checkpoint keeps its steps).
    """

    is_activation = False

    def __init__(self, bits: int = 8, signed: bool = True, channels: int | None = None, channel_axis: int = 0,
                 init: str = "minerror"):
        super().__init__()
        if init not in INIT_METHODS:
            raise RepqError(f"unknown LSQ step init {init!r}: use one of {', '.join(INIT_METHODS)}")
        self.qn, self.qp = qrange(bits, signed)
        self.bits, self.signed, self.init = int(bits), bool(signed), init
        self.channels, self.channel_axis = channels, channel_axis
        self.step = nn.Parameter(torch.ones(channels or 1))
        self.register_buffer("initialized", torch.tensor(False))
        self.enabled = True

    @property
    def per_channel(self) -> bool:
        return self.channels is not None

    def _axis(self, x: Tensor) -> int | None:
        return self.channel_axis % x.dim() if self.per_channel else None

    def _check(self, x: Tensor) -> None:
        if self.per_channel and x.shape[self.channel_axis] != self.channels:
            raise RepqError(f"LSQ quantizer has {self.channels} channel steps but the tensor has "
                            f"{x.shape[self.channel_axis]} channels on axis {self.channel_axis}: "
                            f"rebuild the quantizer for this layer")

    @torch.no_grad()
    def init_step(self, x: Tensor) -> None:
        """Set the step from ``x``: MinError or max, per step."""
        self._check(x)
        rows = _per_step_rows(x.detach().float(), self._axis(x))
        if self.init == "minerror":
            step = minerror_step(_subsample(rows, _MINERROR_SAMPLES), self.qn, self.qp)
        else:
            step = max_step(rows, self.qn, self.qp)
        self.step.copy_(step.to(self.step))
        self.initialized.fill_(True)

    def effective_step(self) -> Tensor:
        """The step in use: the learned value's magnitude. An SGD step can push a small step through zero
        (CIFAR RepVGG-A0, lr 0.01); clamping it would zero that channel and stop its gradient for good."""
        return self.step.abs().clamp_min(_MIN_STEP)

    def broadcast_step(self, x: Tensor) -> Tensor:
        step = self.effective_step()
        if not self.per_channel:
            return step.reshape(())
        shape = [1] * x.dim()
        shape[self._axis(x)] = -1
        return step.reshape(shape)

    def grad_scale(self, x: Tensor) -> float:
        """LSQ's 1/sqrt(N * Qp). N: elements per channel step for per-channel quantizers; for a per-tensor
        activation, the features of one sample (LSQ's N_F: numel / batch); for a per-tensor weight, numel."""
        if self.per_channel:
            n = x.numel() // self.channels
        elif self.is_activation and x.dim() > 1:
            n = x.numel() // x.shape[0]
        else:
            n = x.numel()
        return 1.0 / math.sqrt(max(n, 1) * self.qp)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        self._check(x)
        if not bool(self.initialized):
            self.init_step(x)
        return lsq_fake_quant(x, self.broadcast_step(x), self.qn, self.qp, self.grad_scale(x))

    def integers(self, x: Tensor) -> Tensor:
        """The integer codes of ``x`` (what a Q/DQ pair stores)."""
        return torch.clamp(torch.round(x / self.broadcast_step(x)), self.qn, self.qp)

    def extra_repr(self) -> str:
        gran = f"per-channel(axis={self.channel_axis}, {self.channels})" if self.per_channel else "per-tensor"
        step = self.step.detach()
        state = "uncalibrated"
        if bool(self.initialized):
            state = f"step={step.min().item():.4g}..{step.max().item():.4g}"
        return (f"{self.bits}-bit {'signed' if self.signed else 'unsigned'} {gran} [{self.qn}, {self.qp}] "
                f"init={self.init} {state}")


class LSQActQuantizer(LSQQuantizer):
    """Per-tensor activation quantizer: signed symmetric by default (TensorRT); ``signed=False`` simulates."""

    is_activation = True

    def __init__(self, bits: int = 8, signed: bool = True, init: str = "minerror"):
        super().__init__(bits, signed, channels=None, init=init)


def weight_quantizer(bits: int, out_channels: int, per_channel: bool = True, init: str | None = None
                     ) -> LSQQuantizer:
    """Signed symmetric weight quantizer, one step per output channel (axis 0) or one per tensor.

    Default init: the max step at 4 bits and more, MinError below: a merged re-param kernel's few large centre
    taps (identity and 1x1 branches) are exactly what the weight-MSE optimum clips, while at 2-3 bits max leaves
    the small taps too few levels (README, "Measurements behind the defaults").
    """
    init = init or ("max" if bits >= MAX_INIT_MIN_BITS else "minerror")
    return LSQQuantizer(bits, signed=True, channels=out_channels if per_channel else None, init=init)


class LSQConv2d(nn.Conv2d):
    """``conv(Q(x), Q(W)) + b``: a plain conv under LSQ (Plain and Merged baselines, RepQ's deploy form).

    In RepQ's deploy form the stored weight is already ``Q(M(W))``; quantizing it again with the same step is
    the identity, so the exported Q/DQ pair carries exactly the trained integers.
    """

    def attach_quantizers(self, w_bits: int, a_bits: int, per_channel: bool = True, act_signed: bool = True,
                          init: str = "minerror", weight_init: str | None = None) -> LSQConv2d:
        self.input_quantizer = LSQActQuantizer(a_bits, act_signed, init)
        self.weight_quantizer = weight_quantizer(w_bits, self.out_channels, per_channel, weight_init)
        return self

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, w_bits: int = 8, a_bits: int = 8, per_channel: bool = True,
                  act_signed: bool = True, init: str = "minerror", weight_init: str | None = None) -> LSQConv2d:
        if conv.padding_mode != "zeros":
            raise RepqError(f"LSQConv2d supports zero padding only, got padding_mode={conv.padding_mode!r}: "
                            f"use a zero-padded conv")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, bias=conv.bias is not None)
        new = new.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(conv.weight)
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
        return new.attach_quantizers(w_bits, a_bits, per_channel, act_signed, init, weight_init)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class LSQLinear(nn.Linear):
    """``Q(x) @ Q(W)^T + b``: the classifier head under the same quantizers."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, w_bits: int = 8, a_bits: int = 8, per_channel: bool = True,
                    act_signed: bool = True, init: str = "minerror", weight_init: str | None = None) -> LSQLinear:
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        new = new.to(device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(linear.weight)
            if linear.bias is not None:
                new.bias.copy_(linear.bias)
        new.input_quantizer = LSQActQuantizer(a_bits, act_signed, init)
        new.weight_quantizer = weight_quantizer(w_bits, linear.out_features, per_channel, weight_init)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


def quantize_plain_layers(model: nn.Module, w_bits: int = 8, a_bits: int = 8, per_channel: bool = True,
                          act_signed: bool = True, init: str = "minerror", skip: tuple[type, ...] = (),
                          weight_init: str | None = None) -> nn.Module:
    """Replace every nn.Conv2d / nn.Linear (not already quantized, not inside a ``skip`` type) by its LSQ
    form, in place. This is the Plain/Merged baseline of RepQ's Table 1."""

    def visit(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, (LSQConv2d, LSQLinear)) or (skip and isinstance(child, skip)):
                continue
            args = (w_bits, a_bits, per_channel, act_signed, init, weight_init)
            if type(child) is nn.Conv2d:
                setattr(module, name, LSQConv2d.from_conv(child, *args))
            elif type(child) is nn.Linear:
                setattr(module, name, LSQLinear.from_linear(child, *args))
            else:
                visit(child)

    visit(model)
    return model


# -- export --------------------------------------------------------------------------------------------------
LSQ_LAYERS = (LSQConv2d, LSQLinear)


def export_ranges(model: nn.Module) -> dict[str, tuple[float, Tensor]]:
    """For each LSQ layer: (input amax, per-output-channel weight amax) with amax = step * 127, the symmetric
    int8 ranges a QDQ export takes (scale = amax / 127 = step). Weights of any bit width export exactly (their
    codes fit in int8); activations must be 8-bit signed, as TensorRT runs them."""
    ranges = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, LSQ_LAYERS):
            continue
        aq, wq = layer.input_quantizer, layer.weight_quantizer
        if not (bool(aq.initialized) and bool(wq.initialized)):
            raise RepqError(f"LSQ layer {name} has unset steps: fine-tune (or run one batch) before exporting")
        if aq.bits != 8 or not aq.signed:
            raise RepqError(f"LSQ layer {name} quantizes its input to {aq.bits}-bit "
                            f"{'signed' if aq.signed else 'unsigned'}: int8 Q/DQ export needs 8-bit signed "
                            f"activations (lower bit widths are for simulation): fine-tune with a_bits=8")
        qp = 2 ** (8 - 1) - 1
        in_amax = float(aq.effective_step().detach().reshape(-1)[0]) * qp
        steps = wq.effective_step().detach().float().cpu().reshape(-1)
        ranges[name] = (in_amax, steps.expand(layer.weight.shape[0]) * qp)
    return ranges


def without_quantizers(model: nn.Module) -> nn.Module:
    """A deep copy with every LSQ quantizer switched off: the float graph an exporter inserts Q/DQ into."""
    plain = copy.deepcopy(model)
    for module in plain.modules():
        if isinstance(module, LSQQuantizer):
            module.enabled = False
    return plain
