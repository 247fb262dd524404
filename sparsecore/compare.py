"""Latency of a sparsified model against its dense self: paired, interleaved samples, medians with spread.

Used by ``sparsecore bench`` and the demo, and from Python::

    result = compare_latency(dense_model, sparse_model, (x,), rep=30)
    print(result)   # dense 1.234 ms, sparse 0.456 ms: 2.71x (IQR 2.60-2.80x, 30 pairs)
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class LatencyComparison:
    """Medians of dense and sparse forward times (ms) and the speedup ``dense / sparse``.

    ``ratio`` is ``dense_ms / sparse_ms`` (ratio of the medians); ``ratio_q1``/``ratio_q3`` are the quartiles
    of the per-pair ratios (each pair timed back to back, alternating which runs first): the spread a reader
    needs to judge the ratio.
    """

    dense_ms: float
    sparse_ms: float
    dense_q1_ms: float
    dense_q3_ms: float
    sparse_q1_ms: float
    sparse_q3_ms: float
    ratio: float
    ratio_q1: float
    ratio_q3: float
    pairs: int

    def __str__(self) -> str:
        return (f"dense {self.dense_ms:.3f} ms, sparse {self.sparse_ms:.3f} ms: {self.ratio:.2f}x "
                f"(IQR {self.ratio_q1:.2f}-{self.ratio_q3:.2f}x, {self.pairs} pairs)")


def quartiles(samples: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile) of ``samples`` (one sample: all three equal it)."""
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q1, q2, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q1, q2, q3


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def run(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) * 1e3
    return run


def compare_latency(dense: nn.Module, sparse: nn.Module, example_inputs: tuple, *, warmup: int = 3,
                    rep: int = 20) -> LatencyComparison:
    """Time ``dense(*example_inputs)`` against ``sparse(*example_inputs)`` in ``rep`` interleaved pairs.

    Both models must live on the inputs' device; they run under ``torch.no_grad()``. Warm-up calls (``warmup``
    of each) are not timed. Raises ``ValueError`` for ``rep < 1`` or ``warmup < 0``.
    """
    if rep < 1 or warmup < 0:
        raise ValueError(f"compare_latency needs rep >= 1 and warmup >= 0, got rep={rep}, warmup={warmup}")
    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    device = tensors[0].device if tensors else torch.device("cpu")
    timed = _timer(device)
    fns = {"dense": lambda: dense(*example_inputs), "sparse": lambda: sparse(*example_inputs)}
    samples: dict[str, list[float]] = {"dense": [], "sparse": []}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for i in range(rep):
            order = ("dense", "sparse") if i % 2 == 0 else ("sparse", "dense")  # neither always runs first
            for name in order:
                samples[name].append(timed(fns[name]))
    ratios = [d / s if s > 0 else float("inf") for d, s in zip(samples["dense"], samples["sparse"])]
    d1, d2, d3 = quartiles(samples["dense"])
    s1, s2, s3 = quartiles(samples["sparse"])
    r1, _, r3 = quartiles(ratios)
    return LatencyComparison(d2, s2, d1, d3, s1, s3, d2 / s2 if s2 > 0 else float("inf"), r1, r3, rep)
