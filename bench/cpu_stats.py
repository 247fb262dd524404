"""Repeated, interleaved CPU timing and its summary: the statistics of ``bench.bench_cpu``.

One *repeat* times every provider round-robin (``sparsecore.timing.time_interleaved_ms``: ``reps`` samples
each, alternating order) and keeps each provider's median. ``repeats`` repeats give ``repeats`` medians per
provider; the row reports their median (``time_ms``) and their min and max (``time_min_ms``,
``time_max_ms``): the spread between repeats, which on a busy machine is wider than any single repeat's.

A provider slower than ``cap`` times the baseline after the first repeat keeps that one repeat only (it
cannot be a winner, and re-timing a 10x-slower peer would eat the run's budget); its row says so.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable, Mapping

from sparsecore.timing import time_interleaved_ms

# (fns, device, warmup=, rep=) -> {name: median ms}; injectable so that tests need no wall clock
Timer = Callable[..., dict[str, float]]


@dataclass(frozen=True)
class Timing:
    """A provider's repeat medians, summarised."""

    medians_ms: tuple[float, ...]  # one per repeat it took part in
    reps: int                      # samples per repeat
    note: str = ""                 # why it has fewer repeats than asked, if so

    @property
    def median_ms(self) -> float:
        return statistics.median(self.medians_ms)

    @property
    def min_ms(self) -> float:
        return min(self.medians_ms)

    @property
    def max_ms(self) -> float:
        return max(self.medians_ms)

    @property
    def spread_pct(self) -> float:
        """``(max - min) / median`` of the repeat medians, in percent (0 with a single repeat)."""
        return 100.0 * (self.max_ms - self.min_ms) / self.median_ms


def time_repeated(fns: Mapping[str, Callable[[], object]], *, repeats: int = 3, reps: int = 20,
                  baseline: str = "dense", cap: float | None = 4.0, timer: Timer = time_interleaved_ms,
                  ) -> dict[str, Timing]:
    """``repeats`` interleaved repeats of ``reps`` samples over ``fns``; ``{name: Timing}``.

    ``baseline`` must be in ``fns`` when ``cap`` is set: after repeat 1, providers slower than
    ``cap * baseline`` drop out of the remaining repeats (``cap=None``: none do).
    """
    if repeats < 1 or reps < 1:
        raise ValueError(f"repeats and reps must be >= 1, got {repeats} and {reps}")
    if cap is not None and baseline not in fns:
        raise ValueError(f"the cap needs the baseline {baseline!r} among the providers {sorted(fns)}")
    medians: dict[str, list[float]] = {name: [] for name in fns}
    notes: dict[str, str] = {}
    active = dict(fns)
    for r in range(repeats):
        got = timer(active, "cpu", warmup=2 if r == 0 else 1, rep=reps)
        for name, ms in got.items():
            medians[name].append(ms)
        if r == 0 and cap is not None and repeats > 1:
            limit = cap * got[baseline]
            for name in [n for n, ms in got.items() if ms > limit]:
                del active[name]
                notes[name] = f"1 repeat: {got[name] / got[baseline]:.1f}x slower than {baseline} (cap {cap:g}x)"
    return {name: Timing(tuple(ms), reps, notes.get(name, "")) for name, ms in medians.items()}
