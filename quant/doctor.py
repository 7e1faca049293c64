"""`repq.diagnose`: why a re-param model loses accuracy in INT8, layer by layer and engine by engine.

It lives in quant/ because it quantizes with the toolkit adapter and runs the exported file in an engine, and
quant is the layer above engines (quant.artifacts already runs them): engines stays free of quantization.

Per quantized layer of the deploy form, on the calibration images:
- the fused kernel per output channel (max |w|, max/std, kurtosis) and the branch whose share makes its
  largest weight, read from the block's own ``branch_kernels()`` (they sum to ``merged_kernel()``);
- dead input channels (share of zeros, after the previous ReLU) and the variance of the identity BN that reads
  them (RepVGG's collapse: gamma/sqrt(var + eps) of a near-dead channel, QARepVGG paper section 3);
- the input range, the calibrated amax and what it clips;
- the layer's SQNR alone with quantized weights, quantized inputs, and both (inputs taken from the FP32 model);
- the error at the layer's output of the fake-quant model against FP32, and of each engine target's exported
  QDQ file against the fake-quant model (``ENGINE_RUNS``: TensorRT's file in ONNX Runtime, since TensorRT itself
  needs a GPU; ORT's file in ORT; TensorRT's file in OpenVINO, which reads it unchanged).
"""

from __future__ import annotations

import functools
import math
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repq.errors import RepqError
from repq.reparam.block import ReparamBlock
from repq.reparam.kernels import identity_kernel

UNSPLIT = "fused"  # the share name of a layer with no branches (a plain conv, or a block already fused)
QUIET_CHANNEL = 0.01  # output channels with less than this share of the mean channel power get no channel SQNR
DEAD_ZERO_SHARE = 0.99  # an input channel this often zero after its ReLU is dead
COLLAPSE_DB, DEGRADED_DB = 10.0, 25.0  # SQNR below which a layer (or a model's outputs) breaks, or degrades
COLLAPSED_SHARE, CHANGED_SHARE = 0.25, 0.02  # shares of top-1 predictions INT8 changes: collapse, accuracy lost
# An engine follows the fake-quant model when its relative error stays below ENGINE_TOLERANCE at every layer.
# Below FLOAT_ROUNDING it computes the same numbers in another order. Between the two lie real but small
# departures, such as an integer conv whose bias is rounded to int32 at scale s_x * s_w (the fake-quant model
# keeps it in float), after which an activation one code away grows layer by layer. When the error ends above
# the tolerance, the engine parts ways where it first left float rounding.
FLOAT_ROUNDING = 1e-5
ENGINE_TOLERANCE = 1e-2
# Engine target -> (the placement of the file it reads, the runtime that runs it here, the table's header).
ENGINE_RUNS = {"tensorrt": ("tensorrt", "onnxruntime", "trt@ort"),
               "onnxruntime": ("onnxruntime", "onnxruntime", "ort@ort"),
               "openvino": ("tensorrt", "openvino", "trt@ov")}
ENGINE_IMAGES = 4  # calibration images the engine table runs (each layer is read from its own prefix)


@dataclass
class Outlier:
    """The largest |weight| of a layer's fused kernel and each branch's share of it."""

    out_channel: int
    in_channel: int
    position: tuple[int, ...]
    value: float  # the fused (deploy) kernel's weight
    predicted: float  # the sum of the branch shares at that position
    branch: str  # the branch with the largest |share|
    shares: dict[str, float]


