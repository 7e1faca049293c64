"""PTQ calibrators as data (which ModelOpt calibrator collects, how amax is computed) plus the histogram path.

Activations are calibrated per tensor with one of four methods; weights are always per output channel with
the max calibrator (TensorRT's convention: a weight is known exactly, so its range is its maximum).

ModelOpt 0.47's `mtq.quantize` handles `max` itself but raises a TypeError when a quantizer uses the histogram
calibrator (it calls `compute_amax()` without the method). For entropy/percentile/MSE we therefore insert the
quantizers with `algorithm=None`, collect histograms with a forward loop, and call `load_calib_amax(method)`
per quantizer -- `calibrate_histograms` below. Its MSE search is broken too: `_compute_amax_mse` passes
`num_bits` where `fake_tensor_quant` now takes `bias`, so it always returns the first candidate. `mse_amax`
here searches the same histogram with the int8 grid of this project instead. And its entropy search is
TensorRT's KL algorithm in per-bin Python loops (~5 s per quantizer here, minutes per model);
`entropy_amax` is the same algorithm vectorized (a test checks it returns ModelOpt's amax).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator

from repq.errors import RepqError

PERCENTILES = (99.9, 99.99, 99.999)


@dataclass(frozen=True)
class Calibrator:
    name: str
    collector: str  # the ModelOpt calibrator that gathers statistics: "max" or "histogram"
    description: str


CALIBRATORS: dict[str, Calibrator] = {
    c.name: c
    for c in (
        Calibrator("max", "max", "largest |x| seen on the calibration set"),
        Calibrator("entropy", "histogram", "amax minimising the KL divergence of the int8 histogram"),
        Calibrator("percentile", "histogram", "the given percentile of |x| (99.9 / 99.99 / 99.999)"),
        Calibrator("mse", "histogram", "amax minimising the mean squared quantization error"),
    )
}


class CalibrationSettings(BaseModel):
    """How activation ranges are chosen; validated so a recipe typo fails before any work."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal[tuple(CALIBRATORS)] = "max"
    percentile: float = 99.99
    num_batches: int | None = None  # None: the whole calibration set

    @field_validator("percentile")
    @classmethod
    def _known_percentile(cls, value: float) -> float:
        if value not in PERCENTILES:
            raise ValueError(f"percentile must be one of {PERCENTILES}, got {value}")
        return value

    @property
    def calibrator(self) -> Calibrator:
        return CALIBRATORS[self.method]

    def describe(self) -> str:
        return f"percentile-{self.percentile}" if self.method == "percentile" else self.method


def settings(
    method: str = "max", percentile: float = 99.99, num_batches: int | None = None
) -> CalibrationSettings:
    """`CalibrationSettings` with pydantic's error turned into one RepqError line."""
    if method not in CALIBRATORS:
        raise RepqError(f"unknown calibrator {method!r}: choose one of {', '.join(CALIBRATORS)}")
    try:
        return CalibrationSettings(method=method, percentile=percentile, num_batches=num_batches)
    except ValueError as err:
        first = str(err).splitlines()[-1].strip() if str(err) else "invalid"
        raise RepqError(f"bad calibration settings ({first}): use percentile in {PERCENTILES}") from err


def activation_cfg(calib: CalibrationSettings) -> dict:
    """ModelOpt quantizer attributes for a per-tensor symmetric int8 activation quantizer."""
    return {"num_bits": 8, "axis": None, "calibrator": calib.calibrator.collector}


WEIGHT_CFG = {"num_bits": 8, "axis": 0}  # per output channel, max calibrator


def enabled_quantizers(model):
    from modelopt.torch.quantization.nn import TensorQuantizer

    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer) and module.is_enabled:
            yield name, module


