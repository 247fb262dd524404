"""spmm kernel (Triton; interpreter on CPU), its torch reference, and the unstructured backends.

Every result is compared with an independent float64 product of the masked dense weight.
"""
import pytest
import torch
import torch.nn.functional as F

import sparsecore.kernels.spmm as spmm_mod
from helpers import assert_close_to_ref, nonzero_randn
from sparsecore.backends import Backend, BackendUnavailable, ConvParams, resolve
from sparsecore.formats import UnstructuredWeight
from sparsecore.kernels.spmm import spmm, spmm_ref

pytestmark = pytest.mark.interpreter  # Triton on CPU tensors; the gpu-marked tests here run on CUDA

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


pytestmark = pytest.mark.usefixtures("poisoned")  # every launcher buffer starts as NaN


def _problem(m, n, k, sparsity, dtype, g, device="cpu", tile_n=16, tile_k=32, bias=True):
    w = nonzero_randn(n, k, dtype=dtype, generator=g)
    mask = torch.rand(n, k, generator=g) >= sparsity
    x = nonzero_randn(m, k, dtype=dtype, generator=g)
    b = nonzero_randn(n, dtype=dtype, generator=g) if bias else None
    p = UnstructuredWeight.from_dense(w, mask, tile_n=tile_n, tile_k=tile_k).to(device)
    ref = x.double() @ torch.where(mask, w, 0).double().t()
    if b is not None:
        ref += b.double()
    return p, x.to(device), None if b is None else b.to(device), ref.to(device)


def _run(p, x, b, **kw):
    return spmm(x, p.bitmap, p.values, p.tile_offsets, p.n, b, **kw)


