"""A compiled sparse model follows every change of what its graph was traced with: another plan, a forced
backend, a batch in another bucket, a layer switching representation (dense-, packed- or state-held), another
dtype. After each change the compiled model's output equals the float64 masked model, and a spy backend for
torch.compile shows that the graph which ran holds the new backend's op (no stale graph was reused).

Also: the guards a sparse layer adds are C++ checks (no Python lambda per layer and call, no walk over every
key of the resolved-backend cache), which is what keeps a compiled sparse model's per-call guard time near
the dense model's.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecore as sc
from helpers import assert_close_to_ref
from sparsecore.modules import SparseLinear

K_IN, K_MID, K_OUT = 48, 40, 9
# What a graph calls for each backend (Dynamo's FX graph, before lowering).
_OPS = {"dense": "built-in function linear", "torch_csr": "sparsecore.csr_linear",
        "cpu_columns": "sparsecore.cpu_columns_linear"}


def _cpu_kernels() -> bool:
    from sparsecore.backends.registry import compiler_why_not

    if compiler_why_not(torch.empty(0)) is not None:
        return False
    from sparsecore.kernels import cpu

    return cpu.why_unavailable() is None


class _Spy:
    """A torch.compile backend that runs Dynamo's graph as it is and counts, per call, the backends whose ops
    the graph that ran holds."""

    def __init__(self) -> None:
        self.ran: list[frozenset[str]] = []
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        targets = " ".join(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        backends = frozenset(name for name, op in _OPS.items() if op in targets)

        def run(*args):
            self.ran.append(backends)
            return gm.forward(*args)

        return run

    def last(self) -> frozenset[str]:
        return self.ran[-1]


def _model(seeded) -> tuple[nn.Module, dict, list[SparseLinear]]:
    """(two sparse linears with a ReLU between, their float64 masked weights and biases, the sparse layers)."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=seeded)))
    model = nn.Sequential(nn.Linear(K_IN, K_MID), nn.ReLU(), nn.Linear(K_MID, K_OUT)).eval()
    config = sc.SparsityConfig("unstructured", 0.8)
    masks = sc.magnitude_masks(model, config)
    ref = {f: (torch.where(masks[f], model.get_submodule(f).weight, 0), model.get_submodule(f).bias) for f in masks}
    sc.sparsify(model, config, masks=masks)
    return model, ref, [m for m in model.modules() if isinstance(m, SparseLinear)]