@dataclass
class LayerDiagnosis:
    layer: str  # the Conv2d/Linear of the deploy form (the name skip_layers takes)
    block: str | None  # the re-param block it was fused from
    kind: str
    channel_max: list[float]  # max |w| per output channel of the fused kernel
    max_abs: float
    median_channel_max: float
    max_over_std: float  # the largest over output channels
    kurtosis: float  # the largest over output channels (Pearson: 3 for a Gaussian)
    outlier: Outlier
    dead_inputs: list[dict] = field(default_factory=list)  # {"channel", "zero_share", "identity_var"}
    input_max: float = 0.0
    input_amax: float | None = None
    clipped_range: float = 0.0  # share of the input range above the calibrated amax
    clipped_values: float = 0.0  # share of input values above it
    sqnr_weights: float = math.inf
    sqnr_inputs: float = math.inf
    sqnr_both: float = math.inf
    worst_channel: int = 0  # the output channel whose weights-only SQNR is lowest
    sqnr_worst_channel: float = math.inf
    worst_channel_outlier: Outlier | None = None  # that channel's largest weight and its branch shares
    fakequant_sqnr: float = math.inf  # the fake-quant model's output here against FP32 (error carried in)
    # engine target -> relative error of its QDQ file (ENGINE_RUNS) against the fake-quant model
    engine_error: dict[str, float] = field(default_factory=dict)

    @property
    def severity(self) -> float:
        """The SQNR that decides the verdict: the layer's, or its worst channel's when weight quantization
        wipes out one channel (per-channel scales hide a fused outlier from the layer's total)."""
        return min(self.sqnr_both, self.sqnr_worst_channel)

    @property
    def outlier_ratio(self) -> float:
        return self.max_abs / self.median_channel_max if self.median_channel_max > 0 else math.inf


@dataclass
class Diagnosis:
    layers: list[LayerDiagnosis]
    method: str
    images: int
    verdict: str
    prescription: str
    output_sqnr: float  # the fake-quant model's outputs against FP32's, on every calibration image
    changed_predictions: float | None  # share of those images whose top-1 class INT8 changes (classifiers)
    engine_divergence: dict[str, str | None] = field(default_factory=dict)  # engine -> first diverging layer
    engine_skipped: dict[str, str] = field(default_factory=dict)  # engine -> why it was not run here
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per phase

    def worst(self) -> LayerDiagnosis:
        return min(self.layers, key=lambda d: d.severity)

    def layer(self, name: str) -> LayerDiagnosis:
        for d in self.layers:
            if name in (d.layer, d.block):
                return d
        raise RepqError(f"the diagnosis has no layer {name!r}: use a name from diagnosis.layers")

    def as_dict(self) -> dict:
        out = asdict(self)
        for d, layer in zip(out["layers"], self.layers, strict=True):
            d["outlier_ratio"] = layer.outlier_ratio
        return _finite(out)

    def table(self) -> str:
        """One line per layer: the fused kernel, its outlier's branch, inputs, SQNRs and the engine's error."""
        engines = sorted({e for d in self.layers for e in d.engine_error})
        head = (f"{'layer':<28} {'max|w|':>8} {'x med':>6} {'branch':<14} {'dead':>4} {'clip%':>6} "
                f"{'W dB':>6} {'Wch dB':>6} {'A dB':>6} {'WA dB':>6} {'FQ dB':>6}"
                + "".join(f" {ENGINE_RUNS[e][2]:>10}" for e in engines))
        lines = [head]
        for d in self.layers:
            lines.append(f"{(d.block or d.layer)[:28]:<28} {d.max_abs:8.3g} {d.outlier_ratio:6.1f} "
                         f"{d.outlier.branch[:14]:<14} {len(d.dead_inputs):4d} {100 * d.clipped_values:6.3f} "
                         f"{d.sqnr_weights:6.1f} {d.sqnr_worst_channel:6.1f} {d.sqnr_inputs:6.1f} "
                         f"{d.sqnr_both:6.1f} {d.fakequant_sqnr:6.1f}"
                         + "".join(f" {d.engine_error.get(e, math.nan):10.2e}" for e in engines))
        return "\n".join(lines)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e9 if value > 0 else -1e9)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# -- the fused kernel and its branches ----------------------------------------------------------------------
def branch_shares(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """Weight share of each branch, per block still in training form, keyed by the deploy conv's name."""
    shares = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, ReparamBlock) and not module.deployed:
                shares[f"{name}.reparam_conv"] = {b: w.detach() for b, (w, _) in module.branch_kernels().items()}
    return shares