def calibrate_histograms(model, forward_loop: Callable, calib: CalibrationSettings) -> None:
    """Collect statistics for every enabled quantizer, then load amax with the chosen method."""
    import torch

    quantizers = list(enabled_quantizers(model))
    for _, q in quantizers:
        q.disable_quant()
        q.enable_calib()
    with torch.no_grad():
        forward_loop(model)
    for name, q in quantizers:
        kind = type(q._calibrator).__name__
        try:
            if kind == "HistogramCalibrator" and calib.method in ("mse", "entropy"):
                search = mse_amax if calib.method == "mse" else entropy_amax
                q.amax = torch.tensor(search(*_histogram(q._calibrator)), dtype=torch.float32)
            elif kind == "HistogramCalibrator":
                kwargs = {"percentile": calib.percentile} if calib.method == "percentile" else {}
                q.load_calib_amax(calib.method, **kwargs)
            else:
                q.load_calib_amax()
        except RuntimeError as err:
            raise RepqError(f"quantizer {name} saw no data during calibration ({err}): is that layer used "
                            "in forward? keep it in float with skip_layers") from err
        q.enable_quant()
        q.disable_calib()


def _histogram(calibrator) -> tuple[np.ndarray, np.ndarray]:
    import torch

    hist, edges = calibrator._calib_hist, calibrator._calib_bin_edges
    if hist is None:
        raise RuntimeError("Calibrator returned None: it saw no tensor")
    to_np = (lambda t: t.detach().cpu().double().numpy()) if isinstance(hist, torch.Tensor) else np.asarray
    return to_np(hist).astype(np.float64), to_np(edges).astype(np.float64)


def mse_amax(hist: np.ndarray, edges: np.ndarray, start_bin: int = 128) -> float:
    """The amax (a bin centre) minimising the expected squared error of symmetric int8 on a |x| histogram."""
    centers = (edges[1:] + edges[:-1]) / 2
    first = min(start_bin, len(centers) - 1)
    candidates = centers[first:]
    errors = []
    for chunk in np.array_split(candidates, max(1, len(candidates) * len(centers) // 4_000_000)):
        scale = chunk[:, None] / 127.0
        quantized = np.clip(np.round(centers[None, :] / scale), -128, 127) * scale
        errors.append(((quantized - centers[None, :]) ** 2 * hist[None, :]).sum(axis=1))
    return float(candidates[int(np.argmin(np.concatenate(errors)))])


def entropy_amax(hist: np.ndarray, edges: np.ndarray, start_bin: int = 128, stride: int = 1) -> float:
    """TensorRT's entropy calibration (as ModelOpt's `_compute_amax_entropy`), vectorized per candidate.

    For each candidate edge i, the first i bins (the tail folded into bin i-1) are compared by KL divergence
    with their 128-level quantized version, spread uniformly over the non-empty bins of each level; the last
    minimum wins.
    """
    bins = np.asarray(hist, dtype=np.float64).copy()
    bins[0] = bins[1]
    levels = 128
    candidates, divergences = [], []
    for i in range(start_bin, len(bins) + 1, stride):
        head = bins[:i]
        level = np.digitize(np.arange(i), np.linspace(0, i, num=levels + 1)) - 1
        nonzero = head != 0
        sums = np.bincount(level[nonzero], weights=head[nonzero], minlength=levels)
        members = np.bincount(level[nonzero], minlength=levels)
        expanded = np.where(nonzero, (sums / np.maximum(members, 1))[level], 0.0)
        reference = head.copy()
        reference[-1] += bins[i:].sum()
        divergences.append(_kl(reference, expanded))
        candidates.append(i)
    divergences = np.asarray(divergences)
    last_argmin = len(divergences) - 1 - int(np.argmin(divergences[::-1]))
    return float(edges[candidates[last_argmin]])


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) of two unnormalised histograms (scipy.stats.entropy's convention)."""
    p = p / p.sum()
    total = q.sum()
    if total == 0:
        return float("inf")
    q = q / total
    mask = p > 0
    if np.any(q[mask] == 0):
        return float("inf")
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))
