"""Wall time of `repq.diagnose` (calibration, per-layer statistics and SQNRs, the QDQ export and its ONNX Runtime
table) on RepVGG-A0 at 224x224 with 32 calibration images, on this CPU. Target: under 60 s on 2 cores.

    python bench/doctor_speed.py                  # training form: the doctor fuses it and blames branches
    python bench/doctor_speed.py --form fused     # an already fused model (no branch attribution)

The images are random (the time does not depend on their content); the model is randomly initialised with
randomised BN statistics.
"""

import argparse
import json
import platform
import subprocess
import time

import torch


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="repvgg_a0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--form", choices=("train", "fused"), default="train")
    parser.add_argument("--no-engine", action="store_true", help="skip the ONNX Runtime table")
    args = parser.parse_args()

    import repq
    from repq.quant.toolkit import quiet_modelopt

    with quiet_modelopt():
        import modelopt.torch.quantization  # noqa: F401 -- imported before the clock starts, as in a session

    torch.manual_seed(0)
    model = repq.create_model(args.model, num_classes=1000).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2.0)
            module.running_mean.normal_(0, 0.1)
    if args.form == "fused":
        model = repq.fuse_model(model)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.images, 3, args.image_size, args.image_size, generator=generator)
    loader = [(chunk, torch.zeros(len(chunk), dtype=torch.long)) for chunk in images.split(args.batch_size)]
    start = time.perf_counter()
    diagnosis = repq.diagnose(model, loader, engines=() if args.no_engine else ("onnxruntime",), progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"model": args.model, "form": args.form, "image_size": args.image_size,
                      "images": diagnosis.images, "layers": len(diagnosis.layers),
                      "engine_table": not args.no_engine, "seconds": round(seconds, 1),
                      "phases": {k: round(v, 1) for k, v in diagnosis.seconds.items()},
                      "torch_threads": torch.get_num_threads(), "cpu": cpu_name(),
                      "verdict": diagnosis.verdict}, indent=2))


if __name__ == "__main__":
    main()