def largest_weight(weight: Tensor, groups: int, shares: dict[str, Tensor] | None, channel: int | None = None
                   ) -> Outlier:
    """The largest |weight| of the fused kernel (of one output channel when ``channel`` is given), with each
    branch's share of it; ``predicted`` sums the shares as ``merged_kernel`` does, in its order."""
    weight = weight.detach()
    region = weight if channel is None else weight[channel:channel + 1]
    index = list(np.unravel_index(int(region.abs().argmax()), tuple(region.shape)))
    index[0] += 0 if channel is None else channel
    index = tuple(int(i) for i in index)
    out_channel = index[0]
    per_group_out = weight.shape[0] // groups
    in_channel = index[1] + (out_channel // per_group_out) * weight.shape[1] if weight.dim() > 1 else 0
    shares = shares or {UNSPLIT: weight}
    values = {b: float(w[index]) for b, w in shares.items()}
    predicted = functools.reduce(torch.add, shares.values())[index]
    return Outlier(out_channel, in_channel, index[2:], float(weight[index]), float(predicted),
                   max(values, key=lambda b: abs(values[b])), values)


def kernel_statistics(weight: Tensor, groups: int, shares: dict[str, Tensor] | None) -> dict:
    """Per-output-channel statistics of a fused kernel and its largest weight traced to a branch."""
    flat = weight.detach().double().reshape(weight.shape[0], -1)
    channel_max = flat.abs().amax(dim=1)
    centred = flat - flat.mean(dim=1, keepdim=True)
    var = centred.pow(2).mean(dim=1)
    std = var.sqrt()
    max_over_std = torch.where(std > 0, channel_max / std, torch.zeros_like(std))
    kurtosis = torch.where(var > 0, centred.pow(4).mean(dim=1) / var.pow(2), torch.zeros_like(var))
    return {
        "channel_max": channel_max.tolist(),
        "max_abs": float(channel_max.max()),
        "median_channel_max": float(channel_max.median()),
        "max_over_std": float(max_over_std.max()),
        "kurtosis": float(kurtosis.max()),
        "outlier": largest_weight(weight, groups, shares),
    }


def identity_bns(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    """Each block's identity BN (a BN whose tap is the identity map), by deploy conv."""
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, ReparamBlock) or module.deployed:
            continue
        for tap in module.bn_taps().values():
            kernel = tap.kernel(None)[0]
            if kernel.shape[2:] != (1, 1) or kernel.shape[0] != module.in_channels:
                continue
            if torch.equal(kernel, identity_kernel(module.in_channels, tap.groups, like=kernel)):
                found[f"{name}.reparam_conv"] = tap.bn
    return found


def identity_variances(model: nn.Module) -> dict[str, Tensor]:
    """The running variance of each block's identity BN, by deploy conv."""
    return {name: bn.running_var.detach().clone() for name, bn in identity_bns(model).items()}


def identity_scales(model: nn.Module) -> dict[str, Tensor]:
    """|gamma| / sqrt(running_var + eps) of each block's identity BN, by deploy conv: the factor the identity
    branch puts into the fused kernel's centre (the QARepVGG paper's outlier source)."""
    return {name: (bn.weight.detach().abs() / (bn.running_var.detach() + bn.eps).sqrt())
            for name, bn in identity_bns(model).items()}


# -- quantization error -------------------------------------------------------------------------------------
def sqnr_db(signal_power: float, noise_power: float) -> float:
    """10 log10(sum signal^2 / sum noise^2); inf when there is no noise."""
    if noise_power <= 0:
        return math.inf
    if signal_power <= 0:
        return -math.inf
    return 10.0 * math.log10(signal_power / noise_power)


def _apply(layer: nn.Module, x: Tensor, weight: Tensor, with_bias: bool = True) -> Tensor:
    bias = layer.bias if with_bias else None
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, weight, bias)


