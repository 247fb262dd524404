"""Channel backends (SLICED_DENSE linear/conv2d, TRITON_CHANNEL conv2d) against float64 dense ops."""
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close_to_ref, nonzero_randn
from sparsecore.backends import Backend, BackendUnavailable, ConvParams, candidates, resolve
from sparsecore.formats.channel import ChannelWeight


def _block(g, shape, n_out, n_in):
    keep_out = torch.zeros(shape[0], dtype=torch.bool)
    keep_out[torch.randperm(shape[0], generator=g)[:n_out]] = True
    keep_in = torch.zeros(shape[1], dtype=torch.bool)
    keep_in[torch.randperm(shape[1], generator=g)[:n_in]] = True
    mask = keep_out[:, None] & keep_in[None, :]
    return mask.reshape(mask.shape + (1,) * (len(shape) - 2)).expand(shape).contiguous()


def _run(backend, op, packed, x, *rest):
    impl = resolve(op, backend, packed, x)
    return impl.run(impl.prepare(packed), x, *rest)


@pytest.mark.parametrize("all_in", [False, True])
def test_sliced_dense_linear(all_in, seeded):
    w = nonzero_randn(13, 23, generator=seeded)
    mask = _block(seeded, w.shape, 6, 23 if all_in else 9)
    packed = ChannelWeight.from_dense(w, mask)
    x, bias = torch.randn(5, 23, generator=seeded), torch.randn(13, generator=seeded)
    y = _run(Backend.SLICED_DENSE, "linear", packed, x, bias)
    ref64 = F.linear(x.double(), torch.where(mask, w, 0).double(), bias.double())
    assert_close_to_ref(y, ref64, 23)
    pruned = ~mask[:, 0] if all_in else ~mask.any(1)
    assert torch.equal(y[:, pruned], bias[pruned].expand(5, -1))   # pruned rows: bias exactly


@pytest.mark.interpreter
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("backend", [Backend.SLICED_DENSE, Backend.TRITON_CHANNEL])
def test_channel_conv_backends(backend, channels_last, seeded):
    w = nonzero_randn(11, 7, 3, 3, generator=seeded)
    mask = _block(seeded, w.shape, 5, 4)
    packed = ChannelWeight.from_dense(w, mask)
    x, bias = torch.randn(2, 7, 6, 5, generator=seeded), torch.randn(11, generator=seeded)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    conv = ConvParams(stride=(2, 1), padding=(1, 1))
    y = _run(backend, "conv2d", packed, x, bias, conv)
    ref64 = F.conv2d(x.double(), torch.where(mask, w, 0).double(), bias.double(), conv.stride, conv.padding)
    assert_close_to_ref(y, ref64, 4 * 9)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.interpreter
def test_sliced_dense_depthwise_conv(seeded):
    w = nonzero_randn(9, 1, 3, 3, generator=seeded)
    keep = torch.rand(9, generator=seeded) < 0.5
    keep[0] = True
    mask = keep.view(-1, 1, 1, 1).expand(w.shape).contiguous()
    packed = ChannelWeight.from_dense(w, mask)
    x = torch.randn(1, 9, 5, 5, generator=seeded)
    conv = ConvParams(padding=(1, 1), groups=9)
    y = _run(Backend.SLICED_DENSE, "conv2d", packed, x, None, conv)
    ref64 = F.conv2d(x.double(), torch.where(mask, w, 0).double(), None, 1, 1, 1, 9)
    assert_close_to_ref(y, ref64, 9)
    with pytest.raises(BackendUnavailable, match="groups=1 convs only"):
        resolve("conv2d", Backend.TRITON_CHANNEL, packed, x)


@pytest.mark.interpreter
def test_why_not_reasons(seeded, monkeypatch):
    w = nonzero_randn(8, 6, 3, 3, generator=seeded)
    packed = ChannelWeight.from_dense(w, _block(seeded, w.shape, 4, 3))
    x = torch.randn(1, 6, 5, 5, generator=seeded)
    names = {impl.backend for impl in candidates("conv2d", packed, x)}
    assert {Backend.DENSE, Backend.SLICED_DENSE, Backend.TRITON_CHANNEL} <= names
    with pytest.raises(BackendUnavailable, match="dtype"):
        resolve("conv2d", Backend.SLICED_DENSE, packed, x.half())
    with pytest.raises(BackendUnavailable, match="grouped conv"):
        resolve("conv2d", Backend.SLICED_DENSE, packed, torch.randn(1, 12, 5, 5))
    with pytest.raises(BackendUnavailable, match="input must be"):
        resolve("linear", Backend.SLICED_DENSE, ChannelWeight.from_dense(w[:, :, 0, 0], torch.ones(8, 6, dtype=torch.bool)),
                torch.randn(3, 5))
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(BackendUnavailable, match="Triton needs a CUDA tensor"):
            resolve("conv2d", Backend.TRITON_CHANNEL, packed, x)
