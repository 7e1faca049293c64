"""Where a re-param model's accuracy goes when its deploy convs are quantized (no training): per quantizer
kind, per layer, and how the merged kernels' ranges explain it.

LSQ quantizers (per-channel max-initialised weights, per-tensor signed activations, the deploy QDQ settings)
go on the fused model; their steps come from the calibration set (512 training images, seed 0). Then:
- val top-1 with all quantizers, with weight quantizers only, with activation quantizers only;
- per layer: top-1 with only that layer's weights quantized;
- per fused 3x3 kernel: the median over output channels of max|w| / rms(w), of the largest off-centre tap
  over max|w| (a RepVGG identity branch puts the maximum on the centre tap), and of the weight rounding error
  over rms(w) at the weight quantizer's max step (max|w| / Qp). Taps under half a step round to zero.

    python bench/quant_sensitivity.py --checkpoint runs/bench_cifar_cl/repvgg_a0/best.pt --bits 8
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from repq.calibration.datasets import load_data
from repq.calibration.loaders import build_loaders, calibration_set
from repq.quant.finetune import quantized_model
from repq.quant.lsq import LSQQuantizer, weight_quantizer
from repq.reparam import fuse_model
from repq.reparam.io import atomic_write_json
from repq.training.distributed import init_distributed
from repq.training.evaluate import evaluate
from repq.training.train import load_model_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def kernel_ranges(model: torch.nn.Module, bits: int) -> list[dict]:
    """Range statistics of every fused 3x3 kernel (medians over output channels); the rounding error is that
    of the deploy weight quantizer at its max-initialised steps."""
    rows = []
    for name, conv in fuse_model(copy.deepcopy(model).eval()).named_modules():
        if not isinstance(conv, torch.nn.Conv2d) or conv.kernel_size != (3, 3):
            continue
        weight = conv.weight.detach()
        flat = weight.flatten(1)
        peak, rms = flat.abs().amax(1), flat.pow(2).mean(1).sqrt()
        quantized = weight_quantizer(bits, weight.shape[0], init="max")(weight).flatten(1)
        error = (quantized - flat).pow(2).mean(1).sqrt() / rms
        off_centre = weight.clone()
        off_centre[:, :, 1, 1] = 0
        rows.append({"layer": name, "peak_over_rms": float((peak / rms).median()),
                     "off_centre_peak_over_peak": float((off_centre.flatten(1).abs().amax(1) / peak).median()),
                     "rounding_error_over_rms": float(error.median())})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="FP32 re-param checkpoint (repq train)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "cifar10"))
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    data = load_data(args.data, val_size=5000, seed=0)
    _, val = build_loaders(data, 256)
    ctx = init_distributed("cpu")
    fp_model, _ = load_model_checkpoint(args.checkpoint)
    model = quantized_model(copy.deepcopy(fp_model), method="merged", w_bits=args.bits, a_bits=args.bits, init="max")
    images, _ = calibration_set(data, 512)
    model.train()
    with torch.no_grad():
        model(images)  # sets every step (weights: max; activations: max over the calibration set)
    model.eval()
    quantizers = {n: q for n, q in model.named_modules() if isinstance(q, LSQQuantizer)}

    def top1(enabled) -> float:
        for name, q in quantizers.items():
            q.enabled = enabled(name, q)
        return evaluate(model, val, ctx)["top1"]

    results = {"checkpoint": args.checkpoint, "bits": args.bits,
               "fp32_top1": evaluate(copy.deepcopy(fp_model), val, ctx)["top1"],
               "all_quantized_top1": top1(lambda n, q: True),
               "weights_only_top1": top1(lambda n, q: not q.is_activation),
               "activations_only_top1": top1(lambda n, q: q.is_activation)}
    print(json.dumps(results), flush=True)
    results["weights_of_one_layer_top1"] = {
        name: top1(lambda n, q, only=name: n == only) for name, q in quantizers.items() if not q.is_activation}
    results["kernel_ranges"] = kernel_ranges(fp_model, args.bits)
    for name, acc in results["weights_of_one_layer_top1"].items():
        print(f"  only {name}: {acc:.2f}", flush=True)
    for row in results["kernel_ranges"]:
        print(f"  {row['layer']:28s} max/rms {row['peak_over_rms']:5.1f}  off-centre max/max "
              f"{row['off_centre_peak_over_peak']:.2f}  rounding error/rms {row['rounding_error_over_rms']:.4f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, results)


if __name__ == "__main__":
    main()
