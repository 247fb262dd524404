"""The self-timing worker protocol (bench/deepsparse_runner.py <-> bench.worker_client) without DeepSparse:
fake workers that speak it (or break it), the runner's own serve loop, and the e2e rows they give."""
import argparse
import io
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from bench import cpu_e2e, deepsparse_runner
from bench.common import BEST_DENSE_MS, PROVIDER, SPEEDUP, TIME_MS
from bench.cpu_stats import ProviderFailed, SelfTimed
from bench.worker_client import Worker

# A worker speaking the protocol; BEHAVIOUR (argv[1]) chooses how it misbehaves after ``n`` good answers.
FAKE = textwrap.dedent('''
    import json, sys, time
    behaviour, n = sys.argv[1], int(sys.argv[2])
    print("log line on stderr", file=sys.stderr, flush=True)
    if behaviour == "bad_hello":
        print("DeepSparse banner", flush=True); sys.exit(0)
    if behaviour == "dies_loading":
        sys.exit(3)
    print(json.dumps({"ready": ["a", "b"], "errors": {"c": "ImportError: no c"}, "versions": {"a": "1.0"}}), flush=True)
    answered = 0
    for line in sys.stdin:
        verb, _, rest = line.strip().partition(" ")
        name, _, count = rest.partition(" ")
        if verb == "quit":
            sys.exit(0)
        if answered >= n:
            if behaviour == "garbage":
                print("nan ms", flush=True); continue
            if behaviour == "dies":
                print("worker crashed", file=sys.stderr, flush=True); sys.exit(7)
            if behaviour == "stalls":
                time.sleep(60)
            if behaviour == "error":
                print("error RuntimeError: engine failed", flush=True); continue
        answered += 1
        print(" ".join([{"a": "7.25", "b": "3.5"}[name]] * int(count or 1)), flush=True)
''')


@pytest.fixture
def fake_worker(tmp_path):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE)

    def start(behaviour: str = "ok", n: int = 10**6, **kw) -> Worker:
        return Worker([sys.executable, str(script), behaviour, str(n)], **kw)
    return start


def test_ready_line_and_reported_times(fake_worker):
    with fake_worker() as w:
        assert (w.ready, w.errors, w.versions) == (["a", "b"], {"c": "ImportError: no c"}, {"a": "1.0"})
        assert [w.sample("a"), w.provider("b").sample(), w.sample("a")] == [7.25, 3.5, 7.25]
        assert w.samples("b", 3) == [3.5] * 3 and w.provider("a").samples(2) == [7.25] * 2
        with pytest.raises(ValueError, match="not 'c'"):
            w.provider("c")
        proc = w._proc
    assert proc.returncode == 0  # it quit when asked
    with pytest.raises(ProviderFailed, match="closed"):
        w.sample("a")


@pytest.mark.parametrize("behaviour, message", [
    ("garbage", "answered 'nan ms' to 'run a', not a time in ms"),
    ("dies", r"exited \(code 7\) before its answer to 'run a'; its stderr ends: .*worker crashed"),
])
def test_a_broken_worker_fails_every_later_sample_and_is_gone(fake_worker, behaviour, message):
    with fake_worker(behaviour, n=2) as w:
        assert w.sample("a") == 7.25 and w.sample("b") == 3.5
        with pytest.raises(ProviderFailed, match=message):
            w.sample("a")
        assert w._proc.poll() is not None  # killed (or exited): nothing left running
        with pytest.raises(ProviderFailed, match=message):
            w.sample("b")


def test_a_stalled_worker_times_out_instead_of_hanging(fake_worker):
    with fake_worker("stalls", n=1, answer_timeout_s=0.3) as w:
        w.sample("a")
        with pytest.raises(ProviderFailed, match=r"no its answer to 'run b' within 0.3 s"):
            w.sample("b")
        assert w._proc.poll() is not None


def test_an_error_answer_fails_that_sample_only(fake_worker):
    with fake_worker("error", n=0) as w:
        with pytest.raises(ProviderFailed, match="a: RuntimeError: engine failed"):
            w.sample("a")
        assert w._proc.poll() is None and w.error == ""  # the worker lives on


@pytest.mark.parametrize("behaviour, message", [
    ("bad_hello", "not the protocol's JSON.*'DeepSparse banner'"),
    ("dies_loading", r"exited \(code 3\) before its ready line; its stderr ends: log line on stderr"),
])
def test_a_worker_that_never_gets_ready_raises_at_start(fake_worker, behaviour, message):
    with pytest.raises(ProviderFailed, match=message):
        fake_worker(behaviour)


class FakeTime:
    """Stands in for the runner's ``time`` module: each call of a fake runtime advances it by that call's cost."""

    def __init__(self):
        self.t = 5.0

    def perf_counter(self) -> float:
        return self.t


