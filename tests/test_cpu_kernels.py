"""Native CPU kernels (kernels/cpu): every ISA path this CPU runs against float64 references.

The extension is built once per session (cached across sessions by torch's extension cache). Without a
C++ compiler these tests skip with that reason; with one, a failed build fails them.
"""
from __future__ import annotations

import pytest
import torch

from helpers import assert_close_to_ref, nonzero_randn
from sparsecore.backends.registry import compiler_why_not
from sparsecore.formats.nm import NMWeight
from sparsecore.formats.unstructured import UnstructuredWeight

cpu = pytest.importorskip("sparsecore.kernels.cpu")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(scope="session")
def isas() -> tuple[str, ...]:
    reason = compiler_why_not(torch.empty(0))
    if reason is not None:
        pytest.skip(reason)
    reason = cpu.why_unavailable()
    assert reason is None, reason
    return cpu.available_isas()


@pytest.fixture(params=cpu.ISAS)
def isa(request, isas) -> str:
    if request.param not in isas:
        pytest.skip(f"this CPU cannot run the {request.param} path (it runs {isas})")
    return request.param


def _unstructured(n: int, k: int, sparsity: float, dtype: torch.dtype, g: torch.Generator) -> UnstructuredWeight:
    w = nonzero_randn(n, k, dtype=dtype, generator=g)
    mask = torch.rand(n, k, generator=g) >= sparsity
    return UnstructuredWeight.from_dense(w, mask)


