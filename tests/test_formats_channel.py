"""ChannelWeight: bit-exact round trip on block masks, exact indices, validation of masks and stored state."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecore.formats import ChannelWeight, FormatError
from sparsecore.masks import PatternError

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@settings(max_examples=60, deadline=None)
@given(out=st.integers(1, 13), cin=st.integers(1, 11), k=st.sampled_from([None, 1, 3]),
       p_out=st.floats(0, 1), p_in=st.floats(0, 1), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_round_trip_bit_exact(out, cin, k, p_out, p_in, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (out, cin) if k is None else (out, cin, k, k)
    w = torch.randn(shape, generator=g).to(dtype)
    w[torch.rand(shape, generator=g) < 0.1] = -0.0  # signed zeros at kept positions must survive
    keep_out = torch.rand(out, generator=g) >= p_out
    keep_in = torch.rand(cin, generator=g) >= p_in
    mask = keep_out[:, None] & keep_in[None, :]
    if k is not None:
        mask = mask[:, :, None, None].expand(shape).clone()
    packed = ChannelWeight.from_dense(w, mask)
    expected = torch.where(mask, w, torch.zeros((), dtype=dtype))
    dense = packed.to_dense()
    assert dense.dtype == dtype and torch.equal(dense.view(torch.int16 if dtype != torch.float32 else torch.int32),
                                                expected.view(torch.int16 if dtype != torch.float32 else torch.int32))
    # an empty block is empty on both sides: no kept row means no input column is read, and vice versa
    assert torch.equal(packed.out_idx, (keep_out & keep_in.any()).nonzero().flatten().int())
    assert torch.equal(packed.in_idx, (keep_in & keep_out.any()).nonzero().flatten().int())
    itemsize = w.element_size()
    kk = 1 if k is None else k * k
    assert packed.nbytes == 4 * (packed.n_out + packed.n_in) + packed.n_out * packed.n_in * kk * itemsize
    tensors, meta = packed.state()
    again = ChannelWeight.from_state({n: t.clone() for n, t in tensors.items()}, meta)
    assert torch.equal(again.to_dense(), dense)


def test_non_block_masks_rejected():
    w = torch.randn(4, 6)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[2, 3] = False
    with pytest.raises(PatternError, match=r"entry \(out=2, in=3\)"):
        ChannelWeight.from_dense(w, mask)
    conv_mask = torch.ones(4, 6, 3, 3, dtype=torch.bool)
    conv_mask[0, 0, 1, 1] = False
    with pytest.raises(PatternError, match="whole kh x kw"):
        ChannelWeight.from_dense(torch.randn(4, 6, 3, 3), conv_mask)
    with pytest.raises(TypeError, match="no parameters"):
        ChannelWeight.from_dense(w, torch.ones(4, 6, dtype=torch.bool), n=2)
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        ChannelWeight.from_dense(w.double(), torch.ones(4, 6, dtype=torch.bool))


def test_corrupt_state_rejected():
    packed = ChannelWeight.from_dense(torch.randn(5, 4), torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool)[:, None].expand(5, 4).clone())
    tensors, meta = packed.state()
    bad = dict(tensors, out_idx=torch.tensor([0, 3, 2], dtype=torch.int32))
    with pytest.raises(FormatError, match="strictly increasing"):
        ChannelWeight.from_state(bad, meta)
    bad = dict(tensors, out_idx=torch.tensor([0, 2, 5], dtype=torch.int32))
    with pytest.raises(FormatError, match=r"in \[0, 5\)"):
        ChannelWeight.from_state(bad, meta)
    with pytest.raises(FormatError, match="tensor 'values'"):
        ChannelWeight.from_state(dict(tensors, values=tensors["values"][:2]), meta)
    with pytest.raises(FormatError, match="unsupported dtype"):
        ChannelWeight.from_state(tensors, dict(meta, dtype="float64"))
    with pytest.raises(FormatError, match="version"):
        ChannelWeight.from_state(tensors, dict(meta, version=7))
    with pytest.raises(FormatError, match="'shape'"):
        ChannelWeight.from_state(tensors, dict(meta, shape="5x4"))
