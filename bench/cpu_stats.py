"""Repeated, interleaved CPU timing and its summary: the statistics of ``bench.bench_cpu``.

One *repeat* times every provider round-robin (``reps`` samples each, alternating order: a, b, c, c, b, a,
...) and keeps each provider's median: ``sparsecore.timing.time_interleaved_ms`` by default, or this module's
``time_rounds_ms``, which also takes *self-timed* providers (an external process that measures its own call
and reports the time, so that a pipe round trip does not count against it). ``repeats`` repeats give
``repeats`` medians per provider; the row reports their median (``time_ms``) and their min and max
(``time_min_ms``, ``time_max_ms``): the spread between repeats, which on a busy machine is wider than any
single repeat's.

A provider slower than ``cap`` times the baseline after the first repeat keeps that one repeat only (it
cannot be a winner, and re-timing a 10x-slower peer would eat the run's budget); its row says so. A provider
that raises ``ProviderFailed`` (a worker that died or answered garbage) leaves the remaining samples and
repeats, and its ``Timing.error`` says why; the others go on.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Union

from sparsecore.timing import time_interleaved_ms

_now = time.perf_counter  # the host clock (seconds); tests swap in a fake one
_sleep = time.sleep


class ProviderFailed(RuntimeError):
    """A provider cannot give a sample (its worker died, timed out or answered garbage): why, in the message."""


@dataclass(frozen=True)
class SelfTimed:
    """A provider that times itself: ``sample()`` runs it once and returns that run's wall time in ms.

    For work done in another process: the time is measured there, around the work only, and the request's
    round trip is left out. ``sample`` raises ``ProviderFailed`` when it cannot give a time. ``samples(n)``,
    if given, runs it ``n`` times back to back in one request and returns the ``n`` times.
    """

    sample: Callable[[], float]
    samples: Optional[Callable[[int], list[float]]] = None


Provider = Union[Callable[[], object], SelfTimed]
# (fns, device, warmup=, rep=) -> {name: median ms, or the ProviderFailed that stopped it}; injectable so
# that tests need no wall clock
Timer = Callable[..., dict[str, Union[float, ProviderFailed]]]


@dataclass(frozen=True)
class Timing:
    """A provider's repeat medians, summarised (a provider that failed in repeat 1 has none: see ``error``)."""

    medians_ms: tuple[float, ...]  # one per repeat it finished
    reps: int                      # samples per repeat
    note: str = ""                 # why it has fewer repeats than asked, if so
    error: str = ""                # why it stopped giving samples (ProviderFailed), if it did

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


def time_repeated(fns: Mapping[str, Provider], *, repeats: int = 3, reps: int = 20,
                  baseline: str = "dense", cap: float | None = 4.0, timer: Timer = time_interleaved_ms,
                  ) -> dict[str, Timing]:
    """``repeats`` interleaved repeats of ``reps`` samples over ``fns``; ``{name: Timing}``.

    ``baseline`` must be in ``fns`` when ``cap`` is set: after repeat 1, providers slower than
    ``cap * baseline`` drop out of the remaining repeats (``cap=None``: none do). A provider that failed
    (the timer gave its ``ProviderFailed``) drops out too, keeping the repeats it finished, its error set.
    """
    if repeats < 1 or reps < 1:
        raise ValueError(f"repeats and reps must be >= 1, got {repeats} and {reps}")
    if cap is not None and baseline not in fns:
        raise ValueError(f"the cap needs the baseline {baseline!r} among the providers {sorted(fns)}")
    medians: dict[str, list[float]] = {name: [] for name in fns}
    notes: dict[str, str] = {}
    errors: dict[str, str] = {}
    active = dict(fns)
    for r in range(repeats):
        got = timer(active, "cpu", warmup=2 if r == 0 else 1, rep=reps)
        for name, failed in [(n, v) for n, v in got.items() if isinstance(v, ProviderFailed)]:
            del active[name], got[name]
            errors[name] = f"failed in repeat {r + 1}: {failed}"
        if cap is not None and baseline in errors:
            raise ProviderFailed(f"the baseline {baseline!r} {errors[baseline]}")
        for name, ms in got.items():
            medians[name].append(ms)
        if r == 0 and cap is not None and repeats > 1:
            limit = cap * got[baseline]
            for name in [n for n, ms in got.items() if ms > limit]:
                del active[name]
                notes[name] = f"1 repeat: {got[name] / got[baseline]:.1f}x slower than {baseline} (cap {cap:g}x)"
    return {name: Timing(tuple(ms), reps, notes.get(name, ""), errors.get(name, "")) for name, ms in medians.items()}


def time_rounds_ms(fns: Mapping[str, Provider], device: str = "cpu", *, warmup: int = 3, rep: int = 20,
                   pause_s: float = 0.0, block: int = 1) -> dict[str, Union[float, ProviderFailed]]:
    """Median ms of each provider over ``rep`` samples, taken in turn (a, b, c, c, b, a, a, ...); a ``Timer``.

    A plain callable is timed around its call with the host clock; a ``SelfTimed`` one contributes the time
    it reports. ``warmup`` untimed rounds come first. ``block`` > 1: each turn is ``block`` calls back to
    back, of which the first is left out (it pays for the switch: caches the other contenders filled, a
    thread pool waking up or another one still spinning) and the others are samples, so that every provider
    is measured as a serving loop runs it, and the turns still alternate between contenders. ``pause_s``: a
    sleep after every turn, outside the timed region and the same for every provider. A provider that
    raises ``ProviderFailed`` is not called again; its entry is that exception instead of a median. CPU only
    (``device`` is for the ``Timer`` signature).

    Example: ``time_rounds_ms({"torch": lambda: model(x), "ext": SelfTimed(worker_sample)}, rep=20)``
    """
    if device != "cpu":
        raise ValueError(f"time_rounds_ms times CPU providers only, got device {device!r}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    kept = block - 1 if block > 1 else 1
    rounds = -(-rep // kept)
    failed: dict[str, ProviderFailed] = {}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    for i in range(warmup + rounds):
        for name, fn in (order if i % 2 == 0 else order[::-1]):  # no contender always goes first
            if name in failed:
                continue
            try:
                ms = _turn(fn, block)
            except ProviderFailed as e:
                failed[name] = e
                continue
            if i >= warmup:
                samples[name] += ms[1:] if block > 1 else ms
            if pause_s:
                _sleep(pause_s)
    return {name: failed[name] if name in failed else statistics.median(samples[name][:rep]) for name in fns}


def _turn(fn: Provider, calls: int) -> list[float]:
    """``calls`` back-to-back samples of one provider (ms)."""
    if isinstance(fn, SelfTimed):
        if calls > 1 and fn.samples is not None:
            return list(fn.samples(calls))
        return [fn.sample() for _ in range(calls)]
    out = []
    for _ in range(calls):
        t0 = _now()
        fn()
        out.append((_now() - t0) * 1e3)
    return out
