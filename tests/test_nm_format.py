"""NMWeight: lossless round trip, documented byte layout, PyTorch 2:4 interop, validation errors."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers import nonzero_randn
from sparsecore.formats import FORMATS, FormatError, NMWeight
from sparsecore.masks import PatternError, as_matrix, from_matrix, keep_n_of_m

PATTERNS = [(2, 4), (1, 4), (2, 8), (4, 8)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a float tensor, so that -0.0 and +0.0 differ."""
    return t.contiguous().view(_INT_VIEW[t.dtype])


def random_nm(shape, n, m, dtype, g, keep_frac=1.0):
    """Weight (with some kept -0.0) and an n:m mask; ``keep_frac < 1`` drops kept entries (sub-mask)."""
    w = torch.randn(shape, generator=g).to(dtype)
    mask = keep_n_of_m(torch.rand(shape, generator=g), n, m)
    if keep_frac < 1.0:
        mask &= torch.rand(shape, generator=g) < keep_frac
    w = torch.where(torch.rand(shape, generator=g) < 0.1, torch.tensor(-0.0, dtype=dtype), w)
    return w, mask


@settings(max_examples=60, deadline=None)
@given(out=st.integers(1, 9), groups=st.integers(1, 7), pattern=st.sampled_from(PATTERNS),
       dtype=st.sampled_from(DTYPES), conv=st.booleans(), keep_frac=st.sampled_from([1.0, 0.6, 0.0]),
       seed=st.integers(0, 2**31 - 1))
