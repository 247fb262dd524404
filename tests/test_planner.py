"""The planner: picks the fastest correct backend, never a slower or wrong one; caches decisions."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecore as sc
from sparsecore.backends import REGISTRY, Backend, BackendImpl
from sparsecore.backends.registry import backend_names


def _fake(backend: Backend, run) -> BackendImpl:
    return BackendImpl(backend, "linear", ("nm", "unstructured", "channel"), lambda p, x: None,
                       lambda p: p.to_dense(), run)


@pytest.fixture
def fake_backends(monkeypatch):
    """Install fake candidates under enum values that have no CPU implementation."""
    def install(**runs):
        for name, run in runs.items():
            impl = _fake(Backend(name), run)
            for kind in impl.kinds:
                monkeypatch.setitem(REGISTRY, ("linear", Backend(name), kind), impl)
    return install


def _model(seed_gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=seed_gen)))
    return sc.sparsify(nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16)), sc.SparsityConfig("unstructured", 0.9))


def _without_native_cpu(monkeypatch) -> None:
    """The timer tables list the backends a test is about; the native CPU ones (real candidates on these
    CPU tensors) are taken out of the registry for the test."""
    backend_names()  # discovery first, so that nothing registers after the removal
    for key in [k for k in REGISTRY if str(k[1]).startswith("cpu_")]:
        monkeypatch.delitem(REGISTRY, key)


@pytest.fixture
def fake_timers(monkeypatch):
    """Each backend's measured time comes from a table, keyed by which backend the timed function runs:
    the planner's choice is tested without a clock, so a busy machine cannot change it."""
    from sparsecore import planner

    table: dict[str, float] = {}
    current = {"name": None}
    orig = sc.SparseLinear.run_backend
    _without_native_cpu(monkeypatch)

    def run(self, impl, x):
        current["name"] = impl.backend.value
        return orig(self, impl, x)

    def timed(fn, device, rep=20):
        fn()
        return table[current["name"]]

    def samples(fns, *, warmup=1, rounds=10):  # the planner's interleaved CPU sampler, clockless
        out = {}
        for name, fn in fns.items():
            fn()
            out[name] = [table[name]] * rounds
        return out

    monkeypatch.setattr(planner, "time_ms", timed)
    monkeypatch.setattr(planner, "interleaved_samples_ms", samples)
    monkeypatch.setattr(sc.SparseLinear, "run_backend", run)
    return table


def test_slow_and_wrong_backends_never_chosen(fake_backends, fake_timers, tmp_path, seeded):
    fake_backends(cutlass=lambda w, x, b: F.linear(x, w, b), cusparselt=lambda w, x, b: F.linear(x, w, b) + 1.0)
    fake_timers.update(dense=1.0, torch_csr=2.0, cutlass=3.0, cusparselt=0.1)  # the wrong one is the fastest
    model = _model(seeded)
    decisions = sc.plan(model, (torch.randn(4, 64, generator=seeded),), cache_path=tmp_path / "p.json", rep=5)
    assert len(decisions) == 2
    for d in decisions:
        assert d.chosen == "dense"
        assert d.times_ms == {"dense": 1.0, "torch_csr": 2.0, "cutlass": 3.0}
        assert "differs from dense" in d.rejected["cusparselt"]


def test_faster_backend_chosen_and_cached(fake_backends, fake_timers, tmp_path, seeded):
    model = _model(seeded)
    x = torch.randn(2, 64, generator=seeded)
    fake_backends(cutlass=lambda w, xx, b: F.linear(xx, w, b) * 1.0)
    fake_timers.update(dense=1.0, torch_csr=2.0, cutlass=0.5)
    path = tmp_path / "p.json"
    first = sc.plan(model, (x,), cache_path=path, rep=5)
    assert [d.chosen for d in first] == ["cutlass", "cutlass"] and model[0].plan == {2: Backend.CUTLASS}
    fake_timers.clear()  # a cached decision is not re-timed (a lookup would raise KeyError)
    again = sc.plan(model, (x,), cache_path=path)
    assert all(d.cached and d.chosen == "cutlass" for d in again)
    assert again[0].times_ms == first[0].times_ms


@pytest.mark.parametrize("trial", range(8))
def test_choice_is_dense_unless_a_backend_beats_it_by_the_margin(fake_backends, fake_timers, tmp_path, seeded, trial):
    # The planner's promise (never slower than dense) as a rule over random timings, margin boundary included.
    fake_backends(cutlass=lambda w, x, b: F.linear(x, w, b))
    times = (0.5 + torch.rand(3, generator=seeded, dtype=torch.float64)).tolist()
    if trial % 4 == 0:
        times[2] = 0.95 * times[0]  # exactly at the 5% margin: dense keeps it
    fake_timers.update(dense=times[0], torch_csr=times[1], cutlass=times[2])
    model = _model(seeded)
    (d, _) = sc.plan(model, (torch.randn(1, 64, generator=seeded),), cache_path=tmp_path / "p.json", margin=0.05)
    best = min(d.times_ms, key=d.times_ms.get)
    expect = best if d.times_ms[best] < 0.95 * d.times_ms["dense"] else "dense"
    assert d.chosen == expect and d.times_ms[d.chosen] <= d.times_ms["dense"]


