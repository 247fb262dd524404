"""The launchers' host path: integer helpers, and the validate-once ("prechecked") entry points the
backends call per forward. A prechecked call must compute what the checked one does, and any input the
one-time validation did not cover (x's K, a replaced bias) must still raise, never read out of bounds."""
from __future__ import annotations

import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from helpers import assert_close_to_ref, nonzero_randn
from sparsecore import SparseLinear
from sparsecore.formats import NMWeight, UnstructuredWeight
from sparsecore.kernels._host import cdiv, next_pow2, num_sms
from sparsecore.kernels.nm_matmul import check_packed as nm_check_packed
from sparsecore.kernels.nm_matmul import nm_matmul, nm_matmul_prechecked
from sparsecore.kernels.spmm import check_packed as spmm_check_packed
from sparsecore.kernels.spmm import spmm, spmm_prechecked
from sparsecore.masks import keep_n_of_m

pytestmark = pytest.mark.interpreter  # Triton on CPU tensors


@settings(max_examples=300, deadline=None)
@given(a=st.integers(0, 1 << 40), b=st.integers(1, 1 << 20))
def test_cdiv_matches_triton(a, b):
    assert cdiv(a, b) == triton.cdiv(a, b)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 1 << 40))
def test_next_pow2_matches_triton(n):
    assert next_pow2(n) == triton.next_power_of_2(n)


def test_num_sms_on_cpu_is_the_interpreter_stand_in():
    assert num_sms(torch.device("cpu")) == 4


def _nm(g, n_out=24, k=40, dtype=torch.float16):
    w = nonzero_randn(n_out, k, dtype=dtype, generator=g)
    mask = keep_n_of_m(torch.rand(n_out, k, generator=g), 2, 4)
    return w, mask, NMWeight.from_dense(w, mask, n=2, m=4)


def _un(g, n_out=24, k=40, dtype=torch.float16):
    w = nonzero_randn(n_out, k, dtype=dtype, generator=g)
    mask = torch.rand(n_out, k, generator=g) < 0.3
    return w, mask, UnstructuredWeight.from_dense(w, mask)


def _ref64(x, w, mask, bias):
    y = x.double() @ torch.where(mask, w, 0).double().t()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("has_bias", [False, True])
def test_nm_prechecked_equals_checked_and_float64(seeded, has_bias):
    w, mask, p = _nm(seeded)
    nm_check_packed(p.values, p.positions, 2, 4)
    x = nonzero_randn(3, 40, dtype=torch.float16, generator=seeded)
    bias = nonzero_randn(24, dtype=torch.float16, generator=seeded) if has_bias else None
    y = nm_matmul_prechecked(x, p.values, p.positions, 2, 4, bias)
    assert_close_to_ref(y, _ref64(x, w, mask, bias), 40)
    assert torch.equal(y, nm_matmul(x, p.values, p.positions, 2, 4, bias))


@pytest.mark.parametrize("has_bias", [False, True])
def test_spmm_prechecked_equals_checked_and_float64(seeded, has_bias):
    w, mask, p = _un(seeded)
    spmm_check_packed(p.bitmap, p.values, p.tile_offsets, p.n, 40)
    x = nonzero_randn(3, 40, dtype=torch.float16, generator=seeded)
    bias = nonzero_randn(24, dtype=torch.float16, generator=seeded) if has_bias else None
    y = spmm_prechecked(x, p.bitmap, p.values, p.tile_offsets, p.n, 40, bias)
    assert_close_to_ref(y, _ref64(x, w, mask, bias), 40)
    assert torch.equal(y, spmm(x, p.bitmap, p.values, p.tile_offsets, p.n, bias, k=40))


@pytest.mark.parametrize("bad", ["k", "dtype", "bias_shape", "bias_dtype", "bias_stride"])
@pytest.mark.parametrize("kernel", ["nm", "spmm"])
def test_prechecked_still_rejects_what_the_one_time_check_cannot_cover(seeded, kernel, bad):
    _, _, p = (_nm if kernel == "nm" else _un)(seeded)
    x = torch.randn(2, 40, generator=seeded).half()
    bias = torch.randn(24, generator=seeded).half()
    if bad == "k":
        x = torch.randn(2, 80 if kernel == "nm" else 100, generator=seeded).half()
    elif bad == "dtype":
        x = x.float()
    elif bad == "bias_shape":
        bias = torch.randn(23, generator=seeded).half()
    elif bad == "bias_dtype":
        bias = bias.float()
    else:
        bias = torch.randn(48, generator=seeded).half()[::2]
    with pytest.raises((ValueError, TypeError)):
        if kernel == "nm":
            nm_matmul_prechecked(x, p.values, p.positions, 2, 4, bias)
        else:
            spmm_prechecked(x, p.bitmap, p.values, p.tile_offsets, p.n, 40, bias)


def test_spmm_k_argument_rejects_an_x_of_another_k_in_the_same_tiles(seeded):
    _, _, p = _un(seeded)                      # K = 40: one 64- or 128-wide tile column
    x = torch.randn(2, 41, generator=seeded).half()
    with pytest.raises(ValueError, match=r"\[M, 40\]"):
        spmm(x, p.bitmap, p.values, p.tile_offsets, p.n, k=40)


def test_check_packed_rejects_corrupt_tensors(seeded):
    _, _, p = _nm(seeded)
    with pytest.raises(ValueError, match="positions"):
        nm_check_packed(p.values, p.positions[:, :-1].contiguous(), 2, 4)
    with pytest.raises(ValueError, match="n must"):
        nm_check_packed(p.values, p.positions, 3, 4)
    swapped = p.positions.clone()
    swapped[0, 0] = ((swapped[0, 0] & 0x3) << 2) | ((swapped[0, 0] >> 2) & 0x3) | (swapped[0, 0] & 0xF0)
    with pytest.raises(ValueError, match="strictly increasing"):
        nm_check_packed(p.values, swapped, 2, 4)  # row 0, group 0: its two positions swapped
    _, _, u = _un(seeded)
    with pytest.raises(TypeError, match="tile_offsets"):
        spmm_check_packed(u.bitmap, u.values, u.tile_offsets.long(), u.n, 40)
    with pytest.raises(ValueError, match="K=300"):                   # 3+ tile columns, the bitmap has 1
        spmm_check_packed(u.bitmap, u.values, u.tile_offsets, u.n, 300)


@pytest.mark.parametrize("pattern,backend", [("nm", "triton_nm"), ("unstructured", "triton_spmm")])
def test_module_with_replaced_bias_raises_instead_of_reading_out_of_bounds(seeded, pattern, backend):
    lin = nn.Linear(40, 24).half()
    mask = keep_n_of_m(torch.rand(24, 40, generator=seeded), 2, 4)
    sl = SparseLinear.from_dense(lin, mask, pattern, backend=backend)
    x = torch.randn(2, 40, generator=seeded).half()
    with torch.no_grad():
        expected = _ref64(x, lin.weight, mask, lin.bias)
        assert_close_to_ref(sl(x), expected, 40)
        sl.bias = nn.Parameter(torch.zeros(12, dtype=torch.float16))  # a user swaps in a wrong-sized bias
        with pytest.raises(ValueError, match="bias"):
            sl(x)
