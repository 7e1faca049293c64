"""Which layers to keep in float so INT8 stays within an accuracy budget, measured on the ONNX Runtime engine.

Layers are ranked by the error each causes in the model's output when it alone is quantized (the calibration
images, a forward pass per layer) or, on request, by the validation score it costs alone (fake-quant, one
evaluation per layer); the search then keeps the 0, 1, 2, ... most harmful layers in float until the ORT engine's
drop from FP32 on the validation split is within the budget: greedy on the ranking, one export and one
evaluation per candidate (k + 2 engine evaluations for k float layers, FP32 included), capped. Each candidate's
engine is also timed (batch 1), so the record holds the accuracy / float layers / latency trade-off.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from repq.errors import RepqError


def _layer_quantizers(quantized: nn.Module) -> dict[str, list]:
    """The enabled input and weight quantizers of each quantized layer, by name."""
    from repq.quant.toolkit import quantized_layers

    return {n: [q for q in (getattr(m, "input_quantizer", None), m.weight_quantizer) if q is not None and q.is_enabled]
            for n, m in quantized_layers(quantized).items()}


def keep_in_float(quantized: nn.Module, layers: Iterable[str]) -> nn.Module:
    """A copy of the fake-quant model with ``layers``' input and weight quantizers off (the others keep the
    ranges they were calibrated with, which the float layers do not change: calibration sees FP32 inputs)."""
    kept = copy.deepcopy(quantized)
    quantizers = _layer_quantizers(kept)
    layers = list(layers)
    for name in layers:
        if name not in quantizers:
            raise RepqError(f"{name!r} is no quantized layer of this model: use a name from quantized_layers()")
        for quantizer in quantizers[name]:
            quantizer.disable()
    record = dict(getattr(quantized, "repq_quant", {}))
    record["skip_layers"] = sorted(set(record.get("skip_layers", [])) | set(layers))
    kept.repq_quant = record
    return kept


def _outputs(model: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(images) for images in batches]


@contextlib.contextmanager
def _enabled(quantizers: list):
    for q in quantizers:
        q.enable()
    try:
        yield
    finally:
        for q in quantizers:
            q.disable()


def _alone(quantized: nn.Module):
    """A working copy of ``quantized`` with every quantizer off, and (name, context that quantizes only that
    layer) for each quantized layer."""
    work = copy.deepcopy(quantized).eval()
    quantizers = _layer_quantizers(work)
    for qs in quantizers.values():
        for q in qs:
            q.disable()
    return work, [(name, _enabled(qs)) for name, qs in quantizers.items()]


def rank_layers(quantized: nn.Module, float_model: nn.Module, loader: Iterable, num_batches: int = 4, *,
                by: str = "output_error", val_loader: Iterable | None = None, metric: str = "top1"
                ) -> list[tuple[str, float]]:
    """Most harmful layer first. ``by="output_error"``: (layer, relative output error ||y_q - y|| / ||y|| with only
    that layer quantized) on ``num_batches`` of ``loader``; ``by="accuracy"``: (layer, drop of ``metric`` on
    ``val_loader`` with only that layer quantized, fake-quant in PyTorch). ``float_model`` is the deploy form
    ``quantized`` was made from."""
    from repq.training.evaluate import evaluate

    if by not in ("output_error", "accuracy"):
        raise RepqError(f"rank_by={by!r}: rank layers by output_error or accuracy")
    work, layers = _alone(quantized)
    if by == "accuracy":
        if val_loader is None:
            raise RepqError("ranking by accuracy needs the validation loader (val_loader)")
        reference = float(evaluate(float_model.eval(), val_loader, progress=False)[metric])
        errors = []
        for name, only in layers:
            with only:
                errors.append((name, reference - float(evaluate(work, val_loader, progress=False)[metric])))
        return sorted(errors, key=lambda item: -item[1])
    batches = []
    for i, batch in enumerate(loader):
        if i >= num_batches:
            break
        batches.append(batch[0] if isinstance(batch, (list, tuple)) else batch)
    if not batches:
        raise RepqError("the ranking needs at least one calibration batch: give the loader some images")
    reference = _outputs(float_model.eval(), batches)
    signal = sum(float(r.double().pow(2).sum()) for r in reference)
    errors = []
    for name, only in layers:
        with only:
            outputs = _outputs(work, batches)
        noise = sum(float((o - r).double().pow(2).sum()) for o, r in zip(outputs, reference, strict=True))
        errors.append((name, (noise / max(signal, 1e-30)) ** 0.5))
    return sorted(errors, key=lambda item: -item[1])


def engine_score(model: nn.Module, val_loader, input_shape, metric: str) -> float:
    """``metric`` of ``model`` (fake-quant: its ORT-placement QDQ file; float: its FP32 file) in ONNX Runtime."""
    return engine_measure(model, val_loader, input_shape, metric, timed_runs=0)[0]


def engine_measure(model: nn.Module, val_loader, input_shape, metric: str, timed_runs: int = 20
                   ) -> tuple[float, float | None]:
    """(``metric``, median latency in ms of one batch of ``input_shape`` over ``timed_runs`` runs, or None when
    0) of ``model``'s ORT file (fake-quant: its ORT-placement QDQ file; float: its FP32 file)."""
    import statistics

    from repq.api import export
    from repq.engines.onnxruntime import OrtEngine

    with tempfile.TemporaryDirectory() as tmp:
        path = export(model, Path(tmp) / "candidate.onnx", "onnxruntime", input_shape)
        engine = OrtEngine(path)
        score = float(engine.evaluate(val_loader)[metric])
        if not timed_runs:
            return score, None
        times = engine.times(tuple(input_shape[1:]), input_shape[0], warmup=3, runs=timed_runs)
        return score, 1000.0 * statistics.median(times)


