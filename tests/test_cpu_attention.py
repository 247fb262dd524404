"""Fused CPU attention (kernels/cpu/attention*.cpp): every ISA path against a float64 softmax(q k^T s + mask) v.

The extension is built once per session (cached across sessions by torch's extension cache). Without a C++
compiler these tests skip with that reason; with one, a failed build fails them.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparsecore.backends.registry import compiler_why_not

attn = pytest.importorskip("sparsecore.kernels.cpu.attention")

ATOL, RTOL = 2e-5, 1e-4  # fp32 outputs of magnitude ~1 against float64; the kernels' error is ~1e-6

# (B, H, Sq, Sk, D, Dv): D in {16, 32, 48, 64, 80, 128}; S not a multiple of 16; Sk > 256 takes several key
# chunks (online softmax) on the AVX-512 path; Sq > 32 several query blocks; one Dv != D.
SHAPES = [(2, 3, 37, 37, 16, 16), (1, 2, 1, 19, 32, 32), (3, 2, 45, 130, 48, 48), (2, 1, 33, 300, 64, 64),
          (1, 4, 70, 33, 80, 80), (1, 2, 20, 50, 128, 128), (2, 2, 17, 529, 32, 24)]


@pytest.fixture(scope="session")
def isas() -> tuple[str, ...]:
    reason = compiler_why_not(torch.empty(0))
    if reason is not None:
        pytest.skip(reason)
    reason = attn.why_unavailable()
    assert reason is None, reason
    return attn.available_isas()


@pytest.fixture(params=attn.ATTENTION_ISAS)
def isa(request, isas) -> str:
    if request.param not in isas:
        pytest.skip(f"this CPU cannot run the {request.param} attention path (it runs {isas})")
    return request.param


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _bert_qkv(B: int, H: int, S: int, D: int, Dv: int, Sk: int, g: torch.Generator):
    """q/k/v as transformers' BERT passes them: [B, S, H, D] projections transposed to [B, H, S, D]."""
    q = torch.randn(B, S, H, D, generator=g).transpose(1, 2)
    k = torch.randn(B, Sk, H, D, generator=g).transpose(1, 2)
    v = torch.randn(B, Sk, H, Dv, generator=g).transpose(1, 2)
    return q, k, v


