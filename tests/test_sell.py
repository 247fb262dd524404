"""Sliced-ELL layout (exact metadata against a row-by-row construction) and the sell_matmul kernel
(interpreter on CPU, compiled on CUDA) against float64, plus its backend and custom op."""
from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from helpers import assert_close_to_ref, nonzero_randn
from sparsecore import SparseLinear
from sparsecore.backends import Backend, BackendUnavailable, resolve
from sparsecore.formats import UnstructuredWeight
from sparsecore.formats.sell import ALIGN, SellLayout, pack_sell
from sparsecore.kernels.sell_matmul import check_layout, sell_matmul, sell_matmul_ref

kmod = importlib.import_module("sparsecore.kernels.sell_matmul")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_DEVICE = pytest.mark.gpu if DEVICE == "cuda" else pytest.mark.interpreter


def _case(g, n, k, sparsity, dtype=torch.float16):
    w = nonzero_randn(n, k, dtype=dtype, generator=g)
    mask = torch.rand(n, k, generator=g) >= sparsity
    return w, mask


def _ref64(x, w, mask, bias=None):
    y = x.double() @ torch.where(mask, w, 0).double().t()
    return y if bias is None else y + bias.double()


# ---- layout ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,k,sparsity,c", [(37, 70, 0.9, 16), (33, 100, 0.5, 8), (5, 9, 0.0, 16), (16, 64, 1.0, 4)])
def test_pack_matches_a_row_by_row_construction(seeded, n, k, sparsity, c):
    w, mask = _case(seeded, n, k, sparsity)
    lay = pack_sell(w, mask, c)
    check_layout(lay)
    n_slices = -(-n // c)
    lens = [int(mask[r].sum()) for r in range(n)]
    assert lay.row_len.tolist() == lens
    base = 0
    for s in range(n_slices):
        rows = range(s * c, min(n, s * c + c))
        width = -(-max([lens[r] for r in rows] + [0]) // ALIGN) * ALIGN
        assert int(lay.width[s]) == width and int(lay.base[s]) == base
        for r in rows:
            seg = slice(base + (r - s * c) * width, base + (r - s * c + 1) * width)
            cols = mask[r].nonzero().flatten()
            want_c = torch.zeros(width, dtype=torch.int64)
            want_v = torch.zeros(width, dtype=w.dtype)
            want_c[: len(cols)], want_v[: len(cols)] = cols, w[r, cols]
            assert torch.equal(lay.cols[seg].to(torch.int64) & 0xFFFF, want_c)
            assert torch.equal(lay.values[seg], want_v)
        base += c * width
    assert lay.values.numel() == base


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 90), sparsity=st.sampled_from([0.0, 0.3, 0.9, 1.0]),
       c=st.sampled_from([1, 4, 16, 32]), dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
       seed=st.integers(0, 2**31 - 1))
