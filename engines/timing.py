"""Measurements shared by every engine: latency statistics (median/p90/p99, FPS), the timers (wall clock,
CUDA events, interleaved rounds over several engines) and top-k accuracy.

Percentiles are numpy's default (linear interpolation between order statistics). FPS is images per second
at the median latency, so one slow outlier does not move it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from repq.errors import RepqError


@dataclass(frozen=True)
class LatencyStats:
    batch_size: int
    runs: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    fps: float

    def as_dict(self) -> dict:
        return asdict(self)


def latency_stats(times_s: Sequence[float], batch_size: int) -> LatencyStats:
    """Summarise per-batch wall times (seconds) of `batch_size` images each."""
    times = np.asarray(times_s, dtype=np.float64)
    if times.size == 0 or batch_size < 1:
        raise RepqError(
            "latency statistics need at least one timed run and a batch size >= 1: time more runs"
        )
    if not np.all(np.isfinite(times)) or np.any(times <= 0):
        raise RepqError(
            "a timed run was not a positive finite duration: check the timer (CUDA events synced?)"
        )
    ms = times * 1e3
    median = float(np.percentile(ms, 50))
    return LatencyStats(
        batch_size=int(batch_size),
        runs=int(times.size),
        median_ms=median,
        p90_ms=float(np.percentile(ms, 90)),
        p99_ms=float(np.percentile(ms, 99)),
        mean_ms=float(ms.mean()),
        fps=batch_size * 1e3 / median,
    )


def time_calls(fn: Callable[[], object], *, warmup: int = 10, runs: int = 50) -> list[float]:
    """Wall time (seconds) of `runs` calls of a synchronous `fn` after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def interleaved_latency(
    timers: Mapping[str, Callable[[int], Sequence[float]]],
    batch_sizes: Sequence[int],
    rounds: int = 3,
    on_round: Callable[[int], object] | None = None,
) -> dict[tuple[str, int], LatencyStats]:
    """Latency of several engines timed in interleaved rounds, pooled: each round times every engine at every
    batch size once (``timers[name](batch)`` -> seconds per run, e.g. ``lambda b: engine.times(shape, b)``), so
    load from other processes falls on all of them alike. ``on_round(i)`` is called after round i (from 1)."""
    if rounds < 1:
        raise RepqError("interleaved timing needs at least one round: use rounds >= 3 on a shared machine")
    pooled: dict[tuple[str, int], list[float]] = {(name, b): [] for name in timers for b in batch_sizes}
    for index in range(rounds):
        for name, timer in timers.items():
            for batch in batch_sizes:
                pooled[(name, batch)] += list(timer(batch))
        if on_round is not None:
            on_round(index + 1)
    return {key: latency_stats(times, key[1]) for key, times in pooled.items()}


def speedup(reference: LatencyStats, candidate: LatencyStats) -> float:
    """How many times faster `candidate` is than `reference` (ratio of median latencies per image)."""
    ref = reference.median_ms / reference.batch_size
    cand = candidate.median_ms / candidate.batch_size
    return ref / cand


def quality_key(*results: dict) -> str:
    """The figure results are judged by: ``psnr`` (super-resolution) when any holds it, bare or as ``val_psnr``,
    else ``top1``."""
    return "psnr" if any("psnr" in r or "val_psnr" in r for r in results) else "top1"


def score(predict: Callable[[np.ndarray], np.ndarray], loader, to_numpy: Callable | None = None) -> dict:
    """The task's quality metric of `predict` over `loader`: a loader that scores itself does (super-resolution
    validation: PSNR); otherwise top-k accuracy over (images, labels) batches (`to_numpy` prepares them)."""
    if hasattr(loader, "score"):
        return loader.score(predict)
    return topk_accuracy(predict, to_numpy(loader) if to_numpy else loader)


def topk_accuracy(predict: Callable[[np.ndarray], np.ndarray], loader, topk: Sequence[int] = (1, 5)) -> dict:
    """Top-k accuracy (percent) of `predict` (float32 NCHW batch -> logits) over (images, labels) batches."""
    correct = dict.fromkeys(topk, 0)
    seen = 0
    for images, labels in loader:
        images = np.ascontiguousarray(np.asarray(images, dtype=np.float32))
        labels = np.asarray(labels).reshape(-1)
        logits = np.asarray(predict(images), dtype=np.float32)
        order = np.argsort(-logits, axis=1)
        for k in topk:
            correct[k] += int((order[:, :k] == labels[:, None]).any(axis=1).sum())
        seen += labels.size
    if seen == 0:
        raise RepqError("the evaluation loader yielded no images: check the dataset path and split")
    return {f"top{k}": 100.0 * correct[k] / seen for k in topk} | {"images": seen}


def cuda_event_times(
    launch: Callable[[], object], stream, *, warmup: int = 20, runs: int = 100
) -> list[float]:
    """GPU time (seconds) of `runs` launches on a torch CUDA `stream`, bracketed by CUDA events.

    Each run is synchronized on its end event, so the figure is one batch's latency, not a pipelined rate.
    """
    import torch

    with torch.cuda.stream(stream):
        for _ in range(warmup):
            launch()
    stream.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        with torch.cuda.stream(stream):
            launch()
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times
