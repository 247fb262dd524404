"""channel_conv kernel (Triton; interpreter on CPU) against an independent float64 dense conv."""
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close_to_ref, nonzero_randn
from sparsecore.kernels.channel_conv import channel_conv, channel_conv_ref, fill_indices

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The same cases run the compiled kernel on a GPU machine and the interpreter elsewhere.
ON_DEVICE = pytest.mark.gpu if DEVICE == "cuda" else pytest.mark.interpreter


def _case(g, b, c_in, n_in, c_out, n_out, hw, k, dtype, bias, sort=True):
    x = torch.randn(b, c_in, hw[0], hw[1], generator=g).to(dtype)
    in_idx = torch.randperm(c_in, generator=g)[:n_in]
    out_idx = torch.randperm(c_out, generator=g)[:n_out]
    if sort:
        in_idx, out_idx = in_idx.sort().values, out_idx.sort().values
    values = nonzero_randn(n_out, n_in, k, k, dtype=dtype, generator=g)
    bias_t = torch.randn(c_out, generator=g).to(dtype) if bias else None
    return x, values, in_idx.to(torch.int32), out_idx.to(torch.int32), bias_t


def _dense_ref64(x, values, in_idx, out_idx, c_out, bias, stride, padding, dilation):
    """Independent oracle: scatter values into a dense float64 weight, then F.conv2d."""
    w = torch.zeros(c_out, x.shape[1], values.shape[2], values.shape[3], dtype=torch.float64)
    w[out_idx.long()[:, None], in_idx.long()[None, :]] = values.double()
    b = None if bias is None else bias.double()
    return F.conv2d(x.double(), w, b, stride, padding, dilation)


# (B, C_in, n_in, C_out, n_out, (H, W), k, stride, padding, dilation, dtype, channels_last, bias, poisoned out=)
CASES = [
    (1, 5, 3, 7, 4, (6, 6), 3, 1, 1, 1, torch.float32, False, True, True),
    (1, 5, 4, 7, 3, (6, 6), 3, 2, 1, 1, torch.float32, True, False, False),
    (2, 37, 19, 29, 17, (5, 7), 3, 1, 1, 1, torch.float16, True, True, True),     # several K, N and fill tiles
    (1, 21, 11, 9, 5, (7, 6), 3, 2, 2, 2, torch.bfloat16, False, True, True),      # dilation 2
    (2, 18, 18, 20, 20, (3, 5), 1, 1, 0, 1, torch.float32, True, True, False),     # 1x1, nothing pruned
]


@ON_DEVICE
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_channel_conv_matches_dense_float64(case, seeded):
    b, c_in, n_in, c_out, n_out, hw, k, stride, pad, dil, dtype, cl, bias, poisoned = case
    x, values, in_idx, out_idx, bias_t = _case(seeded, b, c_in, n_in, c_out, n_out, hw, k, dtype, bias, sort=k != 1)
    ref64 = _dense_ref64(x, values, in_idx, out_idx, c_out, bias_t, stride, pad, dil)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    xd = x.to(DEVICE)
    if cl:
        xd = xd.to(memory_format=torch.channels_last)
    args = (xd, to(values), to(in_idx), to(out_idx), c_out, to(bias_t), stride, pad, dil)
    if poisoned:
        out = torch.full(ref64.shape, float("nan"), dtype=dtype, device=DEVICE)
        y = channel_conv(*args, out=out)
        assert y is out
    else:
        y = channel_conv(*args)
        assert y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    assert y.dtype == dtype and y.shape == ref64.shape
    assert_close_to_ref(y.cpu(), ref64, n_in * k * k)
    pruned = fill_indices(out_idx, c_out).long()
    expect_fill = torch.zeros(len(pruned), dtype=dtype) if bias_t is None else bias_t[pruned]
    assert torch.equal(y.cpu()[:, pruned], expect_fill.view(1, -1, 1, 1).expand_as(y[:, pruned].cpu()))
    # The pure-torch reference agrees with the dense oracle too (in float64).
    ref = channel_conv_ref(x.double(), values.double(), in_idx, out_idx, c_out,
                           None if bias_t is None else bias_t.double(), stride, pad, dil)
    torch.testing.assert_close(ref, ref64, rtol=1e-12, atol=1e-12)


