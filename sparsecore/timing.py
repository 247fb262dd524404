"""Latency measurement shared by the planner and the benchmarks."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


_now = time.perf_counter  # the host clock (seconds); tests swap in a fake one


def time_ms(fn: Callable[[], object], device: torch.device | str, *, warmup: int | None = None,
            rep: int | None = None) -> float:
    """Median time of ``fn()`` in milliseconds; warm-up runs are not timed.

    CPU: median of ``rep`` (default 20) host-clock samples after ``warmup`` (default 3) untimed calls.
    CUDA: ``triton.testing.do_bench`` (median, L2 cache flushed between runs), which sizes its warm-up and
    timed runs to fill ``warmup`` and ``rep`` *milliseconds* (default 25 and 100): on a GPU a count of
    runs that suits a 10 us kernel does not suit a 10 ms one.
    """
    device = torch.device(device)
    if device.type == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=25 if warmup is None else warmup, rep=100 if rep is None else rep,
                              return_mode="median"))
    for _ in range(3 if warmup is None else warmup):
        fn()
    samples = []
    for _ in range(20 if rep is None else rep):
        t0 = _now()
        fn()
        samples.append((_now() - t0) * 1e3)
    return statistics.median(samples)


# ~1 ms of GPU sleep at ~2 GHz, queued before each sample of ``host_ms``: that sample's call never waits
# for the GPU unless it synchronises.
_BUSY_CYCLES = 2_000_000


def host_ms(fn: Callable[[], object], device: torch.device | str, *, warmup: int = 3, rep: int = 20) -> float:
    """Median host time to *issue* ``fn()`` in ms: its Python, allocation and launch cost.

    An eager model pays ``max(GPU time, host time)`` per layer in steady state: when a layer's host
    work outlasts its kernels, the GPU idles between launches. ``time_ms`` on CUDA cannot see this
    (``do_bench`` hides launch cost behind its cache flush), so the planner takes both. CUDA: a long
    ``torch.cuda._sleep`` is queued before each sample, so no call waits for the GPU and each sample is
    pure host work; a call that synchronises waits for the sleep (~1 ms) and is rightly found slow. CPU: host time is the
    latency, ``time_ms``.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return time_ms(fn, device, warmup=warmup, rep=rep)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    samples = []
    with torch.cuda.device(device):
        for _ in range(rep):
            torch.cuda._sleep(_BUSY_CYCLES)  # the stream is busy for ~1 ms: issuing cannot block on the GPU
            t0 = _now()
            fn()
            samples.append((_now() - t0) * 1e3)
    torch.cuda.synchronize(device)
    return statistics.median(samples)


def capture_cuda_graph(fn: Callable[[], object], device: torch.device | str, *, warmup: int = 3
                       ) -> tuple["torch.cuda.CUDAGraph", object]:
    """Capture ``fn()`` into a CUDA graph: ``(graph, output)``; ``graph.replay()`` refills ``output``.

    ``fn`` is warmed up on a side stream first (so autotuning, lazy init and allocator growth happen
    outside the capture) and must read its inputs from fixed tensors, as any graphed code must.
    """
    device = torch.device(device)
    with torch.cuda.device(device):
        return _capture(fn, device, warmup)


def _capture(fn: Callable[[], object], device: torch.device, warmup: int) -> tuple["torch.cuda.CUDAGraph", object]:
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


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
            t0 = _now()
            fn()
            samples[name].append((_now() - t0) * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def interleaved_samples_ms(fns: dict[str, Callable[[], object]], *, warmup: int = 1, rounds: int = 10
                           ) -> dict[str, list[float]]:
    """``rounds`` wall-time samples (ms) of each CPU function, taken in turn (a, b, b, a, ...).

    Sample ``i`` of every function comes from the same stretch of time, so ``dense[i] / other[i]`` is a
    paired ratio that machine noise largely cancels out of (see ``quantiles``).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    for i in range(rounds):
        for name, fn in (order if i % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return samples


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """``(q25, median, q75)`` of ``values`` (linear interpolation; a single value repeats)."""
    v = sorted(values)
    if not v:
        raise ValueError("quantiles of an empty list")

    def q(p: float) -> float:
        pos = p * (len(v) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(v) - 1)
        return v[lo] + (v[hi] - v[lo]) * (pos - lo)
    return q(0.25), q(0.5), q(0.75)