class _LayerStats:
    """Running sums for one layer over the calibration batches."""

    def __init__(self, channels: int):
        self.zeros = torch.zeros(channels, dtype=torch.float64)
        self.count = 0
        self.input_max = 0.0
        self.clipped = 0
        self.values = 0
        self.signal = 0.0
        self.noise = {"weights": 0.0, "inputs": 0.0, "both": 0.0, "fakequant": 0.0}
        self.fq_signal = 0.0
        self.channel_signal: Tensor | None = None  # per output channel, for the weights-only error
        self.channel_noise: Tensor | None = None

    def add_inputs(self, x: Tensor, amax: float | None) -> None:
        per_channel = x.transpose(0, 1).reshape(x.shape[1], -1)
        self.zeros += (per_channel == 0).sum(dim=1).double()
        self.count += per_channel.shape[1]
        self.input_max = max(self.input_max, float(x.abs().max()))
        self.values += x.numel()
        if amax is not None:
            self.clipped += int((x.abs() > amax).sum())

    def add_sqnr(self, layer: nn.Module, qlayer: nn.Module, x: Tensor, y: Tensor) -> None:
        qw = qlayer.weight_quantizer(layer.weight) if qlayer is not None else layer.weight
        qx = qlayer.input_quantizer(x) if qlayer is not None else x
        if layer.bias is not None:  # the bias stays in float (int32 in the engine): neither signal nor noise
            y = y - layer.bias.reshape(1, -1, *[1] * (y.dim() - 2))
        self.signal += float(y.double().pow(2).sum())
        for kind, (inp, w) in {"weights": (x, qw), "inputs": (qx, layer.weight), "both": (qx, qw)}.items():
            error = (_apply(layer, inp, w, with_bias=False) - y).double().pow(2)
            self.noise[kind] += float(error.sum())
            if kind == "weights":
                dims = [d for d in range(y.dim()) if d != 1]
                signal, noise = y.double().pow(2).sum(dim=dims), error.sum(dim=dims)
                first = self.channel_signal is None
                self.channel_signal = signal if first else self.channel_signal + signal
                self.channel_noise = noise if first else self.channel_noise + noise

    def worst_channel(self) -> tuple[int, float]:
        """(output channel, its weights-only SQNR in dB) of the channel quantization hurts most, among the
        channels that carry signal (a channel near zero everywhere has a meaningless ratio)."""
        carries = self.channel_signal >= QUIET_CHANNEL * self.channel_signal.mean()
        sqnr = [sqnr_db(float(s), float(n)) if keep else math.inf
                for s, n, keep in zip(self.channel_signal, self.channel_noise, carries, strict=True)]
        channel = int(np.argmin(sqnr))
        return channel, sqnr[channel]


def _amax(quantizer) -> float | None:
    if quantizer is None or not quantizer.is_enabled or getattr(quantizer, "_amax", None) is None:
        return None
    return float(quantizer._amax.detach().float().max())


