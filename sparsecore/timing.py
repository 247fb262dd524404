"""Latency measurement shared by the planner and the benchmarks."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def time_ms(fn: Callable[[], object], device: torch.device | str, *, warmup: int = 3, rep: int = 20) -> float:
    """Median wall time of ``fn()`` in milliseconds; warm-up runs are not timed.

    CUDA: ``triton.testing.do_bench`` (median, L2 cache flushed between runs). CPU: median of ``rep``
    ``time.perf_counter`` samples after ``warmup`` untimed calls.
    """
    device = torch.device(device)
    if device.type == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def time_interleaved_ms(fns: dict[str, Callable[[], object]], device: torch.device | str, *, warmup: int = 3,
                        rep: int = 20) -> dict[str, float]:
    """Median time of each function in ms, sampled in turn (a, b, b, a, a, b, ...) on CPU.

    Interleaving spreads machine noise (other processes, frequency changes) evenly over the contenders,
    which back-to-back timing does not. On CUDA each function gets its own ``do_bench``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return {name: time_ms(fn, device) for name, fn in fns.items()}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    for i in range(rep):
        for name, fn in (order if i % 2 == 0 else order[::-1]):  # a, b, b, a, ...: no contender always goes first
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}
