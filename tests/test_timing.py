"""The timers rank a slow function above a fast one, and count only the timed calls."""
import time

from sparsecore.timing import time_interleaved_ms, time_ms


def test_interleaved_timer_ranks_and_scales():
    calls = {"fast": 0, "slow": 0}

    def fast():
        calls["fast"] += 1
        time.sleep(0.001)

    def slow():
        calls["slow"] += 1
        time.sleep(0.02)

    t = time_interleaved_ms({"fast": fast, "slow": slow}, "cpu", warmup=1, rep=5)
    assert 1.0 <= t["fast"] < 15.0 and 20.0 <= t["slow"] < 60.0, t
    assert calls == {"fast": 6, "slow": 6}
    assert 20.0 <= time_ms(slow, "cpu", warmup=0, rep=3) < 60.0


def test_host_ms_on_cpu_is_the_latency():
    from sparsecore.timing import host_ms

    assert 20.0 <= host_ms(lambda: time.sleep(0.02), "cpu", warmup=0, rep=3) < 60.0