def fallback_search(quantized: nn.Module, float_model: nn.Module, calib_loader, val_loader, budget: float,
                    input_shape, *, metric: str = "top1", rank_by: str = "output_error", max_evaluations: int = 10,
                    timed_runs: int = 20, log: Callable[[str], None] = print) -> tuple[nn.Module, dict]:
    """The fake-quant model with the fewest layers of the ranking in float whose ORT score is at most ``budget``
    below FP32's (also in ORT), and the record of the search (each candidate's score, drop and latency)."""
    import time

    if budget < 0:
        raise RepqError(f"budget {budget} is negative: give the largest acceptable drop, e.g. 0.5 (points)")
    clock = time.perf_counter()
    ranking = rank_layers(quantized, float_model, calib_loader, by=rank_by, val_loader=val_loader, metric=metric)
    rank_seconds = time.perf_counter() - clock
    reference, fp32_ms = engine_measure(float_model, val_loader, input_shape, metric, timed_runs)
    history, evaluations = [], 1
    for k in range(len(ranking) + 1):
        if evaluations >= max_evaluations:
            raise RepqError(f"no candidate met the budget of {budget} within {max_evaluations} evaluations (kept "
                            f"{k - 1} layers in float, drop {history[-1]['drop']:.2f}): raise the budget, or "
                            "fine-tune (repq finetune) instead")
        layers = [name for name, _ in ranking[:k]]
        candidate = keep_in_float(quantized, layers)
        everything = k == len(ranking)  # the FP32 graph itself: no QDQ file to export
        score, latency = ((reference, fp32_ms) if everything else
                          engine_measure(candidate, val_loader, input_shape, metric, timed_runs))
        evaluations += 1
        history.append({"float_layers": layers, metric: score, "drop": reference - score, "latency_ms": latency})
        log(f"fallback: {k} layer(s) in float, ORT {metric} {score:.2f} (FP32 {reference:.2f}, drop "
            f"{reference - score:.2f}, budget {budget})")
        if reference - score <= budget:
            record = {"budget": budget, "metric": metric, "fp32": reference, "fp32_latency_ms": fp32_ms,
                      "int8": score, "float_layers": layers, "evaluations": evaluations, "history": history,
                      "rank_by": rank_by, "rank_seconds": rank_seconds,
                      "rank_evaluations": len(ranking) + 1 if rank_by == "accuracy" else 0,
                      "search_seconds": time.perf_counter() - clock, "latency_batch": input_shape[0],
                      "ranking": [{"layer": n, "output_error" if rank_by == "output_error" else "drop": e}
                                  for n, e in ranking]}
            return candidate, record
    raise AssertionError("unreachable: with every layer in float the drop is zero")