def _nm(n_out: int, k: int, n: int, m: int, dtype: torch.dtype, g: torch.Generator) -> NMWeight:
    w = nonzero_randn(n_out, k, dtype=dtype, generator=g)
    scores = torch.rand(n_out, k // m, m, generator=g)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(n, -1).indices, True)
    return NMWeight.from_dense(w, keep.reshape(n_out, k), n=n, m=m)


def _x(m: int, k: int, dtype: torch.dtype, g: torch.Generator, strided: bool) -> torch.Tensor:
    if strided:  # every other column of a wider tensor: non-unit stride along K
        return torch.randn(m, 2 * k, generator=g).to(dtype)[:, ::2]
    return torch.randn(m, k, generator=g).to(dtype)


def _ref(x: torch.Tensor, dense: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ dense.double().t()
    return y + bias.double() if bias is not None else y


UNSTRUCTURED_CASES = [  # (N, K, M, sparsity): K not a multiple of 8/16/32/64, odd N, M across 1..17, and
    # M > 17 for the tiled AVX-512 path: 3 vectors per tile (40), one full tile (128), and two partial tiles
    # narrowed by a long K (130 x 3000), with output groups of fewer than 16 features; K swept in several panels
    # (3000 at M = 130, 2100 at M = 64 and 48), dense and half-kept
    (37, 203, 1, 0.5), (64, 300, 3, 0.9), (5, 64, 17, 0.0), (33, 1000, 1, 1.0), (130, 517, 16, 0.7),
    (9, 129, 2, 0.97), (70, 1100, 1, 0.95), (37, 203, 40, 0.5), (50, 96, 128, 0.3), (21, 3000, 130, 0.9),
    (40, 2100, 64, 0.0), (19, 2100, 48, 0.6),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["bitmap", "columns"])
def test_unstructured_linear_matches_float64(isa, dtype, layout, seeded, poisoned):
    for i, (n, k, m, s) in enumerate(UNSTRUCTURED_CASES):
        p = _unstructured(n, k, s, dtype, seeded)
        build, run = ((cpu.bitmap_layout, cpu.bitmap_linear) if layout == "bitmap"
                      else (cpu.column_layout, cpu.columns_linear))
        lay = build(p.bitmap, p.values, p.tile_offsets, p.n, p.k)
        x = _x(m, k, dtype, seeded, strided=i % 2 == 1)
        bias = torch.randn(n, generator=seeded).to(dtype) if i % 3 else None
        y = run(x, lay, bias, isa=isa)
        assert y.dtype == dtype and y.shape == (m, n)
        assert_close_to_ref(y, _ref(x, p.to_dense(), bias), k)


NM_CASES = [  # (N, K, M, n, m): slots per row not a multiple of 8/16, M across 1..17
    (37, 204, 1, 2, 4), (64, 40, 3, 2, 4), (9, 72, 1, 1, 4), (9, 76, 5, 3, 4), (11, 88, 1, 4, 8),
    (11, 88, 17, 5, 8), (7, 1028, 1, 2, 4), (13, 64, 16, 2, 8), (6, 48, 1, 7, 8), (19, 96, 40, 2, 4),
    (9, 3000, 130, 2, 4), (7, 64, 70, 5, 8), (10, 2104, 64, 5, 8),
]


@pytest.mark.parametrize("dtype", DTYPES)
def test_nm_linear_matches_float64(isa, dtype, seeded, poisoned):
    for i, (n_out, k, m_rows, n, m) in enumerate(NM_CASES):
        p = _nm(n_out, k, n, m, dtype, seeded)
        x = _x(m_rows, k, dtype, seeded, strided=i % 2 == 0)
        bias = torch.randn(n_out, generator=seeded).to(dtype) if i % 2 else None
        y = cpu.nm_linear(x, p.values, p.positions, n, m, bias, isa=isa)
        assert y.dtype == dtype and y.shape == (m_rows, n_out)
        assert_close_to_ref(y, _ref(x, p.to_dense(), bias), k)


@pytest.mark.parametrize("m_rows", [1, 5, 16, 130])
def test_threads_do_not_change_results(isa, m_rows, seeded):
    """Rows are split over threads, and each row is summed in the same order whoever computes it."""
    p = _unstructured(203, 777, 0.6, torch.float32, seeded)
    lay = cpu.bitmap_layout(p.bitmap, p.values, p.tile_offsets, p.n, p.k)
    cols = cpu.column_layout(p.bitmap, p.values, p.tile_offsets, p.n, p.k)
    q = _nm(203, 776, 2, 4, torch.float32, seeded)
    x = torch.randn(m_rows, 777, generator=seeded)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append((cpu.bitmap_linear(x, lay, isa=isa), cpu.columns_linear(x, cols, isa=isa),
                         cpu.nm_linear(x[:, :776], q.values, q.positions, 2, 4, isa=isa)))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_pruned_columns_never_reach_the_output(isa, seeded):
    """Pruned weights are absent, not zeros that multiply: a NaN in x where every weight is pruned stays out."""
    n, k = 19, 150
    w = nonzero_randn(n, k, generator=seeded)
    mask = torch.rand(n, k, generator=seeded) >= 0.5
    mask[:, 7] = False
    p = UnstructuredWeight.from_dense(w, mask)
    x = torch.randn(3, k, generator=seeded)
    x_nan = x.clone()
    x_nan[:, 7] = float("nan")
    lay = cpu.bitmap_layout(p.bitmap, p.values, p.tile_offsets, p.n, p.k)
    cols = cpu.column_layout(p.bitmap, p.values, p.tile_offsets, p.n, p.k)
    for run, layout in ((cpu.bitmap_linear, lay), (cpu.columns_linear, cols)):
        for rows in (x_nan[:1], x_nan):
            y = run(rows, layout, isa=isa)
            assert_close_to_ref(y, _ref(x[: rows.shape[0]], p.to_dense(), None), k)
    for n_keep, m, k in ((2, 4, 148), (1, 4, 148), (3, 8, 152)):  # slots per row not a multiple of 8 or 16
        w = nonzero_randn(n, k, generator=seeded)
        scores = torch.rand(n, k // m, m, generator=seeded)
        scores[:, 7 // m, 7 % m] = -1.0  # column 7 pruned in every row
        scores[:, -1, -1] = -1.0         # and the last column (inside the tail chunk)
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(n_keep, -1).indices, True)
        q = NMWeight.from_dense(w, keep.reshape(n, k), n=n_keep, m=m)
        x = torch.randn(3, k, generator=seeded)
        x_nan = x.clone()
        x_nan[:, [7, k - 1]] = float("nan")
        for rows in (x_nan[:1], x_nan):
            y = cpu.nm_linear(rows, q.values, q.positions, n_keep, m, isa=isa)
            assert_close_to_ref(y, _ref(x[: rows.shape[0]], q.to_dense(), None), k)


def test_layouts_derived_exactly(isas, seeded):
    """The derived layouts hold the packed weight's mask and values exactly, and their refs agree."""
    p = _unstructured(45, 333, 0.7, torch.bfloat16, seeded)
    lay = cpu.bitmap_layout(p.bitmap, p.values, p.tile_offsets, p.n, p.k)
    shifts = torch.arange(64)
    bits = ((lay.words[..., None] >> shifts) & 1).bool().reshape(45, -1)
    assert torch.equal(bits[:, :333], p.mask()) and not bits[:, 333:].any()
    assert torch.equal(lay.values[: p.nnz], p.to_dense()[p.mask()])
    assert torch.equal(lay.row_ptr[1:] - lay.row_ptr[:-1], p.mask().sum(1))
    cols = cpu.column_layout(p.bitmap, p.values, p.tile_offsets, p.n, p.k)
    assert torch.equal(cols.cols[: p.nnz].long() & 0xFFFF, p.mask().nonzero()[:, 1])
    x = torch.randn(4, 333, generator=seeded).to(torch.bfloat16)
    ref = _ref(x, p.to_dense(), None)
    assert_close_to_ref(cpu.bitmap_linear_ref(x, lay), ref, 333)
    assert_close_to_ref(cpu.columns_linear_ref(x, cols), ref, 333)
    q = _nm(10, 64, 3, 8, torch.float32, seeded)
    assert_close_to_ref(cpu.nm_linear_ref(x[:, :64].float(), q.values, q.positions, 3, 8),
                        _ref(x[:, :64].float(), q.to_dense(), None), 64)


def test_bad_inputs_raise(isas):
    p = UnstructuredWeight.from_dense(torch.randn(8, 40), torch.rand(8, 40) > 0.5)
    lay = cpu.bitmap_layout(p.bitmap, p.values, p.tile_offsets, p.n, p.k)
    with pytest.raises(ValueError, match=r"\[M, 40\]"):
        cpu.bitmap_linear(torch.randn(2, 41), lay)
    with pytest.raises(ValueError, match="float32"):
        cpu.bitmap_linear(torch.randn(2, 40).double(), lay)
    with pytest.raises(ValueError, match="isa must be one of"):
        cpu.bitmap_linear(torch.randn(2, 40), lay, isa="sse9")
    with pytest.raises(ValueError, match="bias"):
        cpu.bitmap_linear(torch.randn(2, 40), lay, torch.randn(7))
    q = NMWeight.from_dense(torch.randn(4, 16), torch.tensor([1, 1, 0, 0]).bool().repeat(4, 4), n=2, m=4)
    with pytest.raises(ValueError, match="N:M"):
        cpu.nm_linear(torch.randn(1, 16), q.values, q.positions, 2, 5)


def test_custom_ops_trace_under_compile(isas, seeded):
    """The custom ops' fake implementations let torch.compile(fullgraph=True) trace through them."""
    p = _unstructured(24, 70, 0.6, torch.float32, seeded)
    lay = cpu.bitmap_layout(p.bitmap, p.values, p.tile_offsets, p.n, p.k)
    cols = cpu.column_layout(p.bitmap, p.values, p.tile_offsets, p.n, p.k)
    q = _nm(24, 72, 2, 4, torch.float32, seeded)
    bias = torch.randn(24, generator=seeded)

    def f(x):
        return (cpu.bitmap_linear(x[:, :70], lay, bias) + cpu.columns_linear(x[:, :70], cols)
                + cpu.nm_linear(x, q.values, q.positions, 2, 4)).relu()

    x = torch.randn(5, 72, generator=seeded)
    torch._dynamo.reset()
    y = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    ref = (_ref(x[:, :70], p.to_dense(), bias) + _ref(x[:, :70], p.to_dense(), None)
           + _ref(x, q.to_dense(), None)).relu()
    assert_close_to_ref(y, ref, 72)
    for op, args in ((torch.ops.sparsecore.cpu_bitmap_linear, (x[:, :70], lay.words, lay.values, lay.row_ptr, bias, 70, 0)),
                     (torch.ops.sparsecore.cpu_nm_linear, (x, q.values, q.positions, 2, 4, None, 0))):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_ops_refuse_backward_instead_of_a_silent_gradient(isas, seeded):
    """With autograd on, the launchers run the C++ operators, whose backward raises (the sparse modules
    differentiate through sparsecore.autograd instead)."""
    p = _unstructured(12, 70, 0.6, torch.float32, seeded)
    lay = cpu.bitmap_layout(p.bitmap, p.values, p.tile_offsets, p.n, p.k)
    x = torch.randn(3, 70, generator=seeded, requires_grad=True)
    y = cpu.bitmap_linear(x, lay)
    assert_close_to_ref(y, _ref(x.detach(), p.to_dense(), None), 70)
    with pytest.raises(RuntimeError, match="not implemented"):
        y.sum().backward()