def _images(batch) -> Tensor:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def _collect(fp: nn.Module, quantized: nn.Module, names: list[str], loader: Iterable, num_batches: int | None,
             sqnr_images: int | None, progress: bool) -> tuple[dict[str, _LayerStats], dict, list[Tensor]]:
    """One pass over the calibration batches: the FP32 model's layer inputs feed every statistic; on the first
    ``sqnr_images`` images (None: all) also the SQNRs and the fake-quant model's error at each layer. The
    fake-quant model's outputs against FP32's on every image: the model-level evidence."""
    from repq.progress import Progress

    fp_modules, q_modules = dict(fp.named_modules()), dict(quantized.named_modules())
    stats = {n: _LayerStats(fp_modules[n].weight.shape[1] * getattr(fp_modules[n], "groups", 1)) for n in names}
    q_outputs: dict[str, Tensor] = {}
    detail = [0]  # images at the head of the current batch that get SQNRs

    def keep_output(name):
        def hook(_module, _inputs, output):
            if detail[0]:
                q_outputs[name] = output.detach()[:detail[0]]
        return hook

    def measure(name):
        layer, qlayer, entry = fp_modules[name], q_modules[name], stats[name]

        def hook(_module, inputs, output):
            x, y = inputs[0].detach(), output.detach()
            entry.add_inputs(x, _amax(qlayer.input_quantizer))
            k = detail[0]
            if k:
                entry.add_sqnr(layer, qlayer, x[:k], y[:k])
            fq = q_outputs.pop(name, None)
            if fq is not None:
                entry.fq_signal += float(y[:k].double().pow(2).sum())
                entry.noise["fakequant"] += float((fq - y[:k]).double().pow(2).sum())
        return hook

    handles = [q_modules[n].register_forward_hook(keep_output(n)) for n in names]
    handles += [fp_modules[n].register_forward_hook(measure(n)) for n in names]
    total = len(loader) if hasattr(loader, "__len__") else 0
    total = min(total, num_batches) if num_batches is not None else total
    images_seen, engine_batch = 0, []
    outputs = {"images": 0, "changed": 0, "signal": 0.0, "noise": 0.0}
    try:
        with torch.no_grad(), Progress(total, "doctor: measure layers", unit="batch", enabled=progress) as bar:
            for i, batch in enumerate(loader):
                if num_batches is not None and i >= num_batches:
                    break
                images = _images(batch).float()
                if not torch.isfinite(images).all():
                    raise RepqError(f"calibration batch {i} holds NaN or inf values: clean the images first")
                left = len(images) if sqnr_images is None else max(0, sqnr_images - images_seen)
                detail[0] = min(left, len(images))
                q_logits = quantized(images)
                fp_logits = fp(images)
                images_seen += len(images)
                outputs["signal"] += float(fp_logits.double().pow(2).sum())
                outputs["noise"] += float((q_logits - fp_logits).double().pow(2).sum())
                if fp_logits.dim() == 2:  # class scores: count the predictions INT8 changes
                    outputs["images"] += len(images)
                    outputs["changed"] += int((q_logits.argmax(1) != fp_logits.argmax(1)).sum())
                if sum(len(b) for b in engine_batch) < ENGINE_IMAGES:
                    engine_batch.append(images[:ENGINE_IMAGES - sum(len(b) for b in engine_batch)])
                bar.update()
    finally:
        for handle in handles:
            handle.remove()
    if images_seen == 0:
        raise RepqError("the calibration loader yielded no images: give the doctor at least one batch")
    outputs["total"] = images_seen
    return stats, outputs, engine_batch


# -- the engine table ---------------------------------------------------------------------------------------
def engine_errors(quantized: nn.Module, names: list[str], images: Tensor, onnx_file: str | Path | None = None,
                  engine: str = "tensorrt") -> dict[str, float]:
    """Relative error ||engine - fake-quant|| / ||fake-quant|| at each layer's output: the QDQ file of
    ``engine`` (exported here in its placement, or ``onnx_file``, exported from ``quantized``) run as
    ``ENGINE_RUNS`` says. Each conv output is read from its own prefix of the graph, so the fusions before it
    are the engine's own (``repq.engines.intermediates``)."""
    import onnx

    from repq.engines.export import export_onnx

    if engine not in ENGINE_RUNS:
        raise RepqError(f"the doctor checks the engines {', '.join(ENGINE_RUNS)}, not {engine!r}: pick from those")
    placement, runtime, _ = ENGINE_RUNS[engine]
    from repq.engines.intermediates import layer_outputs, run_intermediates, run_intermediates_openvino

    with tempfile.TemporaryDirectory() as tmp:
        if onnx_file is None:
            onnx_file = export_onnx(quantized, Path(tmp) / f"doctor.{placement}.onnx", placement,
                                    (1, *images.shape[1:]), dynamic_batch=True)
        graph = onnx.load(str(onnx_file))
        tensors = layer_outputs(graph, names)
        run = run_intermediates_openvino if runtime == "openvino" else run_intermediates
        got = run(onnx_file, images.numpy(), list(tensors.values()))
    expected: dict[str, Tensor] = {}
    modules = dict(quantized.named_modules())
    handles = [modules[n].register_forward_hook(
        lambda _m, _i, out, n=n: expected.__setitem__(n, out.detach())) for n in tensors]
    try:
        with torch.no_grad():
            quantized(images)
    finally:
        for handle in handles:
            handle.remove()
    errors = {}
    for name, tensor in tensors.items():
        reference = expected[name].double().numpy()
        diff = np.linalg.norm(got[tensor].astype(np.float64) - reference)
        errors[name] = float(diff / max(np.linalg.norm(reference), 1e-30))
    return errors


