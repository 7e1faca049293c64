"""The doctor's part of the report: per diagnosed model the branch attribution and engine-divergence tables and
the per-layer plot; the PTQ fallback's accuracy / float layers / latency trade-off as a table and a plot. Both
from plain data (``Diagnosis.as_dict()``, the fallback search's record), so the report never imports the
quantization code."""

from __future__ import annotations

from typing import Any

SHORT = {"tensorrt": "TensorRT's file in ORT", "onnxruntime": "ORT's file in ORT",
         "openvino": "TensorRT's file in OpenVINO"}


def _db(value) -> str:
    return "-" if value is None else ("inf" if value >= 1e9 else f"{value:.1f}")


def diagnoses(doctor: dict[str, Any] | None) -> dict[str, dict]:
    """label -> diagnosis, from the report's ``doctor`` entry (one diagnosis, or several by model label)."""
    if not doctor:
        return {}
    return {"model": doctor} if "layers" in doctor else dict(doctor)


def doctor_sections(doctor: dict[str, Any] | None) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(heading, intro, header, rows) of the attribution and divergence tables of every diagnosed model."""
    found = diagnoses(doctor)
    sections = []
    for label, one in found.items():
        sections += _one_model_sections(one, f" ({label})" if len(found) > 1 else "")
    return sections


def _one_model_sections(doctor: dict[str, Any], suffix: str) -> list[tuple[str, str, list[str], list[list[str]]]]:
    layers = doctor["layers"]
    rows = []
    for d in layers:
        o = d["outlier"]
        rows.append([d.get("block") or d["layer"], f"{d['max_abs']:.4g}", f"{d['outlier_ratio']:.1f}",
                     o["branch"], f"{o['out_channel']}/{o['in_channel']}",
                     ", ".join(f"{b} {v:.3g}" for b, v in o["shares"].items()),
                     str(len(d["dead_inputs"])), f"{100 * d['clipped_values']:.3f}", _db(d["sqnr_weights"]),
                     _db(d["sqnr_worst_channel"]), _db(d["sqnr_inputs"]), _db(d["sqnr_both"])])
    sections = [("Doctor: where INT8 loses accuracy" + suffix,
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
        sections.append(("Doctor: where the engine parts ways" + suffix, "At every layer output: the fake-quant "
                         "model's SQNR against FP32, and the relative error of each engine's exported QDQ file "
                         f"against the fake-quant model (intermediate tensors read by name). {where}.",
                         header, table))
    return sections


def plot_doctor(doctor: dict[str, Any] | None, pyplot) -> Any:
    """Fused max |w| (log scale) and SQNR per layer of one diagnosis: the figure, or None without one."""
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



def fallback_sections(fallback: dict[str, Any] | None) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """One table per PTQ model searched under a budget: each candidate's float layers, score, drop, latency."""
    sections = []
    for method, record in (fallback or {}).items():
        metric = record["metric"]
        unit = "dB" if metric == "psnr" else "pts"
        rows = [[str(len(h["float_layers"])), ", ".join(h["float_layers"][-1:]) or "-", f"{h[metric]:.2f}",
                 f"{h['drop']:.2f}", "-" if h.get("latency_ms") is None else f"{h['latency_ms']:.3f}"]
                for h in record["history"]]
        ranked = "output error of each layer quantized alone" if record.get("rank_by", "output_error") == \
            "output_error" else "validation drop of each layer quantized alone"
        fp32_ms = record.get("fp32_latency_ms")
        intro = (f"{method}: the fewest layers kept in float for an ONNX Runtime INT8 drop of at most "
                 f"{record['budget']} {unit} from FP32 ({record['fp32']:.2f}"
                 + (f", {fp32_ms:.3f} ms" if fp32_ms is not None else "") + "). Greedy on the ranking by "
                 f"{ranked}; {record['evaluations']} engine evaluations of the val split"
                 + (f" plus {record['rank_evaluations']} fake-quant ones for the ranking"
                    if record.get("rank_evaluations") else "") + f". Kept in float: "
                 f"{', '.join(record['float_layers']) or 'none'}. Those layers carry no Q/DQ in either placement: "
                 "ONNX Runtime and OpenVINO run them in FP32, TensorRT in FP16 (in an INT8+FP16 engine).")
        sections.append((f"Fallback under a budget ({method})", intro,
                         ["Float layers", "Added", metric, f"Drop ({unit})",
                          f"ORT latency, batch {record.get('latency_batch', 1)} (ms)"], rows))
    return sections


def plot_fallback(fallback: dict[str, Any] | None, pyplot) -> Any:
    """Engine score and latency against the number of float layers, one line per searched PTQ model."""
    if not fallback:
        return None
    fig, ax = pyplot.subplots(figsize=(8, 4.5))
    ax_t = ax.twinx()
    for i, (method, record) in enumerate(fallback.items()):
        metric, history = record["metric"], record["history"]
        ks = [len(h["float_layers"]) for h in history]
        color = f"C{i}"
        ax.plot(ks, [h[metric] for h in history], "o-", color=color, label=f"{method}: ORT INT8 {metric}")
        ax.axhline(record["fp32"] - record["budget"], color=color, ls=":", lw=1,
                   label=f"{method}: FP32 - budget")
        timed = [(k, h["latency_ms"]) for k, h in zip(ks, history, strict=True) if h.get("latency_ms")]
        if timed:
            ax_t.plot(*zip(*timed, strict=True), "s--", color=color, alpha=0.5, label=f"{method}: latency")
    ax.set_xlabel("layers kept in float")
    ax.set_ylabel("PSNR (dB)" if record["metric"] == "psnr" else "top-1 (%)")
    ax_t.set_ylabel("ORT latency (ms)")
    handles = ax.get_legend_handles_labels()
    more = ax_t.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig
