"""nm_matmul (Triton, interpreter on CPU), its torch reference, and the nm backends of the registry."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close_to_ref, nonzero_randn
from sparsecore.backends import Backend, BackendUnavailable, ConvParams, resolve
from sparsecore.formats import NMWeight
from sparsecore.kernels.nm_matmul import choose_split_k, nm_matmul, nm_matmul_ref

mod = importlib.import_module("sparsecore.kernels.nm_matmul")  # the module, even if a package re-export shadows it
from sparsecore.masks import keep_n_of_m

pytestmark = pytest.mark.interpreter  # Triton on CPU tensors; the gpu-marked tests here run on CUDA

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


def make_case(g, n_out, k_dim, n, m, dtype, keep_frac=1.0, device="cpu"):
    """(dense weight, mask, packed): mask from keep_n_of_m on random scores, optionally thinned."""
    w = nonzero_randn(n_out, k_dim, dtype=dtype, generator=g)
    mask = keep_n_of_m(torch.rand(n_out, k_dim, generator=g), n, m)
    if keep_frac < 1.0:
        mask &= torch.rand(n_out, k_dim, generator=g) < keep_frac
    return w.to(device), mask.to(device), NMWeight.from_dense(w, mask, n=n, m=m).to(device)


def ref64(x, w, mask, bias):
    """Independent float64 reference from the dense weight and the mask (not from the packed data)."""
    y = x.double() @ torch.where(mask, w, 0).double().t()
    return y + bias.double() if bias is not None else y


# (n, m, dtype, M, N, K, bias, keep_frac): every pattern x dtype pairing once, odd M/N, K odd multiples of m.
CASES = [
    (2, 4, F16, 1, 7, 20, True, 1.0), (2, 4, BF16, 3, 33, 72, False, 0.7), (2, 4, F32, 5, 33, 20, True, 1.0),
    (1, 4, F16, 5, 7, 72, False, 1.0), (1, 4, BF16, 1, 33, 20, True, 1.0), (1, 4, F32, 3, 7, 44, True, 0.5),
    (2, 8, F32, 3, 7, 72, True, 1.0), (2, 8, F16, 1, 33, 40, False, 0.7), (2, 8, BF16, 5, 7, 24, True, 1.0),
    (4, 8, BF16, 5, 7, 40, True, 1.0), (4, 8, F32, 1, 33, 72, False, 1.0), (4, 8, F16, 3, 33, 72, True, 0.6),
]


@pytest.mark.parametrize("n,m,dtype,M,N,K,has_bias,keep_frac", CASES)
def test_nm_matmul_matches_float64(seeded, poisoned, n, m, dtype, M, N, K, has_bias, keep_frac):
    w, mask, p = make_case(seeded, N, K, n, m, dtype, keep_frac)
    x = nonzero_randn(M, K, dtype=dtype, generator=seeded)
    bias = nonzero_randn(N, dtype=dtype, generator=seeded) if has_bias else None
    expected = ref64(x, w, mask, bias)
    y = nm_matmul(x, p.values, p.positions, n, m, bias)
    assert y.dtype == dtype and y.shape == (M, N) and y.is_contiguous()
    assert_close_to_ref(y, expected, K)
    assert_close_to_ref(nm_matmul_ref(x, p.values, p.positions, n, m, bias), expected, K)


@pytest.fixture
def gather(monkeypatch):
    """Run the interpreter with the gather path (M <= 4 on a GPU: no dense tile, x gathered per kept value)."""
    monkeypatch.setattr(mod, "INTERPRET_GATHER", True)
    yield


# every pattern (2:4, 1:4, 2:8, 4:8, incl. 3-bit fields that straddle bytes), split K, odd shapes, strided x;
# M <= 4 only: larger M takes the tensor-core path (as on a GPU)
@pytest.mark.parametrize("n,m,dtype,M,N,K,has_bias,keep_frac", [c for c in CASES if c[3] <= 4])
def test_gather_path_matches_float64(seeded, poisoned, gather, n, m, dtype, M, N, K, has_bias, keep_frac):
    w, mask, p = make_case(seeded, N, K, n, m, dtype, keep_frac)
    x = nonzero_randn(K, M, dtype=dtype, generator=seeded).t()  # strided: the gather reads through both strides
    bias = nonzero_randn(N, dtype=dtype, generator=seeded) if has_bias else None
    for split_k in (0, 3):
        y = nm_matmul(x, p.values, p.positions, n, m, bias, split_k=split_k)
        assert_close_to_ref(y, ref64(x, w, mask, bias), K)


@pytest.mark.parametrize("n,m,dtype,M,N,K", [(2, 4, F16, 1, 32, 128), (1, 4, F32, 2, 48, 128), (4, 8, BF16, 3, 16, 128),
                                              (2, 8, F16, 1, 16, 128), (1, 8, F32, 4, 16, 128)])
def test_gather_path_full_blocks_unmasked(seeded, poisoned, gather, n, m, dtype, M, N, K):
    """N a multiple of BLOCK_N and every K slice of BLOCK_K (the interpreter's 16 x 32; K = 128 in 1 or 2
    slices of 64): the EVEN variant, no bounds masks, for every power-of-two n."""
    w, mask, p = make_case(seeded, N, K, n, m, dtype, 0.9)
    x = nonzero_randn(M, K, dtype=dtype, generator=seeded)
    bias = nonzero_randn(N, dtype=dtype, generator=seeded)
    for split_k in (1, 2):
        assert_close_to_ref(nm_matmul(x, p.values, p.positions, n, m, bias, split_k=split_k), ref64(x, w, mask, bias), K)


@pytest.mark.parametrize("n,m", [(3, 8), (3, 4), (5, 8)])
def test_non_power_of_two_n_takes_the_general_expansion(seeded, poisoned, gather, n, m):
    """No gather for n = 3, 5 (slot blocks must be powers of two): the tensor-core path with ``_expand_slots``."""
    w, mask, p = make_case(seeded, 16, 64, n, m, F16, 0.9)
    x = nonzero_randn(2, 64, dtype=F16, generator=seeded)
    assert_close_to_ref(nm_matmul(x, p.values, p.positions, n, m), ref64(x, w, mask, None), 64)


@pytest.mark.parametrize("n,m,dtype,M,has_bias", [(2, 4, F16, 17, True), (4, 8, BF16, 20, False),
                                                  (2, 4, F32, 70, True)])
def test_tensor_core_path(seeded, poisoned, n, m, dtype, M, has_bias):
    """M > 8 takes the tl.dot configs (M <= 64 and the large-M bucket)."""
    w, mask, p = make_case(seeded, 33, 72, n, m, dtype, 0.8)
    x = nonzero_randn(M, 72, dtype=dtype, generator=seeded)
    bias = nonzero_randn(33, dtype=dtype, generator=seeded) if has_bias else None
    assert_close_to_ref(nm_matmul(x, p.values, p.positions, n, m, bias), ref64(x, w, mask, bias), 72)


@pytest.mark.parametrize("n,dtype", [(2, F16), (1, BF16), (2, F32)])
@pytest.mark.parametrize("M", [2, 17])
def test_tensor_core_path_full_blocks_unmasked(seeded, poisoned, n, dtype, M):
    """m = 4 with N a multiple of BLOCK_N and every K slice of BLOCK_K (the interpreter's 16 x 32): the EVEN
    expansion, which loads each row's position bytes for the tile at once and splits their nibbles."""
    w, mask, p = make_case(seeded, 32, 128, n, 4, dtype, 0.9)
    x = nonzero_randn(M, 128, dtype=dtype, generator=seeded)
    bias = nonzero_randn(32, dtype=dtype, generator=seeded)
    for split_k in (1, 2):
        assert_close_to_ref(nm_matmul(x, p.values, p.positions, n, 4, bias, split_k=split_k),
                            ref64(x, w, mask, bias), 128)


@pytest.mark.parametrize("split_k,has_bias", [(2, True), (3, False), (40, True)])
def test_split_k_partials(seeded, poisoned, split_k, has_bias):
    """Forced K slices (slices are rounded up to multiples of 32: K = 72 gives 2 or 3 of them, and 40 asks
    for more than there can be) sum to the same result."""
    w, mask, p = make_case(seeded, 7, 72, 2, 4, F16)
    x = nonzero_randn(2, 72, dtype=F16, generator=seeded)
    bias = nonzero_randn(7, dtype=F16, generator=seeded) if has_bias else None
    assert_close_to_ref(nm_matmul(x, p.values, p.positions, 2, 4, bias, split_k=split_k),
                        ref64(x, w, mask, bias), 72)


def test_strided_x_is_read_in_place(seeded, poisoned):
    """A transposed or column-sliced x runs through its strides (no copy needed)."""
    w, mask, p = make_case(seeded, 9, 40, 2, 8, F32)
    xt = nonzero_randn(40, 3, generator=seeded)
    x = xt.t()                                             # strides (1, 3)
    assert_close_to_ref(nm_matmul(x, p.values, p.positions, 2, 8), ref64(x, w, mask, None), 40)
    wide = nonzero_randn(3, 50, generator=seeded)
    x2 = wide[:, 5:45]                                     # row stride 50
    assert_close_to_ref(nm_matmul(x2, p.values, p.positions, 2, 8), ref64(x2, w, mask, None), 40)


def test_choose_split_k():
    assert choose_split_k(1, 4096, 4096, 4, 132) == 1        # 256 blocks of 16 rows fill 132 SMs
    assert choose_split_k(1, 768, 3072, 4, 132) == 6         # 48 blocks: split K in 6
    assert choose_split_k(1, 768, 512, 4, 132) == 2          # but keep >= 256 of K per slice
    assert choose_split_k(256, 768, 3072, 4, 132) == 1       # large M fills the GPU by itself


def test_bad_inputs(seeded):
    w, mask, p = make_case(seeded, 8, 16, 2, 4, F16)
    x = nonzero_randn(2, 16, dtype=F16, generator=seeded)
    v, pos = p.values, p.positions
    with pytest.raises(ValueError, match="2-D"):
        nm_matmul(x[None], v, pos, 2, 4)
    with pytest.raises(TypeError, match="values dtype"):
        nm_matmul(x.float(), v, pos, 2, 4)
    with pytest.raises(TypeError, match="float16/bfloat16/float32|one of"):
        nm_matmul(x.double(), v.double(), pos, 2, 4)
    with pytest.raises(TypeError, match="uint8"):
        nm_matmul(x, v, pos.to(torch.int32), 2, 4)
    with pytest.raises(ValueError, match="K=20"):
        nm_matmul(nonzero_randn(2, 20, dtype=F16), v, pos, 2, 4)
    with pytest.raises(ValueError, match="positions must have shape"):
        nm_matmul(x, v, pos[:, :1].contiguous(), 2, 4)
    with pytest.raises(ValueError, match="contiguous"):
        nm_matmul(x, torch.cat([v, v], 1)[:, ::2], pos, 2, 4)
    with pytest.raises(ValueError, match="bias"):
        nm_matmul(x, v, pos, 2, 4, torch.zeros(7, dtype=F16))
    with pytest.raises(ValueError, match="bias"):
        nm_matmul(x, v, pos, 2, 4, torch.zeros(8))
    with pytest.raises(ValueError, match="0 < n < m"):
        nm_matmul(x, v, pos, 2, 16)
    with pytest.raises(ValueError, match="split_k"):
        nm_matmul(x, v, pos, 2, 4, split_k=-1)


def test_custom_op_is_traceable(seeded):
    """One opaque op in a fullgraph torch.compile; the fake impl gives shape and dtype."""
    w, mask, p = make_case(seeded, 7, 20, 2, 4, BF16)
    x = nonzero_randn(3, 20, dtype=BF16, generator=seeded)
    fn = torch.compile(lambda a: nm_matmul(a, p.values, p.positions, 2, 4), fullgraph=True, backend="aot_eager")
    assert_close_to_ref(fn(x), ref64(x, w, mask, None), 20)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        out = torch.ops.sparsecore.nm_matmul(fx, mode.from_tensor(p.values), mode.from_tensor(p.positions), 2, 4)
    assert out.shape == (3, 7) and out.dtype == BF16


# ---- registry entries ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [Backend.REFERENCE, Backend.TRITON_NM])
def test_registry_linear(seeded, backend):
    w, mask, p = make_case(seeded, 9, 24, 2, 4, F32, 0.8)
    x = nonzero_randn(3, 24, generator=seeded)
    bias = nonzero_randn(9, generator=seeded)
    impl = resolve("linear", backend, p, x)
    y = impl.run(impl.prepare(p), x, bias)
    assert_close_to_ref(y, ref64(x, w, mask, bias), 24)


def test_registry_reference_conv2d(seeded):
    w = nonzero_randn(5, 4, 3, 3, generator=seeded)
    mask = keep_n_of_m(torch.rand(5, 4, 3, 3, generator=seeded), 2, 4)
    p = NMWeight.from_dense(w, mask)
    x = nonzero_randn(2, 4, 7, 6, generator=seeded)
    conv = ConvParams(stride=(2, 1), padding=(1, 1))
    impl = resolve("conv2d", Backend.REFERENCE, p, x)
    y = impl.run(impl.prepare(p), x, None, conv)
    ref = F.conv2d(x.double(), torch.where(mask, w, 0).double(), None, (2, 1), (1, 1))
    assert_close_to_ref(y, ref, 36)


def test_registry_reasons(seeded):
    _, _, p24 = make_case(seeded, 32, 64, 2, 4, F16)
    x = nonzero_randn(2, 64, dtype=F16, generator=seeded)
    for backend in (Backend.CUSPARSELT, Backend.CUTLASS):
        if not torch.cuda.is_available():
            with pytest.raises(BackendUnavailable, match="CUDA"):
                resolve("linear", backend, p24, x)
        _, _, p28 = make_case(seeded, 32, 64, 2, 8, F16)
        with pytest.raises(BackendUnavailable, match="2:4 sparsity only"):
            resolve("linear", backend, p28, x)
        _, _, p32 = make_case(seeded, 32, 64, 2, 4, F32)
        with pytest.raises(BackendUnavailable, match="float16/bfloat16"):
            resolve("linear", backend, p32, x.float())
    with pytest.raises(BackendUnavailable, match="differs"):
        resolve("linear", Backend.TRITON_NM, p24, x.float())
    with pytest.raises(BackendUnavailable, match=r"\[M, 64\]"):
        resolve("linear", Backend.REFERENCE, p24, x[:, :32])
    conv_p = NMWeight.from_dense(torch.ones(4, 8, 1, 1), keep_n_of_m(torch.rand(4, 8, 1, 1), 2, 4))
    with pytest.raises(BackendUnavailable, match="2-D weight"):
        resolve("linear", Backend.TRITON_NM, conv_p, nonzero_randn(2, 8))


# ---- GPU -----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,n,m,M", [(F16, 2, 4, 1), (F16, 2, 4, 16), (F16, 2, 4, 300), (BF16, 2, 4, 5),
                                         (BF16, 4, 8, 1), (F32, 1, 4, 3), (F16, 4, 8, 64), (BF16, 2, 8, 33)])