def first_divergence(errors: dict[str, float], order: list[str], tolerance: float = ENGINE_TOLERANCE) -> str | None:
    """None when every layer's engine error is within ``tolerance``; else the layer where the error first rose
    above float rounding and ten times the error it was fed (where the drift began)."""
    seen = [name for name in order if name in errors]
    if not seen or max(errors[name] for name in seen) <= tolerance:
        return None
    previous = 0.0
    for name in seen:
        if errors[name] > FLOAT_ROUNDING and errors[name] > 10 * previous:
            return name
        previous = max(previous, errors[name])
    return next(name for name in seen if errors[name] > tolerance)


# -- the verdict --------------------------------------------------------------------------------------------
def outcome(output_sqnr: float, changed: float | None) -> str:
    """What the model-level evidence says INT8 does to the model."""
    if changed is not None:
        share = f"{100 * changed:.1f}% of top-1 predictions change, outputs at {output_sqnr:.1f} dB SQNR"
        if changed >= COLLAPSED_SHARE:
            return f"INT8 will collapse ({share})"
        return f"INT8 will lose accuracy ({share})" if changed >= CHANGED_SHARE else f"INT8 keeps it ({share})"
    if output_sqnr < COLLAPSE_DB:
        return f"INT8 will collapse (outputs at {output_sqnr:.1f} dB SQNR)"
    return f"INT8 {'will lose quality' if output_sqnr < DEGRADED_DB else 'keeps it'} (outputs at {output_sqnr:.1f} dB)"


def verdict(layers: list[LayerDiagnosis], output_sqnr: float = math.inf, changed: float | None = None
            ) -> tuple[str, str]:
    """(one line naming the worst layer, its cause and the model-level outcome, the prescription it implies)."""
    worst = min(layers, key=lambda d: d.severity)
    where = worst.block or worst.layer
    result = outcome(output_sqnr, changed)
    if worst.severity >= DEGRADED_DB:
        return (f"every layer and output channel keeps >= {DEGRADED_DB:.0f} dB SQNR in INT8 (worst: {where}, "
                f"{worst.severity:.1f} dB): {result}", "quantize as is (repq ptq)")
    o = worst.worst_channel_outlier if worst.sqnr_worst_channel < worst.sqnr_weights else worst.outlier
    if min(worst.sqnr_weights, worst.sqnr_worst_channel) <= worst.sqnr_inputs:
        dead = {d["channel"]: d for d in worst.dead_inputs}
        cause = f"branch {o.branch}" if o.branch != UNSPLIT else "the fused kernel (no branches to blame)"
        if o.in_channel in dead and "identity" in o.branch:
            cause = (f"identity-branch BN ({o.branch}, running var {dead[o.in_channel]['identity_var']:.2g}) of "
                     f"dead input channel {o.in_channel}")
        elif o.in_channel in dead:
            cause += f" reading dead input channel {o.in_channel}"
        else:
            cause += f" at input channel {o.in_channel}"
        ratio = abs(o.value) / worst.median_channel_max if worst.median_channel_max > 0 else math.inf
        line = (f"{where}: {cause} makes a fused weight of {o.value:.4g} in output channel {o.out_channel}, "
                f"{ratio:.0f}x the layer's median channel max (weight-only SQNR {worst.sqnr_weights:.1f} dB, "
                f"{worst.sqnr_worst_channel:.1f} dB in channel {worst.worst_channel}): {result}")
        if "identity" in o.branch or o.branch in ("rbr_1x1", "rbr_dense"):
            fix = ("substitute QARepVGG blocks (repq substitute) or fine-tune with RepQ (repq finetune); "
                   f"or keep {worst.layer} in float (repq ptq --budget)")
        else:
            fix = f"fine-tune with RepQ (repq finetune) or keep {worst.layer} in float (repq ptq --budget)"
        return line, fix
    line = (f"{where}: inputs range to {worst.input_max:.4g}, amax {worst.input_amax or 0:.4g} clips "
            f"{100 * worst.clipped_values:.3f}% of values (input-only SQNR {worst.sqnr_inputs:.1f} dB): {result}")
    fix = ("calibrate with another method (repq ptq --method auto|entropy|mse|percentile) or keep "
           f"{worst.layer} in float (repq ptq --budget)")
    return line, fix