def test_cached_plan_does_not_rebuild_the_dense_weight(tmp_path, seeded, monkeypatch):
    from sparsecore.formats import UnstructuredWeight

    model = _model(seeded)
    x = torch.randn(2, 64, generator=seeded)
    sc.plan(model, (x,), cache_path=tmp_path / "p.json", rep=3)  # the planned backends' state is prepared now

    # The cache key (shape, dtype, kept count) must come from the packed form, not a rebuilt dense weight. Moving
    # a layer between its held forms (one copy per layer) may decode; the key computation may not.
    from sparsecore import planner

    in_key = []
    real_to_dense, real_key = UnstructuredWeight.to_dense, planner._layer_key

    def no_dense(self):
        if in_key:
            raise AssertionError("to_dense() called while computing a plan's cache key")
        return real_to_dense(self)

    def key(*args):
        in_key.append(True)
        try:
            return real_key(*args)
        finally:
            in_key.pop()

    monkeypatch.setattr(UnstructuredWeight, "to_dense", no_dense)
    monkeypatch.setattr(planner, "_layer_key", key)
    again = sc.plan(model, (x,), cache_path=tmp_path / "p.json", rep=3)
    assert all(d.cached for d in again)


def test_nonzeros_counts_the_dense_weight_without_building_it(seeded):
    for config in (sc.SparsityConfig("unstructured", 0.6), sc.SparsityConfig("nm", n=2, m=4),
                   sc.SparsityConfig("channel", 0.5)):
        w = torch.randn(12, 16, generator=seeded)
        mask = torch.rand(12, 16, generator=seeded) < 0.5
        mask = sc.magnitude_masks(nn.Linear(16, 12), config)[""] if config.pattern != "unstructured" else mask
        w[mask & (torch.rand(12, 16, generator=seeded) < 0.2)] = 0.0  # kept zeros do not count
        packed = sc.pack(w, mask, config)
        assert packed.nonzeros == int(torch.count_nonzero(packed.to_dense())), config.pattern


def test_plan_rejects_bad_arguments():
    with pytest.raises(TypeError, match="tuple"):
        sc.plan(nn.Linear(2, 2), torch.zeros(1, 2))
    assert sc.plan(nn.Linear(2, 2), (torch.zeros(1, 2),)) == []


@pytest.fixture
def fake_cuda_timers(monkeypatch):
    """The planner's CUDA branch on CPU: ``_on_cuda`` says yes and each backend's (GPU, host) times come
    from a table, keyed by which backend the timed function runs."""
    from sparsecore import planner

    table: dict[str, tuple[float, float]] = {}
    current = {"name": None}
    _without_native_cpu(monkeypatch)

    def run_backend_spy(orig):
        def run(self, impl, x):
            current["name"] = impl.backend.value
            return orig(self, impl, x)
        return run

    def gpu(fn, device, rep=20):
        fn()
        return table[current["name"]][0]

    def host(fn, device, rep=20):
        fn()
        return table[current["name"]][1]

    monkeypatch.setattr(planner, "_on_cuda", lambda x: True)
    monkeypatch.setattr(planner, "time_ms", gpu)
    monkeypatch.setattr(planner, "host_ms", host)
    monkeypatch.setattr(sc.SparseLinear, "run_backend", run_backend_spy(sc.SparseLinear.run_backend))
    return table


def test_eager_plan_counts_launch_cost_and_graph_plan_does_not(fake_backends, fake_cuda_timers, tmp_path, seeded):
    # A kernel twice as fast as dense on the GPU, but slower to launch than dense runs: eagerly a layer costs
    # max(GPU, host), so dense must win; under CUDA graphs only GPU time counts, so the kernel must win.
    fake_backends(cutlass=lambda w, x, b: F.linear(x, w, b))
    fake_cuda_timers.update(dense=(1.0, 0.2), cutlass=(0.5, 1.5), torch_csr=(5.0, 0.1))
    model = _model(seeded)
    x = torch.randn(1, 64, generator=seeded)
    path = tmp_path / "p.json"

    eager = sc.plan(model, (x,), cache_path=path)
    assert [d.chosen for d in eager] == ["dense", "dense"]
    assert eager[0].times_ms["cutlass"] == 1.5 and eager[0].times_ms["dense"] == 1.0
    assert eager[0].gpu_ms["cutlass"] == 0.5 and eager[0].host_ms["cutlass"] == 1.5

    graphs = sc.plan(model, (x,), cache_path=path, cuda_graphs=True)
    assert [d.chosen for d in graphs] == ["cutlass", "cutlass"]
    assert not any(d.cached for d in graphs)  # the eager decisions are cached under another key
    assert graphs[0].times_ms["cutlass"] == 0.5 and graphs[0].host_ms == {}
    assert model[0].plan == {1: Backend.CUTLASS}

    again = sc.plan(model, (x,), cache_path=path)
    assert all(d.cached and d.chosen == "dense" for d in again)
    assert again[0].host_ms["cutlass"] == 1.5


def test_corrupt_cached_times_are_dropped_not_raised(tmp_path, seeded):
    import json

    model = _model(seeded)
    x = torch.randn(2, 64, generator=seeded)
    path = tmp_path / "p.json"
    sc.plan(model, (x,), cache_path=path, rep=3)
    data = json.loads(path.read_text())
    for v in data.values():
        v["times_ms"], v["host_ms"] = [1, 2], {"dense": "fast", "torch_csr": 0.5}
    path.write_text(json.dumps(data))
    again = sc.plan(model, (x,), cache_path=path, rep=3)
    assert all(d.cached for d in again)
    assert again[0].times_ms == {} and again[0].host_ms == {"torch_csr": 0.5}
