"""bench.cpu_stats.time_rounds_ms, the e2e bench's timer: round order, plain vs self-timed providers, pauses,
failed providers, and time_repeated's handling of them. A fake clock: no wall-clock assertions."""
import statistics

import pytest

from bench import cpu_stats
from bench.cpu_stats import ProviderFailed, SelfTimed, time_repeated, time_rounds_ms


class FakeClock:
    """``now()`` in seconds; providers advance it by the ms they "take"; ``sleep`` is recorded, not slept."""

    def __init__(self):
        self.t = 100.0
        self.sleeps: list[float] = []
        self.log: list[str] = []  # every call, sleep included, in order

    def now(self) -> float:
        return self.t

    def take(self, ms: float) -> None:
        self.t += ms / 1e3

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.log.append("sleep")
        self.t += s


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(cpu_stats, "_now", c.now)
    monkeypatch.setattr(cpu_stats, "_sleep", c.sleep)
    return c


def plain(clock: FakeClock, name: str, costs_ms: list[float]):
    """A plain provider that takes ``costs_ms[i]`` on its i-th call (cycling)."""
    calls = []

    def fn():
        clock.log.append(name)
        clock.take(costs_ms[len(calls) % len(costs_ms)])
        calls.append(1)
    return fn


def reporting(clock: FakeClock, name: str, reports_ms: list[float], round_trip_ms: float = 50.0):
    """A self-timed provider: its call costs ``round_trip_ms`` on the clock but reports ``reports_ms[i]``."""
    calls = []

    def sample() -> float:
        clock.log.append(name)
        clock.take(round_trip_ms)
        ms = reports_ms[len(calls) % len(reports_ms)]
        calls.append(1)
        return ms
    return SelfTimed(sample)


def test_rounds_alternate_direction_so_no_provider_always_goes_first(clock):
    fns = {n: plain(clock, n, [1.0]) for n in "abc"}
    time_rounds_ms(fns, warmup=1, rep=3)
    assert clock.log == list("abc" "cba" "abc" "cba")  # warm-up round, then 3 timed rounds


def test_medians_of_plain_providers_come_from_the_clock(clock):
    a = [3.0, 1.0, 2.0, 10.0, 4.0]
    b = [7.0, 5.0, 6.0, 0.5, 9.0]
    got = time_rounds_ms({"a": plain(clock, "a", [99.0] + a), "b": plain(clock, "b", [99.0] + b)},
                         warmup=1, rep=5)  # the warm-up call (99 ms) is not a sample
    assert got["a"] == pytest.approx(statistics.median(a)) and got["b"] == pytest.approx(statistics.median(b))


def test_self_timed_providers_contribute_what_they_report_not_the_round_trip(clock):
    reports = [8.0, 6.0, 7.5, 30.0]
    got = time_rounds_ms({"torch": plain(clock, "torch", [2.0]),
                          "ext": reporting(clock, "ext", [1000.0] + reports, round_trip_ms=40.0)},
                         warmup=1, rep=4)
    assert got["ext"] == pytest.approx(statistics.median(reports))  # not 40 ms, the pipe's round trip
    assert got["torch"] == pytest.approx(2.0)


def test_pause_after_every_call_outside_the_timed_region(clock):
    fns = {"a": plain(clock, "a", [2.0]), "b": reporting(clock, "b", [3.0])}
    got = time_rounds_ms(fns, warmup=2, rep=3, pause_s=0.25)
    assert clock.log == ["a", "sleep", "b", "sleep", "b", "sleep", "a", "sleep"] + \
        ["a", "sleep", "b", "sleep", "b", "sleep", "a", "sleep", "a", "sleep", "b", "sleep"]
    assert set(clock.sleeps) == {0.25} and got["a"] == pytest.approx(2.0)  # the pause is not in a's time
    clock.log.clear()
    time_rounds_ms(fns, warmup=0, rep=2)
    assert "sleep" not in clock.log


