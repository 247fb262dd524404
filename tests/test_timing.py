"""The timers: untimed warm-up, the median of the timed calls, interleaved order. A fake clock makes every
figure exact, so nothing here depends on how busy the machine is."""
import pytest

from sparsecore import timing
from sparsecore.timing import host_ms, time_interleaved_ms, time_ms


@pytest.fixture
def clock(monkeypatch):
    """A fake host clock: ``clock.advance(ms)`` is the only way time passes."""
    class Clock:
        now = 0.0

        def advance(self, ms: float) -> None:
            self.now += ms / 1e3

    c = Clock()
    monkeypatch.setattr(timing, "_now", lambda: c.now)
    return c


def test_time_ms_counts_warmup_and_rep_and_takes_the_median(clock):
    durations = iter([100.0, 100.0, 5.0, 1.0, 3.0, 2.0, 50.0])  # 2 warm-up calls, then 5 timed ones
    calls = []

    def fn():
        calls.append(1)
        clock.advance(next(durations))

    assert time_ms(fn, "cpu", warmup=2, rep=5) == pytest.approx(3.0)  # median of 5, 1, 3, 2, 50
    assert len(calls) == 7


def test_time_ms_defaults_on_cpu(clock):
    calls = []
    assert time_ms(lambda: (calls.append(1), clock.advance(4.0)), "cpu") == pytest.approx(4.0)
    assert len(calls) == 3 + 20


def test_interleaved_timer_alternates_order_and_ranks(clock):
    order = []

    def make(name, ms):
        def fn():
            order.append(name)
            clock.advance(ms)
        return fn

    t = time_interleaved_ms({"fast": make("fast", 1.0), "slow": make("slow", 20.0)}, "cpu", warmup=1, rep=4)
    assert t == {"fast": pytest.approx(1.0), "slow": pytest.approx(20.0)}
    assert order == ["fast", "slow"] + ["fast", "slow", "slow", "fast", "fast", "slow", "slow", "fast"]


def test_host_ms_on_cpu_is_the_latency(clock):
    assert host_ms(lambda: clock.advance(7.0), "cpu", warmup=0, rep=3) == pytest.approx(7.0)