# M = 1, 2: register-reduction path; M = 3, 5: tl.dot on a 16-row block. N, K cut tiles (16 x 32) unevenly.
@pytest.mark.parametrize("m, n, k, bias", [(1, 7, 70, True), (2, 33, 19, False), (3, 33, 70, True),
                                           (5, 33, 70, True), (1, 33, 70, False)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_spmm_matches_float64(seeded, dtype, sparsity, m, n, k, bias):
    p, x, b, ref = _problem(m, n, k, sparsity, dtype, seeded, bias=bias)
    out = _run(p, x, b)
    assert out.dtype == dtype and out.shape == (m, n)
    assert_close_to_ref(out, ref, k)


@pytest.mark.parametrize("split_k", [2, 5])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_split_k_accumulates_every_chunk(seeded, dtype, split_k):
    # K = 140 -> 5 tiles of 32: split 2 and 3 give uneven chunks, 5 one tile each.
    p, x, b, ref = _problem(3, 20, 140, 0.7, dtype, seeded)
    assert_close_to_ref(_run(p, x, b, split_k=split_k), ref, 140)


def test_autotuned_split_k_config_zeroes_and_casts_workspace(seeded, monkeypatch):
    """The autotuned path with a split-K config: its pre-hook zeroes the (NaN-poisoned) workspace and
    the launcher casts the workspace into the output. (The interpreter otherwise tunes nothing.)"""
    import triton
    config = triton.Config({"SPLIT_K": 2}, num_warps=4, num_stages=1, pre_hook=spmm_mod._zero_workspace)
    monkeypatch.setattr(spmm_mod._spmm_autotuned, "configs", [config])
    p, x, b, ref = _problem(2, 20, 100, 0.5, torch.float16, seeded)
    assert_close_to_ref(_run(p, x, b), ref, 100)
    assert spmm_mod._spmm_autotuned.best_config is config


@pytest.mark.parametrize("m", [1, 2, 17])  # decode (1 and 2-row blocks) and a 32-row tl.dot block
@pytest.mark.parametrize("tiles", [(16, 256), (32, 64), (64, 128)])
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("k", [90, 128])  # 128: whole K tiles for 32- to 128-wide tiles (no K mask on x)
def test_multi_word_tiles(seeded, tiles, m, sparsity, k):
    """Tiles of several bitmap words per row: each word's first slot comes from the words before it (scan
    over the tile's words), sparsity 0 sets bit 31, the int32 sign bit, in every word, and N = 40 leaves
    the last tile row partial."""
    p, x, b, ref = _problem(m, 40, k, sparsity, torch.float16, seeded, tile_n=tiles[0], tile_k=tiles[1])
    assert_close_to_ref(_run(p, x, b), ref, k)


def test_decode_configs_bound_accumulators_per_thread():
    """The autotuner never tries a decode config holding more than 64 fp32 accumulators per thread (when a
    config within 64 exists), and keeps every config for the tensor-core path."""
    configs = spmm_mod._configs(interpret=False)
    for block_m, tile_n, tile_k, warps in [(1, 16, 256, {4, 8}), (2, 16, 256, {4, 8}), (4, 16, 256, {8}),
                                           (4, 32, 256, {8})]:
        kept = spmm_mod._prune(configs, {"n_k_tiles": 16}, BLOCK_M=block_m, TILE_N=tile_n, TILE_K=tile_k)
        assert {c.num_warps for c in kept} == warps, (block_m, tile_n, tile_k)
        assert {c.kwargs["SPLIT_K"] for c in kept} == {1, 2, 4, 8}
    assert len(spmm_mod._prune(configs, {"n_k_tiles": 16}, BLOCK_M=16, TILE_N=16, TILE_K=256)) == len(configs)
    kept = spmm_mod._prune(configs, {"n_k_tiles": 2}, BLOCK_M=16, TILE_N=16, TILE_K=256)
    assert {c.kwargs["SPLIT_K"] for c in kept} == {1, 2}


def test_empty_rows_zero_tiles_and_strided_x(seeded):
    w = nonzero_randn(33, 70, dtype=torch.float16, generator=seeded)
    mask = torch.rand(33, 70, generator=seeded) < 0.5
    mask[[0, 5, 32]] = False          # empty rows, the last one alone in its tile row
    mask[16:32, 32:64] = False        # one whole tile
    p = UnstructuredWeight.from_dense(w, mask, tile_n=16, tile_k=32)
    x = nonzero_randn(70, 3, dtype=torch.float16, generator=seeded).t()  # (3, 70), strides (1, 3)
    b = nonzero_randn(33, dtype=torch.float16, generator=seeded)
    ref = x.double() @ torch.where(mask, w, 0).double().t() + b.double()
    out = _run(p, x, b)
    assert_close_to_ref(out, ref, 70)
    assert torch.equal(out[:, 32], b[32].expand(3))  # an empty row yields exactly its bias


def test_zero_sized(seeded):
    p, x, b, _ = _problem(1, 7, 19, 0.5, torch.float16, seeded)
    assert _run(p, x[:0], b).shape == (0, 7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_float64(seeded, dtype):
    p, x, b, ref = _problem(3, 33, 70, 0.8, dtype, seeded)
    out = spmm_ref(x, p.bitmap, p.values, p.tile_offsets, p.n, b)
    assert out.dtype == dtype
    assert_close_to_ref(out, ref, 70)


def test_bad_inputs(seeded, monkeypatch):
    p, x, b, _ = _problem(2, 33, 70, 0.5, torch.float16, seeded)
    args = (p.bitmap, p.values, p.tile_offsets, p.n)
    with pytest.raises(ValueError, match="x must be 2-D"):
        spmm(x[0], *args)
    with pytest.raises(TypeError, match="values must be 1-D torch.float32"):
        spmm(x.float(), *args)
    with pytest.raises(TypeError, match="x dtype must be"):
        spmm(x.double(), *args)
    with pytest.raises(ValueError, match="x has K=128"):
        spmm(torch.zeros(2, 128, dtype=torch.float16), *args)
    with pytest.raises(ValueError, match="n=50 does not match"):
        spmm(x, p.bitmap, p.values, p.tile_offsets, 50)
    with pytest.raises(ValueError, match=r"bias must be torch.float16 \[33\]"):
        spmm(x, *args, b[:32])
    with pytest.raises(ValueError, match="bias must be"):
        spmm(x, *args, b.float())
    with pytest.raises(TypeError, match="tile_offsets must be int32"):
        spmm(x, p.bitmap, p.values, p.tile_offsets.long(), p.n)
    with pytest.raises(TypeError, match="bitmap must be int32"):
        spmm(x, p.bitmap.long(), p.values, p.tile_offsets, p.n)
    strided = torch.zeros(p.bitmap.shape[:-1] + (2,), dtype=torch.int32)[..., :1]
    with pytest.raises(ValueError, match="bitmap must be contiguous"):
        spmm(x, strided, p.values, p.tile_offsets, p.n)
    with pytest.raises(ValueError, match="split_k must be a positive int"):
        spmm(x, *args, split_k=0)
    monkeypatch.setattr(spmm_mod, "_INTERPRET", False)
    with pytest.raises(ValueError, match="Triton needs CUDA tensors"):
        spmm(x, *args)


def test_custom_op_schema_and_fake(seeded):
    p, x, b, ref = _problem(3, 33, 70, 0.5, torch.float16, seeded)
    args = (x, p.bitmap, p.values, p.tile_offsets, p.n, b, 0)
    torch.library.opcheck(torch.ops.sparsecore.spmm.default, args, test_utils=("test_schema", "test_faketensor"))
    assert_close_to_ref(torch.ops.sparsecore.spmm(*args), ref, 70)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = torch.ops.sparsecore.spmm(mode.from_tensor(x), p.bitmap, p.values, p.tile_offsets, p.n, None, 0)
    assert fake.shape == (3, 33) and fake.dtype == torch.float16


def test_torch_compile_sees_one_opaque_op(seeded):
    import torch._dynamo.testing
    p, x, b, ref = _problem(3, 33, 70, 0.5, torch.float16, seeded)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    fn = torch.compile(lambda x: torch.relu(_run(p, x, b)), backend=counter, fullgraph=True)
    assert_close_to_ref(fn(x), torch.relu(ref), 70)
    code = counter.graphs[0].code
    assert code.count("torch.ops.sparsecore.spmm") == 1 and "triton" not in code


# ---- backends ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [Backend.REFERENCE, Backend.TRITON_SPMM])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_linear_backends_give_masked_dense(seeded, backend, dtype):
    p, x, b, ref = _problem(3, 33, 70, 0.7, dtype, seeded)
    impl = resolve("linear", backend, p, x)
    assert_close_to_ref(impl.run(impl.prepare(p), x, b), ref, 70)


def test_reference_conv2d_gives_masked_dense(seeded):
    w = nonzero_randn(6, 5, 3, 3, generator=seeded)
    mask = torch.rand(w.shape, generator=seeded) < 0.4
    p = UnstructuredWeight.from_dense(w, mask)
    x = nonzero_randn(2, 5, 7, 6, generator=seeded)
    b = nonzero_randn(6, generator=seeded)
    conv = ConvParams(stride=(2, 1), padding=(1, 0))
    impl = resolve("conv2d", Backend.REFERENCE, p, x)
    ref = F.conv2d(x.double(), torch.where(mask, w, 0).double(), b.double(), (2, 1), (1, 0))
    assert_close_to_ref(impl.run(impl.prepare(p), x, b, conv), ref, 45)


def test_backends_refuse_with_reasons(seeded, monkeypatch):
    p, x, _, _ = _problem(2, 33, 70, 0.5, torch.float16, seeded)
    with pytest.raises(BackendUnavailable, match="input dtype torch.float32 differs"):
        resolve("linear", Backend.TRITON_SPMM, p, x.float())
    conv_p = UnstructuredWeight.from_dense(torch.ones(4, 2, 3, 3), torch.ones(4, 2, 3, 3, dtype=torch.bool))
    with pytest.raises(BackendUnavailable, match="linear needs a 2-D weight"):
        resolve("linear", Backend.REFERENCE, conv_p, torch.ones(1, 18))
    with pytest.raises(BackendUnavailable, match="conv2d needs a 4-D weight"):
        resolve("conv2d", Backend.REFERENCE, p, torch.ones(1, 70, 1, 1, dtype=torch.float16))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="Triton needs a CUDA tensor"):
        resolve("linear", Backend.TRITON_SPMM, p, x)


# ---- GPU (skipped without CUDA) -----------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16, 64, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_gpu_llama_shape_autotuned(seeded, m, dtype, sparsity):
    p, x, b, ref = _problem(m, 4096, 4096, sparsity, dtype, seeded, device="cuda", tile_n=16, tile_k=256)
    assert_close_to_ref(_run(p, x, b), ref, 4096)


@pytest.mark.gpu
@pytest.mark.parametrize("split_k", [1, 2, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tiles", [(16, 256), (64, 128), (16, 512)])
def test_gpu_odd_shapes_every_path(seeded, split_k, dtype, tiles):
    for m in (1, 3, 5, 17, 70):
        p, x, b, ref = _problem(m, 1001, 777, 0.8, dtype, seeded, device="cuda", tile_n=tiles[0], tile_k=tiles[1])
        assert_close_to_ref(_run(p, x, b, split_k=split_k), ref, 777)


@pytest.mark.gpu
def test_gpu_torch_compile_treats_spmm_as_one_op(seeded):
    p, x, b, ref = _problem(4, 512, 768, 0.9, torch.float16, seeded, device="cuda")
    fn = torch.compile(lambda x: torch.relu(_run(p, x, b)), fullgraph=True)
    assert_close_to_ref(fn(x), torch.relu(ref), 768)