def test_nm_matmul_gpu(seeded, poisoned, dtype, n, m, M):
    w, mask, p = make_case(seeded, 1000, 1032, n, m, dtype, 0.9, device="cuda")
    x = nonzero_randn(M, 1032, dtype=dtype, generator=seeded).cuda()
    bias = nonzero_randn(1000, dtype=dtype, generator=seeded).cuda()
    assert_close_to_ref(nm_matmul(x, p.values, p.positions, n, m, bias), ref64(x, w, mask, bias), 1032)
    assert_close_to_ref(nm_matmul(x, p.values, p.positions, n, m, bias, split_k=3), ref64(x, w, mask, bias), 1032)


@pytest.mark.gpu
def test_nm_matmul_compile_gpu(seeded):
    w, mask, p = make_case(seeded, 256, 512, 2, 4, F16, device="cuda")
    x = nonzero_randn(4, 512, dtype=F16, generator=seeded).cuda()

    def block(a):
        return torch.relu(nm_matmul(a, p.values, p.positions, 2, 4)) * 2

    fn = torch.compile(block, fullgraph=True)
    ref = torch.relu(ref64(x, w, mask, None)) * 2
    assert_close_to_ref(fn(x), ref, 512)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [Backend.CUSPARSELT, Backend.CUTLASS, Backend.TRITON_NM])
def test_registry_gpu(seeded, backend):
    w, mask, p = make_case(seeded, 128, 256, 2, 4, F16, device="cuda")
    x = nonzero_randn(32, 256, dtype=F16, generator=seeded).cuda()
    bias = nonzero_randn(128, dtype=F16, generator=seeded).cuda()
    try:
        impl = resolve("linear", backend, p, x)
    except BackendUnavailable as e:
        pytest.skip(str(e))
    assert_close_to_ref(impl.run(impl.prepare(p), x, bias), ref64(x, w, mask, bias), 256)
