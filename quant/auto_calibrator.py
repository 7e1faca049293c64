"""method=auto: the activation calibrator chosen by evidence. Each of the four calibrates the model; the one whose
fake-quant model scores best on held-out *training* images (disjoint from the calibration draw, never the val
split a result is reported on) is kept; ties in top-1 go to the higher SQNR of the logits against FP32."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from repq.calibration.calibrators import CALIBRATORS
from repq.quant.doctor import sqnr_db


def _score(model: nn.Module, reference: list[torch.Tensor], batches: list[tuple[torch.Tensor, torch.Tensor]]
           ) -> dict[str, float]:
    hits, total, signal, noise = 0, 0, 0.0, 0.0
    with torch.no_grad():
        for (images, labels), ref in zip(batches, reference, strict=True):
            out = model(images)
            hits += int((out.argmax(dim=1) == labels).sum())
            total += len(labels)
            signal += float(ref.double().pow(2).sum())
            noise += float((out - ref).double().pow(2).sum())
    return {"top1": 100.0 * hits / max(total, 1), "logit_sqnr": sqnr_db(signal, noise)}


def choose_calibrator(model: nn.Module, calib_loader: Iterable, check_loader: Iterable, *,
                      percentile: float = 99.99, fuse: bool = True, skip_layers: Sequence[str] = (),
                      methods: Sequence[str] = tuple(CALIBRATORS), log: Callable[[str], None] = print
                      ) -> tuple[nn.Module, dict]:
    """(the fake-quant model of the best calibrator, {"method": its name, "scores": each one's top-1 and logit
    SQNR on ``check_loader``})."""
    from repq.quant.toolkit import deploy_copy, quantize

    batches = [(batch[0], batch[1]) for batch in check_loader]
    float_model = deploy_copy(model.eval(), fuse).eval()
    with torch.no_grad():
        reference = [float_model(images) for images, _ in batches]
    best, best_key, scores = None, None, {}
    for method in methods:
        quantized = quantize(model, calib_loader, method, percentile, fuse=fuse, skip_layers=skip_layers)
        scores[method] = _score(quantized, reference, batches)
        log(f"auto: {method} top-1 {scores[method]['top1']:.2f}% on {sum(len(b[1]) for b in batches)} held-out "
            f"training images, logit SQNR {scores[method]['logit_sqnr']:.1f} dB")
        key = (scores[method]["top1"], scores[method]["logit_sqnr"])
        if best_key is None or key > best_key:
            best, best_key, chosen = quantized, key, method
    best.repq_quant = {**best.repq_quant, "auto": {"method": chosen, "scores": scores}}
    return best, {"method": chosen, "scores": scores}
