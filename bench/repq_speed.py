"""Training-step time of RepQ, RepQ-BN and RepQ-BNEst relative to plain LSQ QAT on the same model and batch.

Plain LSQ QAT = the fused (deploy-form) model with LSQ on every conv/linear: 100%. The RepQ variants train the
re-param form through its merged kernels. Variants are interleaved round by round and the median step time is
reported, so a shared, noisy CPU slows them alike; the process CPU time is reported too (less sensitive to
other processes on a shared machine than wall time).

    python bench/repq_speed.py --model resnet18_acb --batch 32 --rounds 5 [--channels-last] [--profile bn]
    python bench/repq_speed.py --model resnet18_acb --batch 64 --size 224 --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from repq.engines.timing import interleaved_latency, time_calls
from repq.quant.lsq import quantize_plain_layers
from repq.quant.repq import wrap_model
from repq.reparam import create_model, fuse_model


def build(name: str, width: float) -> torch.nn.Module:
    kwargs = {"num_classes": 10, "cifar": True}
    if "repvgg" in name:
        kwargs["width_mult"] = width
    return create_model(name, **kwargs)


def variants(model: torch.nn.Module, bits: int, stats_grad: bool) -> dict[str, torch.nn.Module]:
    out = {"plain LSQ QAT": quantize_plain_layers(fuse_model(model), bits, bits)}
    for mode, label in (("repq", "RepQ"), ("bn", "RepQ-BN"), ("bnest", "RepQ-BNEst")):
        out[label] = wrap_model(copy.deepcopy(model), mode, bits, bits, stats_grad=stats_grad)
    return out


def step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    cuda = x.device.type == "cuda"

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cuda:  # the step's kernels have finished when the timer stops
            torch.cuda.synchronize()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18_acb")
    parser.add_argument("--width", type=float, default=0.5, help="width_mult for repvgg/qarepvgg models")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-stats-grad", action="store_true", help="batch statistics without gradient")
    parser.add_argument("--channels-last", action="store_true", help="NHWC models and input")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--profile", choices=["plain", "repq", "bn", "bnest"], help="print a profile of one variant")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build(args.model, args.width).train()
    x, y = torch.randn(args.batch, 3, args.size, args.size), torch.randint(0, 10, (args.batch,))
    models = {label: m.to(args.device) for label, m in variants(model, args.bits, not args.no_stats_grad).items()}
    x, y = x.to(args.device), y.to(args.device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        models = {label: m.to(memory_format=torch.channels_last) for label, m in models.items()}
    steps = {label: step_fn(m.train(), x, y) for label, m in models.items()}
    for step in steps.values():  # warm-up: initialises the LSQ steps (MinError) and the allocator
        step()
        step()
    cpu: dict[str, list[float]] = {label: [] for label in steps}

    def timer(label: str):
        """One timed step per round (engines.timing's wall clock); the process CPU time of the same step beside
        it, which the library's timers do not measure."""
        def cpu_timed() -> None:
            start = time.process_time()
            steps[label]()
            cpu[label].append(time.process_time() - start)

        return lambda batch: time_calls(cpu_timed, warmup=0, runs=1)

    wall = interleaved_latency({label: timer(label) for label in steps}, [args.batch], args.rounds)
    wall = {label: wall[(label, args.batch)] for label in steps}
    base = wall["plain LSQ QAT"].median_ms
    base_cpu = statistics.median(cpu["plain LSQ QAT"])
    print(f"{args.model} batch {args.batch}x3x{args.size}x{args.size}, {args.bits}-bit, {args.device}, torch threads "
          f"{torch.get_num_threads()}, {args.rounds} interleaved rounds, stats_grad={not args.no_stats_grad}, "
          f"channels_last={args.channels_last}")
    for label, stats in wall.items():
        med_cpu = statistics.median(cpu[label])
        print(f"  {label:14s} wall median {stats.median_ms:8.1f} ms {100 * stats.median_ms / base:6.1f}% "
              f"(mean {stats.mean_ms:.1f}, p90 {stats.p90_ms:.1f})   "
              f"CPU time median {med_cpu * 1000:8.1f} ms {100 * med_cpu / base_cpu:6.1f}%")
    if args.profile:
        label = {"plain": "plain LSQ QAT", "repq": "RepQ", "bn": "RepQ-BN", "bnest": "RepQ-BNEst"}[args.profile]
        from torch.profiler import profile

        with profile() as prof:
            steps[label]()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
