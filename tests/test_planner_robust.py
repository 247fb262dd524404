"""Planner decisions users can trust: interleaved rounds, robust statistics, hopeless candidates dropped,
surprises re-checked, spread recorded, one measurement per distinct layer."""
import dataclasses
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecore as sc
from sparsecore.backends import REGISTRY, Backend, BackendImpl
from sparsecore.backends.registry import backend_names, lookup


@pytest.fixture
def install(monkeypatch):
    """Fake contenders; the real CPU contenders (torch CSR, the native kernels) leave the registry so each test
    controls every candidate that can run on its CPU tensors."""
    backend_names()  # discovery first, so that nothing registers after the removal
    for key in [k for k in REGISTRY if str(k[1]) == "torch_csr" or str(k[1]).startswith("cpu_")]:
        monkeypatch.delitem(REGISTRY, key)

    def put(name, run):
        impl = BackendImpl(Backend(name), "linear", ("nm", "unstructured", "channel"), lambda p, x: None,
                           lambda p: p.to_dense(), run)
        for kind in impl.kinds:
            monkeypatch.setitem(REGISTRY, ("linear", name, kind), impl)

    def wrap_dense(run):
        impl = lookup("linear", "dense", "unstructured")
        key = next(k for k, v in REGISTRY.items() if v is impl and k[0] == "linear")
        monkeypatch.setitem(REGISTRY, key, dataclasses.replace(impl, run=run))
    put.wrap_dense = wrap_dense
    return put


def _model(g, n_layers=1, k=64):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
    mods = [nn.Linear(k, k) for _ in range(n_layers)]
    return sc.sparsify(nn.Sequential(*mods), sc.SparsityConfig("unstructured", 0.9))


def test_a_noise_burst_during_dense_timing_does_not_send_a_layer_sparse(install, tmp_path, seeded):
    # Whatever runs during the first 0.2 s of measurement is slowed by 2 ms (another process hogging the
    # core). Timing dense first and alone would see only slow dense samples and pick the equally fast
    # fake; interleaved rounds see the burst hit both.
    window = {"until": None}

    def noisy():
        now = time.perf_counter()
        if window["until"] is None:
            window["until"] = now + 0.2
        if now < window["until"]:
            time.sleep(0.002)

    def dense_run(w, x, b):
        noisy()
        return F.linear(x, w, b)

    def same_speed(w, x, b):
        noisy()
        return F.linear(x, w, b)

    install.wrap_dense(dense_run)
    install("cutlass", same_speed)
    model = _model(seeded)
    [entry] = sc.plan(model, (torch.randn(4, 64, generator=seeded),), use_cache=False, budget_s=0.3)
    assert entry.chosen == "dense", entry
    assert entry.speedup["cutlass"] < 1.5 and entry.spread["cutlass"][0] <= entry.speedup["cutlass"] * 1.5


def test_a_clearly_faster_backend_wins_after_a_recheck_with_its_spread(install, tmp_path, seeded):
    model = _model(seeded, k=256)
    x = torch.randn(8, 256, generator=seeded)
    with torch.no_grad():
        y = model[0](x)

    def dense_run(w, xx, b):
        time.sleep(0.001)  # dense costs >= 1 ms; the fake below returns at once
        return F.linear(xx, w, b)

    install.wrap_dense(dense_run)
    install("cutlass", lambda w, xx, b: y)
    [entry] = sc.plan(model, (x,), use_cache=False)
    assert entry.chosen == "cutlass"
    assert "confirmed" in entry.rechecked and "not confirmed" not in entry.rechecked
    lo, hi = entry.spread["cutlass"]
    assert 1.0 < lo <= hi and entry.speedup["cutlass"] > 1.05
    row = sc.last_report(model).layer("0")
    assert row.plans[8].backend == "cutlass" and row.plans[8].spread == (lo, hi)
    assert "[" in row.speed_text()


def test_hopeless_candidates_are_dropped_after_the_quick_round(install, seeded):
    calls = {"n": 0}

    def slow(w, x, b):  # 30 dense calls: hopeless however loaded the machine is
        calls["n"] += 1
        for _ in range(29):
            F.linear(x, w, b)
        time.sleep(0.002)
        return F.linear(x, w, b)

    install("cutlass", slow)
    model = _model(seeded)
    [entry] = sc.plan(model, (torch.randn(2, 64, generator=seeded),), use_cache=False)
    assert entry.chosen == "dense" and "cutlass" in entry.dropped
    assert calls["n"] == 1 + 1 + 3  # correctness check, warm-up, quick round: never the main rounds
    assert "cutlass" not in entry.speedup and entry.times_ms["cutlass"] > entry.times_ms["dense"]


def test_layers_of_one_key_are_measured_once_per_run(install, seeded):
    calls = {"n": 0}

    def counted(w, x, b):
        calls["n"] += 1
        return F.linear(x, w, b)

    install("cutlass", counted)
    model = _model(seeded, n_layers=3)
    entries = sc.plan(model, (torch.randn(2, 64, generator=seeded),), use_cache=False)
    assert [e.cached for e in entries] == [False, True, True]
    assert len({e.chosen for e in entries}) == 1
    first = calls["n"]
    assert first > 0
    assert all(m.plan == {2: Backend(entries[0].chosen)} for m in model)