# -- the one call -------------------------------------------------------------------------------------------
def diagnose(model: nn.Module, loader: Iterable, *, method: str = "max", percentile: float = 99.99,
             num_batches: int | None = None, engines: tuple[str, ...] = tuple(ENGINE_RUNS),
             quantized: nn.Module | None = None, sqnr_images: int | None = 8, progress: bool = True
             ) -> Diagnosis:
    """Diagnose ``model`` (training form, so branches can be blamed; a fused model gets no attribution) for
    symmetric INT8 on the batches of ``loader`` (calibration images). ``quantized``: its fake-quant deploy form
    when already made (``repq.ptq``), else it is calibrated here with ``method``. ``engines``: the engine targets
    whose QDQ files are checked against the fake-quant model (``ENGINE_RUNS``; one that cannot run here is
    skipped with the reason; empty: no engine table). Dead channels, input ranges and the model's
    outputs against FP32 are measured on every image; the layers' SQNRs and the fake-quant model's error at each
    layer on the first ``sqnr_images`` (None: all; millions of outputs per layer already at 224 px, where each
    image costs four convs per layer more)."""
    from repq.quant.toolkit import deploy_copy, quantize, quantized_layers

    if sqnr_images is not None and sqnr_images < 1:
        raise RepqError(f"sqnr_images={sqnr_images}: measure SQNRs on at least one image (None: all)")
    unknown = sorted(set(engines) - set(ENGINE_RUNS))
    if unknown:
        raise RepqError(f"the doctor checks the engines {', '.join(ENGINE_RUNS)}, not {unknown[0]!r}: pick from "
                        "those (or none: engines=())")
    model = model.eval()
    shares, variances = branch_shares(model), identity_variances(model)
    fp = deploy_copy(model).eval()
    clock = time.perf_counter()
    if quantized is None:
        quantized = quantize(model, loader, method, percentile, num_batches=num_batches)
    quantized = quantized.eval()
    seconds = {"calibrate": time.perf_counter() - clock}
    q_layers = quantized_layers(quantized)
    fp_modules = dict(fp.named_modules())
    names = [n for n in q_layers if n in fp_modules and _amax(q_layers[n].weight_quantizer) is not None]
    if not names:
        raise RepqError("the model has no quantized Conv2d/Linear layer: diagnose a CNN with convolutions")
    clock = time.perf_counter()
    stats, outputs, engine_batches = _collect(fp, quantized, names, loader, num_batches, sqnr_images, progress)
    images = outputs["total"]
    seconds["measure"] = time.perf_counter() - clock
    clock = time.perf_counter()
    images_for_engines = torch.cat(engine_batches)
    skipped = {e: reason for e in engines if (reason := _cannot_run(e))}
    errors = {e: engine_errors(quantized, names, images_for_engines, engine=e) for e in engines if e not in skipped}
    seconds["engines"] = time.perf_counter() - clock
    blocks = {f"{n}.reparam_conv": m for n, m in model.named_modules() if isinstance(m, ReparamBlock)}
    layers = [_layer_diagnosis(name, fp_modules[name], q_layers[name], stats[name], blocks.get(name),
                               shares.get(name), variances.get(name),
                               {engine: found[name] for engine, found in errors.items() if name in found})
              for name in names]
    changed = outputs["changed"] / outputs["images"] if outputs["images"] else None
    output_sqnr = sqnr_db(outputs["signal"], outputs["noise"])
    line, fix = verdict(layers, output_sqnr, changed)
    divergence = {engine: first_divergence(found, names) for engine, found in errors.items()}
    calib = getattr(quantized, "repq_quant", {}).get("calibration", {})
    return Diagnosis(layers, calib.get("method", method), images, line, fix, output_sqnr, changed, divergence,
                     skipped, seconds)