def _ref(ref: dict, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The masked model in float64 on weights rounded to ``dtype`` (the module's own weights)."""
    (w0, b0), (w2, b2) = ((w.to(dtype).double(), b.to(dtype).double()) for w, b in (ref["0"], ref["2"]))
    return F.linear(F.relu(F.linear(x.double(), w0, b0)), w2, b2)


def _check(compiled, ref: dict, x: torch.Tensor, spy: _Spy, backend: str, dtype=torch.float32) -> None:
    with torch.no_grad():
        out = compiled(x)
    assert_close_to_ref(out, _ref(ref, x, dtype), k=K_IN)
    assert spy.last() == {backend}, f"the graph that ran holds {set(spy.last())}, expected {backend}"


def _sparse_backend() -> str:
    return "cpu_columns" if _cpu_kernels() else "torch_csr"


def test_new_plan_and_representation_recompile(seeded):
    """dense-held -> packed-held (torch_csr) -> state-held (cpu_columns, where the C++ kernels build) -> back."""
    model, ref, layers = _model(seeded)
    torch._dynamo.reset()
    spy = _Spy()
    compiled = torch.compile(model, backend=spy, fullgraph=True)
    x = torch.randn(3, K_IN, generator=seeded)  # 3 rows: bucket 4
    steps = [("dense", "dense_held"), ("torch_csr", None)]
    if _cpu_kernels():
        steps.append(("cpu_columns", "state_held"))
    steps.append(("dense", "dense_held"))
    for backend, held in steps:
        for layer in layers:
            layer.load_plan({4: backend})
            assert layer.dense_held == (held == "dense_held") and layer.state_held == (held == "state_held")
        _check(compiled, ref, x, spy, backend)
        _check(compiled, ref, torch.randn(4, K_IN, generator=seeded), spy, backend)  # same bucket, same graph
    assert spy.graphs <= len(steps) * 2  # at most one static and one dynamic-batch graph per step


def test_forced_backend_recompiles_and_auto_returns_to_the_plan(seeded):
    model, ref, layers = _model(seeded)
    planned = _sparse_backend()
    for layer in layers:
        layer.load_plan({4: planned})
    torch._dynamo.reset()
    spy = _Spy()
    compiled = torch.compile(model, backend=spy)  # forcing resolves on the next call: a graph break there
    x = torch.randn(3, K_IN, generator=seeded)
    _check(compiled, ref, x, spy, planned)
    for layer in layers:
        layer.backend = "dense"
    with torch.no_grad():
        assert_close_to_ref(compiled(x), _ref(ref, x), k=K_IN)  # resolves the forced backend (eagerly)
    _check(compiled, ref, x, spy, "dense")  # then one graph runs it
    for layer in layers:
        layer.backend = "auto"
    _check(compiled, ref, x, spy, planned)


def test_batch_in_another_bucket_runs_that_buckets_backend(seeded):
    model, ref, layers = _model(seeded)
    sparse = _sparse_backend()
    for layer in layers:
        layer.load_plan({4: sparse, 16: "dense"})  # dense- and state/packed-held at once
    torch._dynamo.reset()
    spy = _Spy()
    compiled = torch.compile(model, backend=spy, fullgraph=True)
    for rows, backend in ((3, sparse), (12, "dense"), (4, sparse), (9, "dense"), (3, sparse)):
        _check(compiled, ref, torch.randn(rows, K_IN, generator=seeded), spy, backend)
    x = torch.randn(40, K_IN, generator=seeded)  # bucket 64 is in no plan: it runs dense ...
    _check(compiled, ref, x, spy, "dense")
    for layer in layers:  # ... until a plan names it: the graph traced while it was missing must not run again
        layer.set_plan(64, sparse)
    _check(compiled, ref, x, spy, sparse)


def test_dtype_change_recompiles_on_the_converted_weights(seeded):
    model, ref, layers = _model(seeded)
    for layer in layers:
        layer.load_plan({4: "torch_csr"})
    torch._dynamo.reset()
    spy = _Spy()
    compiled = torch.compile(model, backend=spy)
    x = torch.randn(3, K_IN, generator=seeded)
    _check(compiled, ref, x, spy, "torch_csr")
    model.to(torch.bfloat16)  # timings were for float32: the plan is dropped, the layers run dense
    xb = x.to(torch.bfloat16)
    with torch.no_grad():
        assert_close_to_ref(compiled(xb), _ref(ref, xb, torch.bfloat16), k=K_IN)
    _check(compiled, ref, xb, spy, "dense", torch.bfloat16)
    if _cpu_kernels():  # a sparse backend that runs bfloat16 on CPU (torch CSR there is float32 only)
        for layer in layers:
            layer.load_plan({4: "cpu_columns"})
        _check(compiled, ref, xb, spy, "cpu_columns", torch.bfloat16)


class _Outer(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_sparse_layer_guards_are_cpp_checks(seeded):
    """No Python lambda guard and no walk over all keys of ``_resolved`` per sparse layer: both made a compiled
    sparse model's per-call guard time several times the dense model's."""
    model, _, layers = _model(seeded)
    for layer in layers:
        layer.load_plan({4: _sparse_backend()})
    torch._dynamo.reset()
    outer = _Outer(model)  # a frame of its own (a compiled nn.Sequential runs in a wrapper shared by all)
    with torch.no_grad():
        torch.compile(outer, backend="eager", fullgraph=True)(torch.randn(3, K_IN, generator=seeded))
    entries = torch._dynamo.eval_frame._debug_get_cache_entry_list(_Outer.forward)
    assert len(entries) == 1
    text = str(entries[0].guard_manager)
    layer_lines = [line for line in text.splitlines() if "_modules['0']" in line or "_modules['2']" in line]
    assert any("_resolved" in line for line in layer_lines)  # the guards were found where expected
    lambdas = [line for line in layer_lines if "LAMBDA_GUARD" in line]
    assert not lambdas, lambdas
    walks = [line for line in layer_lines if "dict.keys(" in line and "_resolved" in line]
    assert not walks, walks