def _masks(B: int, H: int, Sq: int, Sk: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    pad = torch.ones(B, Sk, dtype=torch.bool)
    for b in range(B):
        pad[b, int(torch.randint(1, Sk + 1, (1,), generator=g)):] = False  # padding: the last keys of each row
    if B > 1:
        pad[-1] = False  # a batch row with every key masked: zeros
    rows = torch.rand(B, 1, Sq, Sk, generator=g) > 0.3
    rows[:, :, Sq // 2] = False  # a query row with every key masked: zeros, as SDPA gives
    additive = torch.randn(B, 1, 1, Sk, generator=g)
    additive[..., : max(1, Sk // 4)] = float("-inf")
    per_head = torch.randn(1, H, Sq, Sk, generator=g)
    strided = torch.randn(Sk, Sq, generator=g).t()  # [Sq, Sk] with non-unit key stride
    float_pad = torch.zeros(B, 1, 1, Sk).masked_fill_(~pad[:, None, None, :], float("-inf"))
    return {"padding": pad[:, None, None, :], "padding_rows": pad[:, None, None, :].expand(B, 1, Sq, Sk).clone(),
            "float_padding": float_pad, "rows": rows, "additive": additive, "per_head": per_head,
            "strided": strided}


def _check(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert bool(torch.isfinite(out).all()), "output has NaN/Inf (unwritten elements)"
    torch.testing.assert_close(out.double(), ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference(shape, isa, threads, seeded, poisoned):
    B, H, Sq, Sk, D, Dv = shape
    q, k, v = _bert_qkv(B, H, Sq, D, Dv, Sk, seeded)
    _check(attn.attention(q, k, v, isa=isa), attn.attention_ref(q, k, v))
    scale = 0.37
    for name, mask in _masks(B, H, Sq, Sk, seeded).items():
        out = attn.attention(q, k, v, attn_mask=mask, scale=scale, isa=isa)
        _check(out, attn.attention_ref(q, k, v, mask, scale=scale))
    _check(attn.attention(q, k, v, is_causal=True, isa=isa), attn.attention_ref(q, k, v, is_causal=True))


def test_layouts_and_copies(isa, seeded, poisoned):
    B, H, S, D = 2, 3, 41, 32
    base = torch.randn(B, H, S, 2 * D, generator=seeded)
    q = base[..., ::2]                          # non-unit last stride: the launcher copies
    k = torch.randn(B, H, S, D, generator=seeded)  # contiguous [B, H, S, D]
    v = torch.randn(H, B, S, D, generator=seeded).transpose(0, 1)  # batch and head strides swapped
    assert attn.needs_copy(q) and not attn.needs_copy(k) and not attn.needs_copy(v)
    out = attn.attention_bshd(q, k, v, isa=isa)
    assert out.shape == (B, S, H, D) and out.is_contiguous()
    _check(out.transpose(1, 2), attn.attention_ref(q, k, v))


def test_agrees_with_torch_sdpa(isa, seeded):
    """Same semantics as F.scaled_dot_product_attention, fully masked rows included (zeros)."""
    q, k, v = _bert_qkv(3, 4, 29, 32, 32, 29, seeded)
    mask = torch.rand(3, 1, 29, 29, generator=seeded) > 0.5
    mask[1, :, 3] = False
    torch.testing.assert_close(attn.attention(q, k, v, attn_mask=mask, isa=isa),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-5, rtol=1e-4)


def test_default_isa_obeys_env(isas, monkeypatch):
    monkeypatch.setenv("SPARSECORE_CPU_ISA", "avx2")
    assert attn.default_isa() == "portable"  # no AVX2 attention path: capped at the plainer one
    monkeypatch.setenv("SPARSECORE_CPU_ISA", "sse")
    with pytest.raises(ValueError, match="SPARSECORE_CPU_ISA"):
        attn.default_isa()
    monkeypatch.delenv("SPARSECORE_CPU_ISA")
    assert attn.default_isa() == isas[-1]


def test_under_torch_compile_fullgraph(isas, seeded):
    q, k, v = _bert_qkv(2, 3, 21, 48, 48, 21, seeded)
    mask = torch.rand(2, 1, 1, 21, generator=seeded) > 0.2

    def f(q, k, v, mask):
        return attn.attention(q * 1.5, k, v, attn_mask=mask).sum(-1)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    _check(compiled(q, k, v, mask), attn.attention_ref(q * 1.5, k, v, mask).sum(-1))


def test_bad_inputs_raise(isas):
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="dropout_p"):
        attn.attention(q, q, q, dropout_p=0.1)
    with pytest.raises(TypeError, match="float32"):
        attn.attention(q.bfloat16(), q.bfloat16(), q.bfloat16())
    with pytest.raises(ValueError, match="4-D"):
        attn.attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="k must be"):
        attn.attention(q, torch.randn(1, 3, 5, 8), q)
    with pytest.raises(ValueError, match="broadcast"):
        attn.attention(q, q, q, attn_mask=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask"):
        attn.attention(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="is_causal"):
        attn.attention(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.bool), is_causal=True)
    with pytest.raises(ValueError, match="isa"):
        attn.attention(q, q, q, isa="avx2")


def test_no_backward(isas):
    """Inference only: a graph through the op refuses backward instead of returning wrong gradients."""
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    out = attn.attention(q, q.detach(), q.detach())
    with pytest.raises(RuntimeError):
        out.sum().backward()


def test_reference_is_softmax_attention(seeded):
    """The oracle itself, against an explicit per-row loop (float64)."""
    q, k, v = (torch.randn(1, 1, 4, 3, generator=seeded, dtype=torch.float64) for _ in range(3))
    mask = torch.tensor([True, False, True, True])
    ref = attn.attention_ref(q, k, v, mask)
    for i in range(4):
        s = torch.tensor([q[0, 0, i] @ k[0, 0, j] / math.sqrt(3) for j in range(4)])
        s[1] = float("-inf")
        torch.testing.assert_close(ref[0, 0, i], torch.softmax(s, 0) @ v[0, 0])
