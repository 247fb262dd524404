"""The planner: picks the fastest correct backend, never a slower or wrong one; caches decisions."""
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecore as sc
from sparsecore.backends import REGISTRY, Backend, BackendImpl
from sparsecore.timing import time_interleaved_ms


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


def test_slow_and_wrong_backends_never_chosen(fake_backends, tmp_path, seeded):
    def slow(w, x, b):
        time.sleep(0.03)  # far above any dense time, even on a loaded machine
        return F.linear(x, w, b)

    def wrong(w, x, b):
        return F.linear(x, w, b) + 1.0

    fake_backends(cutlass=slow, cusparselt=wrong)
    model = _model(seeded)
    decisions = sc.plan(model, (torch.randn(4, 64, generator=seeded),), cache_path=tmp_path / "p.json", rep=5)
    assert len(decisions) == 2
    for d in decisions:
        assert d.chosen != "cutlass" and d.chosen != "cusparselt"
        assert d.times_ms["cutlass"] > d.times_ms["dense"]
        assert "differs from dense" in d.rejected["cusparselt"]
        assert d.chosen == "dense" or d.times_ms[d.chosen] < 0.95 * d.times_ms["dense"]


def test_faster_backend_chosen_and_cached(fake_backends, tmp_path, seeded):
    model = _model(seeded)
    x = torch.randn(2, 64, generator=seeded)
    with torch.no_grad():
        y1 = model[0](x)

    def instant(w, xx, b):  # correct for the one input the planner times layer 0 on, and instant
        return y1 if xx.shape == x.shape and xx.shape[1] == 64 else F.linear(xx, w, b)

    fake_backends(cutlass=instant)
    path = tmp_path / "p.json"
    first = sc.plan(model, (x,), cache_path=path, rep=5)
    assert first[0].chosen == "cutlass" and model[0].plan == {2: Backend.CUTLASS}
    with torch.no_grad():
        assert torch.equal(model(x), model[2](F.relu(y1)))
    again = sc.plan(model, (x,), cache_path=path)
    assert again[0].cached and again[0].chosen == "cutlass"
    assert path.exists()


def test_planned_model_not_slower_than_dense(tmp_path, seeded):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024))
    sparse = sc.sparsify(nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024)),
                         sc.SparsityConfig("unstructured", 0.95))
    x = torch.randn(1, 1024, generator=seeded)
    sc.plan(sparse, (x,), cache_path=tmp_path / "p.json", rep=10)
    with torch.no_grad():
        rounds = [time_interleaved_ms({"dense": lambda: dense(x), "sparse": lambda: sparse(x)}, "cpu", rep=15)
                  for _ in range(3)]  # interleaved: a load spike hits both alike
        t_dense, t_sparse = (min(r[k] for r in rounds) for k in ("dense", "sparse"))
    # dense wins ties, sparse must win clearly; allow measurement noise on a shared 2-core machine
    assert t_sparse <= 1.3 * t_dense, (t_sparse, t_dense)


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

    def run_backend_spy(orig):
        def run(self, impl, x):
            current["name"] = impl.backend.value
            return orig(self, impl, x)
        return run

    slow = (1e6, 1e6)  # backends the table leaves out (e.g. the native CPU ones) never win

    def gpu(fn, device, rep=20):
        fn()
        return table.get(current["name"], slow)[0]

    def host(fn, device, rep=20):
        fn()
        return table.get(current["name"], slow)[1]

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