def test_a_failing_provider_is_reported_and_not_called_again(clock):
    n = []

    def dies_on_third_call() -> float:
        n.append(1)
        if len(n) >= 3:
            raise ProviderFailed("worker exited (code 1)")
        return 5.0
    fns = {"a": plain(clock, "a", [1.0, 3.0]), "ext": SelfTimed(dies_on_third_call)}
    got = time_rounds_ms(fns, warmup=1, rep=6)
    assert isinstance(got["ext"], ProviderFailed) and "exited" in str(got["ext"]) and len(n) == 3
    assert got["a"] == pytest.approx(2.0) and clock.log.count("a") == 7  # the others go on


def test_other_errors_propagate(clock):
    def broken():
        raise RuntimeError("a bug, not a failed peer")
    with pytest.raises(RuntimeError, match="a bug"):
        time_rounds_ms({"a": broken}, warmup=0, rep=1)
    with pytest.raises(ValueError, match="CPU"):
        time_rounds_ms({"a": broken}, "cuda")


def test_time_repeated_drops_a_failed_provider_keeping_its_finished_repeats(clock):
    n = []

    def fails_in_repeat_two() -> float:
        n.append(1)
        if len(n) > 4:  # repeat 1: 2 warm-up rounds + 2 samples
            raise ProviderFailed("answered 'garbage'")
        return 4.0
    t = time_repeated({"dense": plain(clock, "dense", [10.0]), "ext": SelfTimed(fails_in_repeat_two)},
                      repeats=3, reps=2, cap=None, timer=time_rounds_ms)
    assert t["dense"].medians_ms == pytest.approx((10.0, 10.0, 10.0)) and t["dense"].error == ""
    assert t["ext"].medians_ms == (4.0,) and t["ext"].error == "failed in repeat 2: answered 'garbage'"
    assert len(n) == 5  # not called in repeat 3


def test_time_repeated_with_a_cap_needs_its_baseline_alive(clock):
    def dead() -> float:
        raise ProviderFailed("gone")
    with pytest.raises(ProviderFailed, match="baseline 'dense'"):
        time_repeated({"dense": SelfTimed(dead), "b": plain(clock, "b", [1.0])}, repeats=2, reps=1, cap=4.0,
                      timer=time_rounds_ms)


def test_turns_of_a_block_drop_their_first_call_and_alternate(clock):
    # a's first call of every turn is slow (the switch); the others tell its steady state apart from b's
    a = plain(clock, "a", [50.0, 2.0, 2.0, 2.0])
    b = plain(clock, "b", [60.0, 3.0, 4.0, 3.0])
    got = time_rounds_ms({"a": a, "b": b}, warmup=1, rep=6, block=4)
    assert got == pytest.approx({"a": 2.0, "b": 3.0})
    # warmup 1 + ceil(6 / 3) = 3 turns each, four calls per turn, turns alternating a, b, b, a, a, b
    assert clock.log == ["a"] * 4 + ["b"] * 8 + ["a"] * 8 + ["b"] * 4


def test_self_timed_turn_is_one_request_for_the_whole_block(clock):
    requests = []

    def samples(n: int) -> list[float]:
        requests.append(n)
        clock.take(500.0)  # the round trip: never a sample
        return [40.0] + [5.0] * (n - 1)
    ext = SelfTimed(lambda: pytest.fail("a block turn must not sample call by call"), samples)
    got = time_rounds_ms({"a": plain(clock, "a", [1.0]), "ext": ext}, warmup=0, rep=5, block=3)
    assert got == pytest.approx({"a": 1.0, "ext": 5.0})
    assert requests == [3, 3, 3]  # ceil(5 / 2) turns


def test_block_must_be_positive(clock):
    with pytest.raises(ValueError, match="block"):
        time_rounds_ms({"a": plain(clock, "a", [1.0])}, block=0)
