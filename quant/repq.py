"""RepQ: quantization-aware training through the merged kernel of any re-param block (Prutianova et al.,
BMVC 2023, sections 4.1-4.3).

One wrapper, three modes, no per-block code. A block gives ``merged_kernel(bn_stats)`` and describes each of
its BNs as a conv of the block input (``bn_taps()``); the wrapper computes

    y = conv(Q(x), Q(M(W, stats))) + b(W, stats)

- ``repq``:  stats = the running statistics (blocks without BN: ECB; for blocks with BN this is RepQ with
  frozen BN statistics).
- ``bn``:    RepQ-BN (Algorithm 1). In training, each BN's batch statistics come from running its tap conv
  on the batch (one conv per tap geometry, tap kernels concatenated), the running statistics are updated
  with the BN momentum, and the merge uses the batch mean (bias) and the updated running variance (weight).
- ``bnest``: RepQ-BNEst. The same, with the batch statistics estimated from the per-channel input mean and
  variance and the tap kernel: E[X*W] ~ E[X] sum_hw W, V[X*W] ~ V[X] sum_hw W^2 (equations 5-6).
  The paper trains its FP models with BNEst too, so their running statistics already are estimates. A model
  trained with real BN is not: equation 6 ignores the (large) covariance of real activations and equation 5
  the padding, and within a few dozen steps the running statistics drift to the estimates and the network
  computes another function (README, "Measurements behind the defaults"). So, as
  LSQ sets its steps on the first batch, BNEst measures the exact statistics once, on its first training
  batch (one tap conv, as RepQ-BN does every step), and from then on corrects each estimate per channel:
  mean + (exact - estimated mean), var * (exact / estimated var). ``bnest_calibrate=False`` is the paper's
  estimator as is. Fine-tuning names the two `bnest_corrected` and `bnest_paper` (repq.quant.config).
In eval all modes use the running statistics, so ``fuse()`` gives a conv whose weight is exactly Q(M(W)).
``freeze_bn_statistics`` makes training use them too, for the last steps of a fine-tune: the kernel trained is
then the deploy kernel itself, not one merged with the batch mean.

The batch mean carries a gradient, as in BatchNorm (``stats_grad=True``, the default): without it the weights
drift against a mean that each step re-centres, and training diverges within a few steps. RepQ-BN takes the
mean's value from the conv and its gradient from the mean's closed form (the kernel dotted with the mean input
patch), so the extra convs need no backward. The variance enters the merge only through the momentum-weighted
running variance (Algorithm 1, line 4) and is used without gradient.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repq.errors import RepqError
from repq.quant.lsq import LSQActQuantizer, LSQConv2d, LSQLinear, quantize_plain_layers, weight_quantizer

MODES = ("repq", "bn", "bnest")
Stats = dict[str, tuple[Tensor, Tensor]]


def is_reparam_block(module: nn.Module) -> bool:
    return callable(getattr(module, "merged_kernel", None)) and callable(getattr(module, "conv_kwargs", None))


class _RecordingStats(dict):
    """The ``bn_stats`` a tap kernel gets while scheduling: records which BN names it reads, so taps whose
    kernel needs another tap's statistics (QARepVGG's post-BN, DBB's second BNs) wait for them."""

    def __init__(self, known: Stats):
        super().__init__(known)
        self.asked: set[str] = set()

    def __bool__(self) -> bool:
        return True

    def get(self, key, default=None):
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        self.asked.add(key)
        return super().__contains__(key)


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _out_size(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


def _ready_taps(taps: dict, done: Stats) -> list[tuple[str, object, Tensor, Tensor | None]]:
    """Taps whose kernels depend only on statistics already in ``done``, with their kernels."""
    pending = set(taps) - set(done)
    ready = []
    for name, tap in taps.items():
        if name in done:
            continue
        view = _RecordingStats(done)
        weight, bias = tap.kernel(view)
        if not (view.asked & pending):
            ready.append((name, tap, weight, bias))
    if not ready:
        raise RepqError(f"BN taps {sorted(pending)} depend on each other in a cycle: fix bn_taps()")
    return ready


def channel_moments(y: Tensor) -> tuple[Tensor, Tensor]:
    """(biased var, mean) per channel of an NCHW tensor, as ``torch.var_mean(y, dim=(0, 2, 3))``, without
    gradient.

    ATen's BatchNorm statistics kernel: two passes (the mean, then the centred squares), so a channel whose
    mean dwarfs its spread keeps its variance, and faster on CPUs than var_mean's strided reduction."""
    mean, var = torch.batch_norm_update_stats(y.detach(), None, None, 0.0)
    return var, mean


def conv_batch_stats(x: Tensor, group: list[tuple[str, object, Tensor, Tensor | None]]
                     ) -> dict[str, tuple[Tensor, Tensor, int]]:
    """Exact batch (mean, biased var, count) of each tap's conv output, with ONE conv for taps that share a
    geometry: kernels are concatenated along the output dimension (group by group when groups > 1)."""
    by_geometry: dict[tuple, list] = {}
    for item in group:
        _, tap, weight, _ = item
        key = (tuple(weight.shape[2:]), _pair(tap.stride), _pair(tap.padding), tap.groups)
        by_geometry.setdefault(key, []).append(item)
    out = {}
    for (_, stride, padding, groups), items in by_geometry.items():
        sizes = [w.shape[0] // groups for _, _, w, _ in items]
        kernels = [w.reshape(groups, w.shape[0] // groups, *w.shape[1:]) for _, _, w, _ in items]
        weight = torch.cat(kernels, dim=1).reshape(-1, *items[0][2].shape[1:])
        y = F.conv2d(x, weight, None, stride, padding, 1, groups)
        var, mean = channel_moments(y)
        count = y.numel() // y.shape[1]
        means = mean.reshape(groups, -1).split(sizes, dim=1)
        vars_ = var.reshape(groups, -1).split(sizes, dim=1)
        for (name, _, _, bias), m, v in zip(items, means, vars_, strict=True):
            m = m.reshape(-1)
            out[name] = (m + bias if bias is not None else m, v.reshape(-1), count)
    return out


def estimated_stats(x_mean: Tensor, x_var: Tensor, weight: Tensor, bias: Tensor | None, groups: int
                    ) -> tuple[Tensor, Tensor]:
    """RepQ-BNEst, equations (5) and (6), per output channel over its group's input channels."""
    out_ch, in_per_group = weight.shape[0], weight.shape[1]
    w_sum = weight.sum(dim=(2, 3)).reshape(groups, out_ch // groups, in_per_group)
    w_sq = weight.pow(2).sum(dim=(2, 3)).reshape(groups, out_ch // groups, in_per_group)
    mean = torch.einsum("goi,gi->go", w_sum, x_mean.reshape(groups, in_per_group)).reshape(out_ch)
    var = torch.einsum("goi,gi->go", w_sq, x_var.reshape(groups, in_per_group)).reshape(out_ch)
    return (mean + bias if bias is not None else mean), var


def patch_mean(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, groups: int,
               batch_sum: Tensor | None = None) -> Tensor:
    """The exact batch mean of ``conv(x, weight) + bias`` per output channel, without the conv: the kernel
    dotted with the mean input patch (one strided window sum per kernel tap). Cheap and differentiable; it
    gives RepQ-BN's batch mean its gradient. ``batch_sum``: ``x.sum(dim=0)``, when several taps of one block
    share it (each sum costs a full pass over x forward and another backward)."""
    out_ch, in_per_group, kh, kw = weight.shape
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    ho, wo = _out_size(x.shape[2], kh, sh, ph), _out_size(x.shape[3], kw, sw, pw)
    summed = F.pad(x.sum(dim=0) if batch_sum is None else batch_sum, (pw, pw, ph, ph))  # [C, Hp, Wp]
    windows = [summed[:, a:a + sh * (ho - 1) + 1:sh, b:b + sw * (wo - 1) + 1:sw].sum(dim=(1, 2))
               for a in range(kh) for b in range(kw)]
    patch = torch.stack(windows, dim=1).reshape(groups, in_per_group, kh, kw) / (x.shape[0] * ho * wo)
    # A batched matrix-vector product on views of the kernel: einsum permuted (copied) the whole kernel.
    mean = torch.bmm(weight.reshape(groups, out_ch // groups, -1), patch.reshape(groups, -1, 1)).reshape(out_ch)
    return mean + bias if bias is not None else mean


class RepQBlock(nn.Module):
    """``conv(Q(x), Q(M(W))) + b`` around any block with ``merged_kernel()``; see the module docstring."""

    def __init__(self, block: nn.Module, mode: str = "bnest", w_bits: int = 8, a_bits: int = 8,
                 per_channel: bool = True, act_signed: bool = True, init: str = "minerror",
                 stats_grad: bool = True, bnest_calibrate: bool = True, weight_init: str | None = None):
        super().__init__()
        if mode not in MODES:
            raise RepqError(f"unknown RepQ mode {mode!r}: use one of {', '.join(MODES)}")
        if not is_reparam_block(block):
            raise RepqError(f"{type(block).__name__} has no merged_kernel()/conv_kwargs(): "
                            f"wrap re-param blocks only")
        if getattr(block, "deployed", False):
            raise RepqError(f"{type(block).__name__} is already fused: RepQ trains the branches, so wrap the "
                            f"training-form model (from its training checkpoint)")
        self.block = block
        self.mode, self.stats_grad = mode, stats_grad
        self.frozen_stats = False  # freeze_bn_statistics: train through the running statistics, as in eval
        with torch.no_grad():
            out_channels = block.merged_kernel()[0].shape[0]
        self.input_quantizer = LSQActQuantizer(a_bits, act_signed, init)
        self.weight_quantizer = weight_quantizer(w_bits, out_channels, per_channel, weight_init)
        self.last_batch_stats: dict[str, tuple[Tensor, Tensor]] = {}  # (mean, biased var), for inspection
        self.bnest_calibrate = mode == "bnest" and bnest_calibrate
        if self.bnest_calibrate:
            for name, tap in block.bn_taps().items():
                self.register_buffer(_offset_key(name), torch.zeros(tap.bn.num_features))
                self.register_buffer(_ratio_key(name), torch.ones(tap.bn.num_features))
            self.register_buffer("bnest_calibrated", torch.tensor(False))

    # -- forward / deploy -------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.block.merged_kernel(bn_stats=self._stats(x))
        return F.conv2d(self.input_quantizer(x), self.weight_quantizer(weight), bias,
                        **self.block.conv_kwargs())

    def _stats(self, x: Tensor) -> Stats | None:
        if not self.training or self.mode == "repq" or self.frozen_stats:
            return None
        taps = self.block.bn_taps()
        if not taps:
            return None
        if not self.stats_grad:
            with torch.no_grad():
                return self._merge_stats(x.detach(), taps)
        return self._merge_stats(x, taps)

    def _merge_stats(self, x: Tensor, taps: dict) -> Stats:
        """Algorithm 1 lines 1-4 for every BN (inner BNs first: outer tap kernels fold them with these
        statistics); returns {name: (batch mean, updated running var)} for lines 5-6."""
        merge: Stats = {}
        self.last_batch_stats = {}
        x_moments = batch_sum = None
        while len(merge) < len(taps):
            ready = _ready_taps(taps, merge)
            if self.mode == "bn":
                with torch.no_grad():  # the values: exact, one conv per geometry
                    exact = conv_batch_stats(x.detach(), [(n, t, w.detach(), b) for n, t, w, b in ready])
                new = {}
                for name, tap, w, b in ready:
                    mean, var, count = exact[name]
                    if torch.is_grad_enabled():  # the gradient of the exact mean, from its closed form
                        batch_sum = x.sum(dim=0) if batch_sum is None else batch_sum
                        formula = patch_mean(x, w, b, tap.stride, tap.padding, tap.groups, batch_sum)
                        mean = formula + (mean - formula).detach()
                    new[name] = (mean, var, count)
            else:
                if x_moments is None:
                    with torch.no_grad():
                        x_var = channel_moments(x)[0]
                    x_moments = (x.mean(dim=(0, 2, 3)), x_var)
                new = {}
                for name, tap, w, b in ready:
                    mean, var = estimated_stats(*x_moments, w, b, tap.groups)
                    if self.bnest_calibrate:
                        mean, var = self._corrected(name, x, tap, w, b, mean, var)
                    new[name] = (mean, var.detach(), _tap_count(x, tap, w))
            for name, (mean, var, count) in new.items():
                merge[name] = (mean, self._update_running(taps[name].bn, mean, var, count))
                self.last_batch_stats[name] = (mean.detach(), var.detach())
        if self.bnest_calibrate:
            self.bnest_calibrated.fill_(True)
        return merge

    def _corrected(self, name: str, x: Tensor, tap, weight: Tensor, bias: Tensor | None, mean: Tensor,
                   var: Tensor) -> tuple[Tensor, Tensor]:
        """BNEst's estimates with the per-channel correction measured on the first batch (module docstring)."""
        offset, ratio = getattr(self, _offset_key(name)), getattr(self, _ratio_key(name))
        if not bool(self.bnest_calibrated):
            with torch.no_grad():
                b = bias.detach() if bias is not None else None
                exact_mean, exact_var, _ = conv_batch_stats(x.detach(), [(name, tap, weight.detach(), b)])[name]
                eps = tap.bn.eps
                offset.copy_(exact_mean - mean.detach())
                ratio.copy_((exact_var + eps) / (var.detach() + eps))
        return mean + offset, var * ratio

    @staticmethod
    def _update_running(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int) -> Tensor:
        """Algorithm 1 lines 3-4 (running mean, running var with the unbiased batch var); returns the new
        running variance (carrying the gradient of ``var`` when the statistics have one)."""
        if bn.running_mean is None:
            raise RepqError("RepQ-BN needs BatchNorm running statistics: build the block's BNs with "
                            "track_running_stats=True")
        bn.num_batches_tracked.add_(1)
        momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        unbiased = var * (count / max(count - 1, 1))
        new_var = (1 - momentum) * bn.running_var + momentum * unbiased
        with torch.no_grad():
            bn.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
            bn.running_var.copy_(new_var.detach())
        return new_var

    @torch.no_grad()
    def deploy_conv(self) -> LSQConv2d:
        """The deploy conv: weight exactly Q(M(W)) with running statistics, bias b, the learned quantizers."""
        if not bool(self.input_quantizer.initialized):
            raise RepqError("RepQ block was never run, so its steps are unset: fine-tune (or run one batch "
                            "through the model) before fusing")
        weight, bias = self.block.merged_kernel()
        quantized = self.weight_quantizer(weight)
        kw = self.block.conv_kwargs()
        conv = LSQConv2d(weight.shape[1] * kw["groups"], weight.shape[0], tuple(weight.shape[2:]),
                         kw["stride"], kw["padding"], groups=kw["groups"], bias=True).to(weight)
        conv.weight.copy_(quantized)
        conv.bias.copy_(bias)
        conv.input_quantizer = copy.deepcopy(self.input_quantizer)
        conv.weight_quantizer = copy.deepcopy(self.weight_quantizer)
        return conv.train(self.training)

    def fuse(self) -> LSQConv2d:
        """The module that replaces this wrapper in the deploy model (``reparam.fuse_model`` swaps it in)."""
        return self.deploy_conv()

    def extra_repr(self) -> str:
        calibrated = ", bnest_calibrate=True" if self.bnest_calibrate else ""
        return f"mode={self.mode}, stats_grad={self.stats_grad}{calibrated}"


def _offset_key(tap: str) -> str:
    return f"bnest_mean_offset_{tap.replace('.', '_')}"


def _ratio_key(tap: str) -> str:
    return f"bnest_var_ratio_{tap.replace('.', '_')}"


def _tap_count(x: Tensor, tap, weight: Tensor) -> int:
    kh, kw = weight.shape[2:]
    (sh, sw), (ph, pw) = _pair(tap.stride), _pair(tap.padding)
    return x.shape[0] * _out_size(x.shape[2], kh, sh, ph) * _out_size(x.shape[3], kw, sw, pw)


def _first_last(model: nn.Module) -> set[str]:
    names = list(quantized_layers(model))
    return {names[0], names[-1]} if names else set()


def wrap_model(model: nn.Module, mode: str = "bnest", w_bits: int = 8, a_bits: int = 8, *,
               per_channel: bool = True, act_signed: bool = True, init: str = "minerror",
               stats_grad: bool = True, quantize_plain: bool = True, first_last_bits: int | None = 8,
               bnest_calibrate: bool = True, weight_init: str | None = None) -> nn.Module:
    """Wrap every re-param block of ``model`` in a RepQ layer, in place, and return the model.

    ``quantize_plain``: the remaining nn.Conv2d / nn.Linear get LSQ too (the classifier head), so the deploy
    model is quantized end to end. ``first_last_bits``: the first and last quantized layers keep at least
    this many bits (LSQ's convention below 8 bits; None quantizes them like the rest). ``bnest_calibrate``:
    see the module docstring (False: the paper's BNEst estimator without the first-batch correction).
    ``weight_init``: how the weight steps start ("minerror" or "max"; None: by bit width, see
    quant.lsq.weight_quantizer); layers raised to ``first_last_bits`` keep that width's default.
    """
    if mode not in MODES:
        raise RepqError(f"unknown RepQ mode {mode!r}: use one of {', '.join(MODES)}")
    settings = dict(per_channel=per_channel, act_signed=act_signed, init=init)
    found = _wrap_children(model, dict(mode=mode, stats_grad=stats_grad, w_bits=w_bits, a_bits=a_bits,
                                       bnest_calibrate=bnest_calibrate, weight_init=weight_init, **settings))
    if not found:
        raise RepqError(f"{type(model).__name__} has no re-param blocks to wrap: use a re-param model (repq "
                        f"models lists them) or quant.lsq.quantize_plain_layers for plain convs")
    if quantize_plain:
        quantize_plain_layers(model, w_bits, a_bits, skip=(RepQBlock,), weight_init=weight_init, **settings)
    if first_last_bits is not None and min(w_bits, a_bits) < first_last_bits:
        _raise_bits(model, _first_last(model), first_last_bits, **settings)
    sign_first_input(model)
    model.repq_quant = {"method": "repq", "mode": mode, "w_bits": w_bits, "a_bits": a_bits,
                        "first_last_bits": first_last_bits, "stats_grad": stats_grad,
                        "quantize_plain": quantize_plain, "bnest_calibrate": bnest_calibrate,
                        "weight_init": weight_init, **settings}
    return model


def _wrap_children(module: nn.Module, kwargs: dict) -> int:
    found = 0
    for name, child in module.named_children():
        if isinstance(child, RepQBlock):
            found += 1
        elif is_reparam_block(child):
            setattr(module, name, RepQBlock(child, **kwargs))
            found += 1
        else:
            found += _wrap_children(child, kwargs)
    return found


def _raise_bits(model: nn.Module, names: Iterable[str], bits: int, per_channel: bool, act_signed: bool,
                init: str) -> None:
    modules = dict(model.named_modules())
    for name in names:
        layer = modules[name]
        wq, aq = layer.weight_quantizer, layer.input_quantizer
        layer.input_quantizer = LSQActQuantizer(max(bits, aq.bits), act_signed, init)
        layer.weight_quantizer = weight_quantizer(max(bits, wq.bits), wq.channels or 1, per_channel)


def raise_first_last_bits(model: nn.Module, bits: int = 8, per_channel: bool = True, act_signed: bool = True,
                          init: str = "minerror") -> nn.Module:
    """The first and last quantized layers get at least ``bits`` bits (LSQ's convention below 8 bits)."""
    _raise_bits(model, _first_last(model), bits, per_channel, act_signed, init)
    return model


def sign_first_input(model: nn.Module) -> nn.Module:
    """The first quantized layer reads the normalised image, which is signed: its input quantizer is signed
    even when the others are unsigned (a simulation setting for post-ReLU inputs)."""
    layers = list(quantized_layers(model).values())
    if layers and not layers[0].input_quantizer.signed:
        old = layers[0].input_quantizer
        layers[0].input_quantizer = LSQActQuantizer(old.bits, True, old.init)
    return model


def freeze_bn_statistics(model: nn.Module) -> int:
    """From now on, train through the running BN statistics: RepQ blocks merge with them in training as in
    eval (no batch statistics, no running update), so the kernel each step quantizes is the deploy kernel
    itself; plain BNs (outside RepQ blocks) switch to eval mode, which a later ``model.train()`` undoes. The BNs
    inside RepQ blocks switch too, harmlessly: the blocks read their parameters, never call them.
    Returns the number of RepQ blocks frozen."""
    blocks = [m for m in model.modules() if isinstance(m, RepQBlock)]
    for block in blocks:
        block.frozen_stats = True
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    return len(blocks)


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """RepQ wrappers and LSQ convs/linears by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (RepQBlock, LSQConv2d, LSQLinear))}
