"""The native CPU backends (sparsecore/backends/cpu_sparse.py) inside modules, autograd and the planner,
and how they report a missing compiler or a failed build."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close_to_ref, nonzero_randn
from sparsecore.backends import BackendUnavailable, candidates, resolve
from sparsecore.backends.registry import compiler_why_not
from sparsecore.formats.nm import NMWeight
from sparsecore.formats.unstructured import UnstructuredWeight
from sparsecore.modules import SparseLinear
from sparsecore.planner import plan

cpu = pytest.importorskip("sparsecore.kernels.cpu")
CPU_BACKENDS = ("cpu_bitmap", "cpu_columns", "cpu_nm")


@pytest.fixture(scope="session")
def built() -> None:
    reason = compiler_why_not(torch.empty(0))
    if reason is not None:
        pytest.skip(reason)
    assert cpu.why_unavailable() is None, cpu.why_unavailable()


def _packed(backend: str, n: int, k: int, dtype: torch.dtype, g: torch.Generator):
    w = nonzero_randn(n, k, dtype=dtype, generator=g)
    if backend == "cpu_nm":
        scores = torch.rand(n, k // 4, 4, generator=g)
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(2, -1).indices, True)
        return NMWeight.from_dense(w, keep.reshape(n, k), n=2, m=4)
    return UnstructuredWeight.from_dense(w, torch.rand(n, k, generator=g) >= 0.7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forced_backend_forward_and_input_gradients(built, backend, dtype, seeded):
    p = _packed(backend, 45, 132, dtype, seeded)
    bias = torch.randn(45, generator=seeded).to(dtype)
    mod = SparseLinear(p, bias, backend=backend)
    x = torch.randn(2, 3, 132, generator=seeded).to(dtype).requires_grad_()
    y = mod(x)
    w = p.to_dense()
    assert_close_to_ref(y, F.linear(x.detach().double(), w.double(), bias.double()), 132)
    (state,) = mod.prepared_states()  # the layout only: no dense copy of the weight is kept
    tensors = [t for part in state for t in (vars(part).values() if hasattr(part, "__dataclass_fields__") else [part])
               if isinstance(t, torch.Tensor)]
    assert tensors and max(t.numel() for t in tensors) < 45 * 132 * 0.6
    grad = torch.randn(y.shape, generator=seeded).to(dtype)
    y.backward(grad)
    assert_close_to_ref(x.grad, grad.double() @ w.double(), 45)
    assert_close_to_ref(mod.bias.grad, grad.double().sum((0, 1)), 6)


def test_isa_forced_by_environment(built, monkeypatch, seeded):
    p = _packed("cpu_bitmap", 20, 70, torch.float32, seeded)
    x = torch.randn(3, 70, generator=seeded)
    for isa in cpu.available_isas():
        monkeypatch.setenv("SPARSECORE_CPU_ISA", isa)
        mod = SparseLinear(p, None, backend="cpu_bitmap")
        assert_close_to_ref(mod(x), x.double() @ p.to_dense().double().t(), 70)
        (state,) = mod.prepared_states()
        assert state[2] == isa  # (kernel, layout, isa, bitmap layout)
    monkeypatch.setenv("SPARSECORE_CPU_ISA", "mmx")
    with pytest.raises(BackendUnavailable, match="SPARSECORE_CPU_ISA must be one of"):
        SparseLinear(p, None, backend="cpu_bitmap")(x)


def test_planner_times_the_cpu_backends(built, seeded):
    model = torch.nn.Sequential()
    model.add_module("u", SparseLinear(_packed("cpu_bitmap", 64, 256, torch.float32, seeded), None))
    model.add_module("nm", SparseLinear(_packed("cpu_nm", 32, 64, torch.float32, seeded), None))
    entries = {e.fqn: e for e in plan(model, (torch.randn(4, 256, generator=seeded),), use_cache=False, rep=3)}
    assert {"cpu_bitmap", "cpu_columns", "dense"} <= set(entries["u"].times_ms), entries["u"]
    assert {"cpu_nm", "dense"} <= set(entries["nm"].times_ms), entries["nm"]
    assert not entries["u"].rejected and not entries["nm"].rejected


def test_compiled_module_with_forced_backend(built, seeded):
    p = _packed("cpu_bitmap", 33, 90, torch.float32, seeded)
    mod = SparseLinear(p, torch.randn(33, generator=seeded), backend="cpu_bitmap")
    x = torch.randn(4, 90, generator=seeded)
    torch._dynamo.reset()
    with torch.no_grad():
        mod(x)  # the first eager call resolves and prepares the backend; compile after it (as tests/test_compile.py)
        y = torch.compile(mod, fullgraph=True, backend="aot_eager")(x)
    assert_close_to_ref(y, F.linear(x.double(), p.to_dense().double(), mod.bias.detach().double()), 90)


def test_failed_build_is_reported_not_raised(monkeypatch, seeded):
    def broken() -> None:
        raise RuntimeError("Error building extension: simulated compiler failure")

    monkeypatch.setattr(cpu, "_build", broken)
    monkeypatch.setattr(cpu, "_state", {})
    p = _packed("cpu_bitmap", 16, 64, torch.float32, seeded)
    x = torch.randn(2, 64, generator=seeded)
    assert "simulated compiler failure" in cpu.why_unavailable()
    names = {impl.name for impl in candidates("linear", p, x)}
    assert "dense" in names and not names & set(CPU_BACKENDS)
    with pytest.raises(BackendUnavailable, match="simulated compiler failure"):
        SparseLinear(p, None, backend="cpu_columns")(x)
    with pytest.raises(cpu.CpuKernelsUnavailable, match="could not be built"):
        cpu.bitmap_layout(p.bitmap, p.values, p.tile_offsets, p.n, p.k)


def test_missing_compiler_is_reported(monkeypatch, seeded):
    monkeypatch.setenv("CXX", "no-such-compiler-sparsecore")
    p = _packed("cpu_nm", 8, 32, torch.float32, seeded)
    with pytest.raises(BackendUnavailable, match="no-such-compiler-sparsecore"):
        SparseLinear(p, None, backend="cpu_nm")(torch.randn(1, 32))


def test_why_not_reasons(built, seeded):
    p = _packed("cpu_bitmap", 16, 64, torch.float32, seeded)
    with pytest.raises(BackendUnavailable, match=r"\[M, 64\]"):
        resolve("linear", "cpu_bitmap", p, torch.randn(2, 63))
    with pytest.raises(BackendUnavailable, match="CPU tensor"):
        resolve("linear", "cpu_columns", p, torch.randn(2, 64, device="meta"))


def test_a_dead_build_lock_is_cleared_and_a_live_one_kept(tmp_path):
    import os
    import time

    from sparsecore.kernels.cpu import _extension

    dead, live = tmp_path / "dead", tmp_path / "live"
    dead.write_text("")
    live.write_text("")
    old = time.time() - _extension.STALE_LOCK_S - 60
    os.utime(dead, (old, old))
    _extension.clear_stale_lock(dead)
    _extension.clear_stale_lock(live)
    _extension.clear_stale_lock(tmp_path / "absent")
    assert not dead.exists() and live.exists()