def _layer_diagnosis(name: str, layer: nn.Module, qlayer: nn.Module, entry: _LayerStats,
                     block: ReparamBlock | None, shares: dict[str, Tensor] | None, identity_var: Tensor | None,
                     engine_error: dict[str, float]) -> LayerDiagnosis:
    groups = getattr(layer, "groups", 1)
    amax = _amax(qlayer.input_quantizer)
    zero_share = entry.zeros / max(entry.count, 1)
    dead = [{"channel": int(c), "zero_share": float(zero_share[c]),
             "identity_var": None if identity_var is None else float(identity_var[c])}
            for c in torch.nonzero(zero_share >= DEAD_ZERO_SHARE).reshape(-1).tolist()]
    channel, channel_sqnr = entry.worst_channel()
    return LayerDiagnosis(
        layer=name, block=name.removesuffix(".reparam_conv") if block is not None else None,
        kind=type(block or layer).__name__, **kernel_statistics(layer.weight, groups, shares), dead_inputs=dead,
        input_max=entry.input_max, input_amax=amax,
        clipped_range=max(0.0, 1 - amax / entry.input_max) if amax and entry.input_max > 0 else 0.0,
        clipped_values=entry.clipped / max(entry.values, 1),
        sqnr_weights=sqnr_db(entry.signal, entry.noise["weights"]),
        sqnr_inputs=sqnr_db(entry.signal, entry.noise["inputs"]),
        sqnr_both=sqnr_db(entry.signal, entry.noise["both"]),
        worst_channel=channel, sqnr_worst_channel=channel_sqnr,
        worst_channel_outlier=largest_weight(layer.weight, groups, shares, channel),
        fakequant_sqnr=sqnr_db(entry.fq_signal, entry.noise["fakequant"]), engine_error=engine_error)


def _cannot_run(engine: str) -> str | None:
    if ENGINE_RUNS[engine][1] == "openvino":
        from repq.engines.openvino import openvino_available

        return openvino_available()
    return None


def diagnose_checkpoint(checkpoint: str | Path, data, config=None, **overrides) -> Diagnosis:
    """``diagnose`` on files: the training checkpoint's model on ``config.calib_size`` of its training images
    (the calibration draw `repq ptq` makes with the same seed). ``config``: a DoctorConfig (or its fields as
    keywords)."""
    from repq.calibration.loaders import calibration_loader
    from repq.quant.config import DoctorConfig
    from repq.quant.finetune import resolve_data
    from repq.training.train import load_model_checkpoint

    c = DoctorConfig(**{**(config or DoctorConfig()).model_dump(), **overrides})
    model, ckpt = load_model_checkpoint(checkpoint)
    data = resolve_data(data, ckpt)
    loader = calibration_loader(data, min(c.calib_size, len(data.train)), c.batch_size, c.seed)
    return diagnose(model, loader, method=c.method, percentile=c.percentile, engines=tuple(c.engines),
                    sqnr_images=c.sqnr_images, progress=c.progress)