def test_fill_indices_is_the_complement():
    out_idx = torch.tensor([4, 0, 2], dtype=torch.int32)
    assert torch.equal(fill_indices(out_idx, 6), torch.tensor([1, 3, 5], dtype=torch.int32))


@pytest.mark.interpreter
def test_custom_op_fake_impl_and_schema(seeded):
    x, values, in_idx, out_idx, bias = _case(seeded, 1, 5, 3, 7, 4, (6, 6), 3, torch.float32, True)
    x = x.to(memory_format=torch.channels_last)
    fill = fill_indices(out_idx, 7)
    args = (x, values, in_idx, out_idx, fill, bias, 7, [2, 2], [1, 1], [1, 1])
    torch.library.opcheck(torch.ops.sparsecore.channel_conv.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = torch.ops.sparsecore.channel_conv(*args)
    assert y.shape == (1, 7, 3, 3) and y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.interpreter
def test_bad_inputs_raise(seeded):
    x, values, in_idx, out_idx, bias = _case(seeded, 1, 5, 3, 7, 4, (6, 6), 3, torch.float32, True)
    with pytest.raises(ValueError, match="in_idx must be a contiguous int32"):
        channel_conv(x, values, in_idx.long(), out_idx, 7, bias, 1, 1)
    with pytest.raises(ValueError, match=r"out_idx must be a contiguous int32 \[4\]"):
        channel_conv(x, values, in_idx, out_idx[:3], 7, bias, 1, 1)
    with pytest.raises(TypeError, match="share a dtype"):
        channel_conv(x, values.half(), in_idx, out_idx, 7, bias, 1, 1)
    with pytest.raises(ValueError, match="x must be 4-D"):
        channel_conv(x[0], values, in_idx, out_idx, 7, bias, 1, 1)
    with pytest.raises(ValueError, match="bias must be a contiguous"):
        channel_conv(x, values, in_idx, out_idx, 7, bias[:4], 1, 1)
    with pytest.raises(ValueError, match="out_idx has 4 entries but only 3"):
        channel_conv(x, values, in_idx, out_idx, 3, None, 1, 1)
    with pytest.raises(ValueError, match="stride >= 1"):
        channel_conv(x, values, in_idx, out_idx, 7, bias, 0, 1)
    with pytest.raises(ValueError, match="out must be"):
        channel_conv(x, values, in_idx, out_idx, 7, bias, 1, 1, out=torch.empty(1, 7, 5, 5))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [True, False])
def test_channel_conv_gpu_resnet_shape(dtype, channels_last, seeded):
    # A ResNet-50 layer3 3x3 conv at 50% in and out channels, batch 2.
    x, values, in_idx, out_idx, bias = _case(seeded, 2, 256, 128, 256, 128, (14, 14), 3, dtype, True)
    ref64 = _dense_ref64(x, values, in_idx, out_idx, 256, bias, 1, 1, 1)
    xd = x.cuda().to(memory_format=torch.channels_last) if channels_last else x.cuda()
    y = channel_conv(xd, values.cuda(), in_idx.cuda(), out_idx.cuda(), 256, bias.cuda(), 1, 1)
    assert_close_to_ref(y.cpu(), ref64, 128 * 9)
    fill = fill_indices(out_idx.cuda(), 256)   # precomputed: fill_indices syncs (nonzero)
    compiled = torch.compile(lambda t: channel_conv(t, values.cuda(), in_idx.cuda(), out_idx.cuda(), 256,
                                                    bias.cuda(), 1, 1, fill_idx=fill), fullgraph=True)
    torch.testing.assert_close(compiled(xd), y, rtol=0, atol=0)