def test_round_trip_property(out, groups, pattern, dtype, conv, keep_frac, seed):
    n, m = pattern
    g = torch.Generator().manual_seed(seed)
    # conv: K = kh * kw * C_in with C_in = groups * m / (kh * kw) not always integral, so build C_in directly
    shape = (out, groups * m // 2, 1, 2) if conv and m % 2 == 0 else (out, groups * m)
    w, mask = random_nm(shape, n, m, dtype, g, keep_frac)
    p = NMWeight.from_dense(w, mask, n=n, m=m)
    expected = torch.where(mask, w, torch.zeros((), dtype=dtype))
    dense = p.to_dense()
    assert dense.shape == w.shape and dense.dtype == dtype
    assert torch.equal(bits(dense), bits(expected))
    k_dim = as_matrix(w).shape[1]
    slots = k_dim // m * n
    assert p.values.shape == (out, slots) and p.values.dtype == dtype
    assert p.positions.shape == (out, (slots * {4: 2, 8: 3}[m] + 7) // 8) and p.positions.dtype == torch.uint8
    assert p.nbytes == out * (slots * w.element_size() + p.positions.shape[1])
    # canonical form: strictly increasing positions per group, kept entries all present
    pos = p.slot_positions().reshape(out, -1, n)
    assert bool((pos[..., 1:] > pos[..., :-1]).all())
    tensors, meta = p.state()
    q = FORMATS[meta["kind"]].from_state({k: v.clone() for k, v in tensors.items()}, meta)
    assert torch.equal(q.positions, p.positions) and torch.equal(bits(q.values), bits(p.values))
    assert torch.equal(bits(q.to_dense()), bits(expected)) and q.shape == tuple(w.shape) and (q.n, q.m) == (n, m)


def test_byte_layout_2_4_matches_docstring():
    w = torch.arange(1, 13, dtype=torch.float32).reshape(1, 12)
    mask = torch.tensor([[0, 1, 0, 1, 1, 0, 1, 0, 0, 0, 1, 0]], dtype=torch.bool)
    p = NMWeight.from_dense(w, mask, n=2, m=4)
    # group 0 keeps {1, 3}, group 1 keeps {0, 2}, group 2 keeps only {2}: spare slot at position 0, value +0.0
    assert torch.equal(p.values, torch.tensor([[2.0, 4.0, 5.0, 7.0, 0.0, 11.0]]))
    # slots' positions 1,3,0,2 | 0,2 at 2 bits, little-endian: byte0 = 1 + 3<<2 + 0<<4 + 2<<6, byte1 = 0 + 2<<2
    assert torch.equal(p.positions, torch.tensor([[1 + (3 << 2) + (2 << 6), 2 << 2]], dtype=torch.uint8))
    assert p.nbytes == 6 * 4 + 2


def test_byte_layout_4_8_straddles_bytes():
    w = torch.arange(1, 9, dtype=torch.float16).reshape(1, 8)
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, [1, 4, 6, 7]] = True
    p = NMWeight.from_dense(w, mask, n=4, m=8)
    stream = 1 | (4 << 3) | (6 << 6) | (7 << 9)  # 12 bits; the 3rd field spans bytes 0 and 1
    assert torch.equal(p.positions, torch.tensor([[stream & 0xFF, stream >> 8]], dtype=torch.uint8))
    assert torch.equal(p.values, torch.tensor([[2.0, 5.0, 7.0, 8.0]], dtype=torch.float16))


def test_fp16_2_4_is_1_125_bytes_per_element():
    w = torch.randn(64, 256, dtype=torch.float16)
    p = NMWeight.from_dense(w, keep_n_of_m(w.abs().float(), 2, 4))
    assert p.nbytes == 1.125 * w.numel() and p.dense_nbytes == 2 * w.numel()


def test_conv_groups_run_along_c_in(seeded):
    w = nonzero_randn(3, 8, 3, 3, generator=seeded)
    mask = keep_n_of_m(w.abs(), 2, 4)
    p = NMWeight.from_dense(w, mask, n=2, m=4)
    assert p.k == 72 and p.shape == (3, 8, 3, 3)
    assert torch.equal(p.to_dense(), torch.where(mask, w, 0))
    assert torch.equal(from_matrix(as_matrix(p.to_dense()), w.shape), p.to_dense())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_2_4_values_and_order_match_pytorch(seeded, dtype):
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_to_dense_cutlass
    w = nonzero_randn(32, 64, dtype=dtype, generator=seeded)
    mask = keep_n_of_m(torch.rand(32, 64, generator=seeded), 2, 4)
    p = NMWeight.from_dense(w, mask)
    sparse, meta = p.to_cutlass_compressed()
    assert torch.equal(sparse, p.values)  # same kept values in the same order
    assert torch.equal(sparse_semi_structured_to_dense_cutlass(sparse, meta), p.to_dense())
    # groups keeping fewer than 2: PyTorch's dense reconstruction still matches ours exactly
    sub = mask & (torch.rand(32, 64, generator=seeded) < 0.5)
    q = NMWeight.from_dense(w, sub)
    assert torch.equal(sparse_semi_structured_to_dense_cutlass(*q.to_cutlass_compressed()), q.to_dense())


def test_torch_semi_structured_needs_2_4_half_cuda(seeded):
    w = nonzero_randn(32, 64, generator=seeded)
    with pytest.raises(ValueError, match="2:4"):
        NMWeight.from_dense(w, keep_n_of_m(w.abs(), 2, 8), n=2, m=8).to_cutlass_compressed()
    with pytest.raises(TypeError, match="float16/bfloat16"):
        NMWeight.from_dense(w, keep_n_of_m(w.abs(), 2, 4)).to_torch_semi_structured()
    p = NMWeight.from_dense(w.half(), keep_n_of_m(w.abs(), 2, 4))
    with pytest.raises(ValueError, match="backend must be"):
        p.to_torch_semi_structured("magic")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            p.to_torch_semi_structured("cutlass")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
def test_torch_semi_structured_linear_gpu(seeded, backend):
    major, _ = torch.cuda.get_device_capability()
    if backend == "cutlass" and major != 8:
        pytest.skip("PyTorch's CUTLASS 2:4 kernels are built for compute capability 8.x only")
    if backend == "cusparselt" and not torch.backends.cusparselt.is_available():
        pytest.skip("no cuSPARSELt in this torch build")
    w = nonzero_randn(128, 256, dtype=torch.float16, generator=seeded)
    mask = keep_n_of_m(w.abs().float(), 2, 4)
    p = NMWeight.from_dense(w, mask).to("cuda")
    x = nonzero_randn(64, 256, dtype=torch.float16, generator=seeded).cuda()
    y = torch.nn.functional.linear(x, p.to_torch_semi_structured(backend))
    ref = x.double() @ p.to_dense().double().t()
    from helpers import assert_close_to_ref
    assert_close_to_ref(y, ref, 256)


# ---- bad inputs ---------------------------------------------------------------------------------------
def test_from_dense_rejects_bad_inputs(seeded):
    w = nonzero_randn(4, 16, generator=seeded)
    mask = keep_n_of_m(w.abs(), 2, 4)
    over = mask.clone()
    over[1, 4:8] = True
    with pytest.raises(PatternError, match=r"row 1, group 1"):
        NMWeight.from_dense(w, over)
    nan_w = w.clone()
    nan_w[tuple(mask.nonzero()[0].tolist())] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        NMWeight.from_dense(nan_w, mask)
    with pytest.raises(TypeError, match="dtype"):
        NMWeight.from_dense(w.double(), mask)
    with pytest.raises(TypeError, match="torch.bool"):
        NMWeight.from_dense(w, mask.float())
    with pytest.raises(ValueError, match="does not match"):
        NMWeight.from_dense(w, mask[:, :8])
    with pytest.raises(PatternError, match=r"\(4, 18\) has K=18"):
        NMWeight.from_dense(nonzero_randn(4, 18, generator=seeded), torch.zeros(4, 18, dtype=torch.bool))
    for n, m in [(4, 4), (0, 4), (2, 16), (True, 4), (2.0, 4)]:
        with pytest.raises(ValueError, match="0 < n < m"):
            NMWeight.from_dense(w, mask, n=n, m=m)
    with pytest.raises(TypeError, match="n and m only"):
        NMWeight.from_dense(w, mask, block=4)
    # a NaN at a pruned position is fine: it is dropped
    ok_w = w.clone()
    ok_w[tuple((~mask).nonzero()[0].tolist())] = float("nan")
    assert torch.equal(NMWeight.from_dense(ok_w, mask).to_dense(), torch.where(mask, ok_w, 0))


def _state(seeded, n=2, m=4, k=24):
    w = nonzero_randn(3, k, generator=seeded)
    p = NMWeight.from_dense(w, keep_n_of_m(w.abs(), n, m), n=n, m=m)
    tensors, meta = p.state()
    return {k_: v.clone() for k_, v in tensors.items()}, dict(meta)


def test_from_state_rejects_corrupt_data(seeded):
    t, meta = _state(seeded)
    bad_metas = [({"version": 2}, "version"), ({"dtype": "int8"}, "dtype"), ({"n": 4}, "0 < n < m"),
                 ({"m": 16}, "0 < n < m"), ({"shape": [3, 26]}, "K divisible"), ({"shape": [3, 28]}, "values"),
                 ({"shape": "3x24"}, "shape"), ({"dtype": "float16"}, "values")]
    for change, match in bad_metas:
        with pytest.raises(FormatError, match=match):
            NMWeight.from_state(t, {**meta, **change})
    with pytest.raises(FormatError, match="positions"):
        NMWeight.from_state({"values": t["values"]}, meta)
    with pytest.raises(FormatError, match="positions"):
        NMWeight.from_state({**t, "positions": t["positions"].to(torch.int16)}, meta)
    with pytest.raises(FormatError, match="positions"):
        NMWeight.from_state({**t, "positions": t["positions"][:, :-1]}, meta)
    nan_vals = t["values"].clone()
    nan_vals[0, 0] = float("inf")
    with pytest.raises(FormatError, match="NaN or Inf"):
        NMWeight.from_state({**t, "values": nan_vals}, meta)
    dup = t["positions"].clone()
    dup[1, 0] = 0b0101_0101  # groups 0 and 1 of row 1 both at positions (1, 1)
    with pytest.raises(FormatError, match="row 1, group 0 .*not strictly increasing"):
        NMWeight.from_state({**t, "positions": dup}, meta)
    unsorted = t["positions"].clone()
    unsorted[2, 2] = 0b0001_1011  # row 2, group 4 at (3, 2) and group 5 at (1, 0)
    with pytest.raises(FormatError, match="row 2, group 4"):
        NMWeight.from_state({**t, "positions": unsorted}, meta)


def test_from_state_rejects_stray_padding_bits(seeded):
    t, meta = _state(seeded, n=2, m=8, k=8)  # 2 slots * 3 bits = 6 bits in 1 byte: 2 padding bits
    assert t["positions"].shape == (3, 1)
    stray = t["positions"].clone()
    stray[0, 0] |= 0b1000_0000
    with pytest.raises(FormatError, match="padding bits"):
        NMWeight.from_state({**t, "positions": stray}, meta)
    assert NMWeight.from_state(t, meta).n == 2


def test_to_device_round_trip(seeded):
    t, meta = _state(seeded, n=1, m=4)
    p = NMWeight.from_state(t, meta)
    q = p.to("cpu")
    assert torch.equal(q.to_dense(), p.to_dense()) and q.device == torch.device("cpu")
