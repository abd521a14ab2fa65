"""Sampling time as the LDDGAN paper reports it: mean wall time for one batch of 100 over repeated trials
after warm-up, next to the number of network function evaluations (NFE)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def synchronize(device) -> None:
    """Wait for queued GPU work, so wall time covers the computation and not just its launch."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(seconds: list[float], batch_size: int, warmup: int) -> dict:
    """Statistics of per-batch wall times (warm-up batches already removed)."""
    return {"batch_size": batch_size, "trials": len(seconds), "warmup": warmup,
            "mean_s": statistics.fmean(seconds), "std_s": statistics.pstdev(seconds) if len(seconds) > 1 else 0.0,
            "min_s": min(seconds), "per_image_s": statistics.fmean(seconds) / batch_size}


def time_batches(run_batch: Callable[[int], object], batch_size: int = 100, trials: int = 5, warmup: int = 1,
                 device=None) -> dict:
    """Call ``run_batch(batch_size)`` ``warmup`` times untimed, then ``trials`` times timed.

    Returns mean/std/min seconds per batch and seconds per image."""
    if trials < 1 or warmup < 0 or batch_size < 1:
        raise ValueError("trials and batch_size must be >= 1 and warmup >= 0")
    with torch.inference_mode():
        for _ in range(warmup):
            run_batch(batch_size)
        synchronize(device)
        seconds = []
        for _ in range(trials):
            start = time.perf_counter()
            run_batch(batch_size)
            synchronize(device)
            seconds.append(time.perf_counter() - start)
    return summarize(seconds, batch_size, warmup)