def test_layout_round_trips(n, k, sparsity, c, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    mask = torch.rand(n, k, generator=g) >= sparsity
    lay = pack_sell(w, mask, c)
    check_layout(lay)
    assert torch.equal(lay.to_dense(), torch.where(mask, w, torch.zeros((), dtype=dtype)))


def test_columns_past_32767_use_the_high_half_of_int16(seeded):
    w, mask = _case(seeded, 3, 40000, 0.999)
    mask[1, 39999] = mask[2, 32768] = True
    lay = pack_sell(w, mask)
    assert int(lay.cols.min()) < 0
    assert torch.equal(lay.to_dense(), torch.where(mask, w, 0))


@ON_DEVICE
def test_kernel_reads_columns_past_32767(seeded):
    w, mask = _case(seeded, 3, 40000, 0.999, torch.float32)
    mask[1, 39999] = mask[2, 32768] = True
    x = torch.randn(2, 40000, generator=seeded)
    y = sell_matmul(x.to(DEVICE), pack_sell(w.to(DEVICE), mask.to(DEVICE)))
    assert_close_to_ref(y.cpu(), _ref64(x, w, mask), 40000)


def test_pack_and_check_reject_bad_input(seeded):
    w, mask = _case(seeded, 8, 16, 0.5)
    mask[:, 0] = True  # every row keeps at least one entry
    with pytest.raises(ValueError, match="bool mask"):
        pack_sell(w, mask.int())
    with pytest.raises(ValueError, match="power of two"):
        pack_sell(w, mask, 12)
    with pytest.raises(ValueError, match="K must be <= 65536"):
        pack_sell(torch.zeros(1, 65537), torch.zeros(1, 65537, dtype=torch.bool))
    lay = pack_sell(w, mask, 4)
    broken = [SellLayout(lay.values, lay.cols, lay.row_len + ALIGN, lay.base, lay.width, lay.n, lay.k, 4),
              SellLayout(lay.values, lay.cols, lay.row_len, lay.base + 1, lay.width, lay.n, lay.k, 4),
              SellLayout(lay.values, lay.cols, lay.row_len, lay.base, lay.width + 1, lay.n, lay.k, 4),
              SellLayout(lay.values, lay.cols.int(), lay.row_len, lay.base, lay.width, lay.n, lay.k, 4),
              SellLayout(lay.values[:-1], lay.cols[:-1], lay.row_len, lay.base, lay.width, lay.n, lay.k, 4)]
    cols = lay.cols.clone()
    cols[int(lay.base[0]) + 0] = 40  # row 0's first entry (every row of this mask keeps one) past k = 16
    broken += [SellLayout(lay.values, cols, lay.row_len, lay.base, lay.width, lay.n, lay.k, 4),
               SellLayout(lay.values, lay.cols, lay.row_len, lay.base, lay.width, lay.n, 70000, 4),
               SellLayout(lay.values, lay.cols, lay.row_len, lay.base, lay.width, lay.n, lay.k, 3)]
    for bad in broken:
        with pytest.raises(ValueError, match="SELL"):
            check_layout(bad)
    with pytest.raises(ValueError, match="inconsistent"):
        torch.ops.sparsecore.sell_matmul(torch.randn(2, 17), lay.values, lay.cols, lay.row_len, lay.base, lay.width,
                                         None, 4, 16)


# ---- kernel ------------------------------------------------------------------------------------------

CASES = [  # (M, N, K, sparsity, dtype, bias)
    (1, 37, 70, 0.9, torch.float16, True), (3, 33, 100, 0.5, torch.bfloat16, False),
    (5, 20, 64, 0.95, torch.float32, True), (17, 9, 40, 0.7, torch.float16, True),
    (2, 16, 48, 0.0, torch.float32, False), (1, 24, 30, 1.0, torch.float16, True),
]


@ON_DEVICE
@pytest.mark.parametrize("m,n,k,sparsity,dtype,has_bias", CASES)
def test_sell_matmul_matches_float64(seeded, poisoned, m, n, k, sparsity, dtype, has_bias):
    w, mask = _case(seeded, n, k, sparsity, dtype)
    x = nonzero_randn(m, k, dtype=dtype, generator=seeded)
    bias = nonzero_randn(n, dtype=dtype, generator=seeded) if has_bias else None
    lay = pack_sell(w.to(DEVICE), mask.to(DEVICE))
    y = sell_matmul(x.to(DEVICE), lay, None if bias is None else bias.to(DEVICE))
    assert y.shape == (m, n) and y.dtype == dtype and y.is_contiguous()
    assert_close_to_ref(y.cpu(), _ref64(x, w, mask, bias), k)


@ON_DEVICE
@pytest.mark.parametrize("slice_rows", [32, 64])
def test_wide_slices_take_the_one_row_config_on_padded_x(seeded, poisoned, slice_rows):
    """Wide slices on the launcher's padded x^T at M = 5: 32 rows still fit an 8-row block, 64 do not and fall
    back to BLOCK_M = 1 (every BLOCK_M divides the padding, so neither reads past it)."""
    w, mask = _case(seeded, 70, 40, 0.8, torch.float16)
    x = nonzero_randn(5, 40, dtype=torch.float16, generator=seeded)
    lay = pack_sell(w.to(DEVICE), mask.to(DEVICE), slice_rows=slice_rows)
    assert_close_to_ref(sell_matmul(x.to(DEVICE), lay).cpu(), _ref64(x, w, mask), 40)


@ON_DEVICE
def test_strided_x_and_empty_rows(seeded, poisoned):
    w, mask = _case(seeded, 21, 50, 0.8, torch.float16)
    mask[3] = False
    mask[16:] = False  # a whole empty slice
    xt = nonzero_randn(50, 4, dtype=torch.float16, generator=seeded)
    x = xt.t()  # [4, 50], strides (1, 4)
    lay = pack_sell(w.to(DEVICE), mask.to(DEVICE))
    y = sell_matmul(x.to(DEVICE), lay)
    assert_close_to_ref(y.cpu(), _ref64(x, w, mask), 50)
    assert bool((y[:, 3] == 0).all()) and bool((y[:, 16:] == 0).all())


@pytest.mark.interpreter
def test_pruned_columns_do_not_carry_nonfinite_x(seeded):
    w, mask = _case(seeded, 8, 32, 0.5, torch.float32)
    mask[:, 5] = False
    x = torch.randn(2, 32, generator=seeded)
    x[:, 5] = float("nan")  # only pruned weights meet it: y stays finite (pruned weights are absent)
    y = sell_matmul(x, pack_sell(w, mask))
    x0 = x.clone()
    x0[:, 5] = 0
    assert_close_to_ref(y, _ref64(x0, w, mask), 32)


@pytest.mark.interpreter
def test_bad_calls_raise(seeded, monkeypatch):
    w, mask = _case(seeded, 8, 32, 0.5, torch.float32)
    lay = pack_sell(w, mask)
    x = torch.randn(2, 32, generator=seeded)
    with pytest.raises(ValueError, match=r"\[M, 32\]"):
        sell_matmul(torch.randn(2, 33), lay)
    with pytest.raises(TypeError, match="float32"):
        sell_matmul(x.half(), lay)
    with pytest.raises(ValueError, match="bias"):
        sell_matmul(x, lay, torch.zeros(7))
    with pytest.raises(ValueError, match="bias"):
        sell_matmul(x, lay, torch.zeros(16)[::2])
    monkeypatch.setattr(kmod, "_INTERPRET", False)
    with pytest.raises(ValueError, match="CUDA"):
        sell_matmul(x, lay)


@pytest.mark.interpreter
def test_custom_op_and_compile(seeded):
    import torch._dynamo.testing

    w, mask = _case(seeded, 24, 40, 0.7, torch.float16)
    lay = pack_sell(w, mask)
    x = nonzero_randn(3, 40, dtype=torch.float16, generator=seeded)
    b = nonzero_randn(24, dtype=torch.float16, generator=seeded)
    args = (x, lay.values, lay.cols, lay.row_len, lay.base, lay.width, b, lay.slice_rows, lay.k)
    torch.library.opcheck(torch.ops.sparsecore.sell_matmul.default, args, test_utils=("test_schema", "test_faketensor"))
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    fn = torch.compile(lambda x: torch.relu(sell_matmul(x, lay, b)), backend=counter, fullgraph=True)
    assert_close_to_ref(fn(x), torch.relu(_ref64(x, w, mask, b)), 40)
    assert counter.graphs[0].code.count("torch.ops.sparsecore.sell_matmul") == 1
    assert_close_to_ref(sell_matmul_ref(x, lay, b), _ref64(x, w, mask, b), 40)


# ---- backend -----------------------------------------------------------------------------------------

@pytest.mark.interpreter
def test_backend_through_the_module_and_its_reasons(seeded):
    lin = nn.Linear(40, 24).half()
    mask = torch.rand(24, 40, generator=seeded) > 0.8
    sl = SparseLinear.from_dense(lin, mask, "unstructured", backend="triton_sell")
    x = torch.randn(2, 5, 40, generator=seeded).half()
    with torch.no_grad():
        assert_close_to_ref(sl(x).reshape(10, 24), _ref64(x.reshape(10, 40), lin.weight, mask, lin.bias), 40)
        sl.bias = nn.Parameter(torch.zeros(12, dtype=torch.float16))
        with pytest.raises(ValueError, match="bias"):
            sl(x)
    p = UnstructuredWeight.from_dense(torch.randn(2, 70000), torch.rand(2, 70000) > 0.99)
    with pytest.raises(BackendUnavailable, match="16-bit columns"):
        resolve("linear", Backend.TRITON_SELL, p, torch.randn(1, 70000))


def test_planner_never_times_sell_on_cpu():
    from sparsecore.planner import _contender

    from sparsecore.backends.registry import lookup

    assert not _contender(lookup("linear", Backend.TRITON_SELL, "unstructured"), torch.zeros(1, 4))
