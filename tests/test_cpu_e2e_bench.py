"""bench.cpu_e2e rows: eager and compiled dense and sparse, ratios against the best dense, errors vs float64."""
import argparse
import functools

import torch
from torch import nn

import sparsecore as sc
from bench import cpu_e2e
from bench.common import BEST_DENSE_MS, PROVIDER, SPEEDUP, TIME_MS
from bench.cpu_stats import Timing

FAKE_MS = {"dense": 10.0, "dense compiled": 8.0, "unstructured90": 5.0, "unstructured90 compiled": 4.0}


def test_compiled_rows_and_best_dense(monkeypatch, seeded):
    calls = {}

    def fake_time_repeated(fns, **kw):  # no wall clock: fixed medians, each provider still run once
        for name, fn in fns.items():
            calls[name] = fn()
        return {name: Timing((FAKE_MS[name],), kw["reps"]) for name in fns}

    monkeypatch.setattr(cpu_e2e, "time_repeated", fake_time_repeated)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))  # fast to build
    torch._dynamo.reset()
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=seeded)))
    model = nn.Sequential(nn.Linear(40, 72), nn.GELU(), nn.Linear(72, 24))
    x = torch.randn(5, 40, generator=seeded)
    args = argparse.Namespace(plan_rep=3, repeats=1, reps=2, e2e_compile=True)
    rows = cpu_e2e.bench_model("mlp", model, {"unstructured90": sc.SparsityConfig("unstructured", 0.9)}, {5: (x,)},
                               args, {}, log=lambda s: None)
    by = {r[PROVIDER]: r for r in rows}
    assert set(by) == set(FAKE_MS) == set(calls)
    for name, r in by.items():
        assert r[TIME_MS] == FAKE_MS[name] and r[BEST_DENSE_MS] == 8.0  # the compiled dense is the faster dense
        assert r[SPEEDUP] == 8.0 / FAKE_MS[name]
        assert (r["compile_s"] > 0) if name.endswith(" compiled") else r["compile_s"] == ""
    for name in ("unstructured90", "unstructured90 compiled"):
        assert 0 < by[name]["max_abs_err"] < 1e-4  # fp32 vs the float64 masked model: rounding, not zero
    torch.testing.assert_close(calls["unstructured90 compiled"], calls["unstructured90"], atol=1e-5, rtol=1e-5)


def test_no_compile_leaves_eager_rows_only(monkeypatch, seeded):
    monkeypatch.setattr(cpu_e2e, "time_repeated",
                        lambda fns, **kw: {n: Timing((FAKE_MS[n],), kw["reps"]) for n in fns})
    model = nn.Sequential(nn.Linear(16, 8))
    args = argparse.Namespace(plan_rep=3, repeats=1, reps=2, e2e_compile=False)
    rows = cpu_e2e.bench_model("lin", model, {"unstructured90": sc.SparsityConfig("unstructured", 0.9)},
                               {2: (torch.randn(2, 16, generator=seeded),)}, args, {}, log=lambda s: None)
    assert [r[PROVIDER] for r in rows] == ["dense", "unstructured90"]
    assert all(r[BEST_DENSE_MS] == 10.0 for r in rows)