def test_runner_serve_answers_the_time_of_the_call_only(monkeypatch):
    clock = FakeTime()
    monkeypatch.setattr(deepsparse_runner, "time", clock)

    def slow():
        clock.t += 0.0125

    def broken():
        raise RuntimeError("bad\ninput")
    out = io.StringIO()
    commands = io.StringIO("run x\nrun y\nrun z\nhello\nrun x\nrun x 3\nrun x 0\nquit\nrun x\n")
    deepsparse_runner.serve({"x": slow, "y": broken}, commands, out)
    lines = out.getvalue().splitlines()
    assert float(lines[0]) == pytest.approx(12.5) and float(lines[4]) == pytest.approx(12.5)
    assert lines[1] == "error RuntimeError: bad input"
    assert lines[2].startswith("error expected 'run NAME [N]' with NAME in ['x', 'y']") and "'run z'" in lines[2]
    assert lines[3].startswith("error ")
    assert [float(v) for v in lines[5].split()] == pytest.approx([12.5] * 3)  # three calls, three times
    assert lines[6].startswith("error ") and len(lines) == 7  # N must be >= 1; nothing after quit


def test_runner_ready_line_names_runtimes_that_failed_to_load(tmp_path):
    # The real runner, without DeepSparse: a runtime it does not know fails to load, and says so.
    runner = str(Path(deepsparse_runner.__file__))
    with Worker([sys.executable, runner, str(tmp_path / "none.onnx"), "--batch", "1", "--seq", "4",
                 "--runtimes", "nosuch"]) as w:
        assert w.ready == [] and "unknown runtime 'nosuch'" in w.errors["nosuch"]


def _peers_from(worker_factory):
    @contextmanager
    def peers(dense, built, batch, x):
        with worker_factory() as w:
            yield cpu_e2e.Peers({n: w.provider(n) for n in w.ready}, {n: f"fake {n}" for n in w.ready},
                                [{PROVIDER: n, "note": f"error: {why}"} for n, why in w.errors.items()], "90%")
    return peers


def _bench(peers, seeded):
    # dense only (no sparse variant to plan): the rows of the peers are what is tested
    args = argparse.Namespace(plan_rep=3, repeats=2, reps=3, e2e_compile=False)
    return cpu_e2e.bench_model("lin", nn.Sequential(nn.Linear(16, 8)), {}, {2: (torch.randn(2, 16, generator=seeded),)},
                               args, {}, log=lambda s: None, peers=peers)


def _fixed(fake_ms, timer):
    """The bench's timer, with torch providers replaced by self-timed ones that report ``fake_ms``."""
    def t(fns, device, **kw):
        return timer({n: (SelfTimed(lambda n=n: fake_ms[n]) if n in fake_ms else f) for n, f in fns.items()},
                     device, **kw)
    return t


def test_e2e_rows_of_interleaved_peers_and_of_a_peer_that_dies(monkeypatch, seeded, fake_worker):
    monkeypatch.setattr(cpu_e2e, "BLOCK", 1)  # one call per turn: the answers below count calls
    monkeypatch.setattr(cpu_e2e, "_SETTLE_S", 0.0)
    real = cpu_e2e.time_repeated
    fake_ms = {"dense": 14.5}
    monkeypatch.setattr(cpu_e2e, "time_repeated",
                        lambda fns, timer, **kw: real(fns, timer=_fixed(fake_ms, timer), **kw))
    rows = _bench(_peers_from(lambda: fake_worker("dies", n=5)), seeded)
    by = {r[PROVIDER]: r for r in rows}
    assert set(by) == {"dense", "a", "b", "c"}
    assert by["c"]["note"] == "error: ImportError: no c" and TIME_MS not in by["c"]
    # rounds go (dense a b) (b a dense) (dense a b): 5 answers, up to a's first sample; it dies on b's
    assert by["a"]["note"].startswith("error: failed in repeat 1: worker exited (code 7)") and TIME_MS not in by["a"]
    assert by["b"]["note"].startswith("error: failed in repeat 1: worker exited (code 7)")
    assert by["dense"][TIME_MS] == 14.5  # the torch rows go on

    rows = _bench(_peers_from(fake_worker), seeded)
    by = {r[PROVIDER]: r for r in rows}
    for name, ms in (("a", 7.25), ("b", 3.5)):
        r = by[name]
        assert (r[TIME_MS], r["time_min_ms"], r["time_max_ms"], r["repeats"], r["reps"]) == (ms, ms, ms, 2, 3)
        assert r[BEST_DENSE_MS] == 14.5 and r[SPEEDUP] == 14.5 / ms and r["pattern"] == "90%"
        assert r["note"].startswith("interleaved in the same run") and r["backends"] == f"fake {name}"


def test_deepsparse_peers_without_its_venv_are_skip_rows(tmp_path):
    args = argparse.Namespace(deepsparse_python=str(tmp_path / "no-venv" / "bin" / "python"))
    logged = []
    with cpu_e2e.deepsparse_peers(None, {}, 1, (torch.zeros(1, 4),), args=args, log=logged.append) as peers:
        assert peers.providers == {} and [r[PROVIDER] for r in peers.rows] == ["deepsparse", "onnxruntime"]
        assert all(r["note"].startswith("skipped: no DeepSparse environment at ") for r in peers.rows)
    assert len(logged) == 1 and "\n" not in logged[0]


def test_a_worker_that_cannot_start_raises(tmp_path):
    with pytest.raises(ProviderFailed, match="could not start: FileNotFoundError"):
        Worker([str(tmp_path / "no-python"), "x"])
