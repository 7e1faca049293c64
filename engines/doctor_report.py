"""The doctor's part of the report: the branch attribution and engine-divergence tables and the per-layer plot,
from the diagnosis as plain data (``Diagnosis.as_dict()``), so the report never imports the quantization code."""

from __future__ import annotations

from typing import Any

SHORT = {"tensorrt": "TensorRT's file in ORT", "onnxruntime": "ORT's file in ORT",
         "openvino": "TensorRT's file in OpenVINO"}


def _db(value) -> str:
    return "-" if value is None else ("inf" if value >= 1e9 else f"{value:.1f}")


def doctor_sections(doctor: dict[str, Any] | None) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(heading, intro, header, rows) of the attribution and divergence tables; none without a diagnosis."""
    if not doctor:
        return []
    layers = doctor["layers"]
    rows = []
    for d in layers:
        o = d["outlier"]
        rows.append([d.get("block") or d["layer"], f"{d['max_abs']:.4g}", f"{d['outlier_ratio']:.1f}",
                     o["branch"], f"{o['out_channel']}/{o['in_channel']}",
                     ", ".join(f"{b} {v:.3g}" for b, v in o["shares"].items()),
                     str(len(d["dead_inputs"])), f"{100 * d['clipped_values']:.3f}", _db(d["sqnr_weights"]),
                     _db(d["sqnr_worst_channel"]), _db(d["sqnr_inputs"]), _db(d["sqnr_both"])])
    sections = [("Doctor: where INT8 loses accuracy",
                 f"Verdict: {doctor['verdict']}. Prescription: {doctor['prescription']}. Per layer of the deploy "
                 f"form on {doctor['images']} calibration images ({doctor['method']} calibrator): the fused "
                 "kernel's largest |w|, its ratio to the median channel max, the branch whose share makes it "
                 "(all shares listed), dead input channels, input values clipped by amax, and the layer's SQNR "
                 "(dB) with quantized weights, its worst output channel's, quantized inputs, and both.",
                 ["Layer", "max |w|", "x median", "Branch", "Out/in ch", "Shares", "Dead in", "Clipped %",
                  "W dB", "W worst ch dB", "A dB", "WA dB"], rows)]
    placements = [p for p in doctor.get("engine_divergence", {})]
    if placements:
        header = ["Layer", "Fake-quant vs FP32 (dB)"] + [f"{SHORT.get(p, p)} vs fake-quant" for p in placements]
        table = [[d.get("block") or d["layer"], _db(d["fakequant_sqnr"])]
                 + [f"{d['engine_error'].get(p, float('nan')):.2e}" for p in placements] for d in layers]
        where = "; ".join(f"{SHORT.get(p, p)}: " + (f"parts ways at {layer}" if layer else "follows it throughout")
                          for p, layer in doctor["engine_divergence"].items())
        sections.append(("Doctor: where the engine parts ways", "At every layer output: the fake-quant model's "
                         "SQNR against FP32, and the relative error of each engine's exported QDQ file against the "
                         f"fake-quant model (intermediate tensors read by name). {where}.",
                         header, table))
    return sections


def plot_doctor(doctor: dict[str, Any] | None, pyplot) -> Any:
    """Fused max |w| (log scale) and SQNR per layer: the figure, or None without a diagnosis."""
    if not doctor:
        return None
    layers = doctor["layers"]
    names = [d.get("block") or d["layer"] for d in layers]
    xs = list(range(len(layers)))
    fig, (ax_w, ax_s) = pyplot.subplots(2, 1, figsize=(max(8, 0.45 * len(layers)), 6.5), sharex=True)
    ax_w.bar(xs, [d["max_abs"] for d in layers], color="#4c72b0")
    ax_w.plot(xs, [d["median_channel_max"] for d in layers], "k_", markersize=14, label="median channel max")
    ax_w.set_yscale("log")
    ax_w.set_ylabel("fused max |w|")
    ax_w.legend(loc="upper left", fontsize=8)
    for key, label in (("sqnr_weights", "weights"), ("sqnr_inputs", "inputs"), ("sqnr_both", "both"),
                       ("sqnr_worst_channel", "worst channel (weights)")):
        ax_s.plot(xs, [min(d[key] if d[key] is not None else 0, 80) for d in layers], marker="o", markersize=3,
                  label=label)
    ax_s.set_ylabel("layer SQNR (dB)")
    ax_s.set_xticks(xs, names, rotation=70, ha="right", fontsize=7)
    ax_s.legend(loc="lower left", fontsize=8, ncol=4)
    fig.tight_layout()
    return fig

