"""sparsecore.attention: the fused CPU attention inside a transformers BERT, chosen only where it measures faster."""
from __future__ import annotations

import pytest
import torch

import sparsecore as sc
from sparsecore import attention as sca
from sparsecore.backends.registry import compiler_why_not

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.masking_utils")
kattn = pytest.importorskip("sparsecore.kernels.cpu.attention")


@pytest.fixture(scope="module")
def built() -> None:
    reason = compiler_why_not(torch.empty(0))
    if reason is not None:
        pytest.skip(reason)
    assert kattn.why_unavailable() is None


def _tiny_bert(seed: int, heads: int = 4, hidden: int = 80) -> torch.nn.Module:
    torch.manual_seed(seed)  # BertModel draws its random weights from the global generator
    cfg = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                                  intermediate_size=96, vocab_size=100, max_position_embeddings=64,
                                  attn_implementation="sdpa")
    return transformers.BertModel(cfg).eval()


def _batch(g: torch.Generator, B: int = 3, S: int = 37) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 100, (B, S), generator=g)
    am = torch.ones(B, S, dtype=torch.long)
    am[1, 20:] = 0  # padding keys
    am[2, 1:] = 0   # one real token only
    return ids, am


def _out(model, ids, am) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=am).last_hidden_state


def _fake_timing(kernel_ms: float):
    def samples(fns, warmup=2, rounds=10):
        for fn in fns.values():
            fn()
        return {name: [kernel_ms if name == sca.ATTENTION_NAME else 1.0] * rounds for name in fns}
    return samples


def test_bert_outputs_equal_sdpa(built, seeded):
    """Forced on (no timing): a 2-layer BERT (head_dim 20) with padding gives SDPA's outputs."""
    sdpa_model = _tiny_bert(0)
    model = _tiny_bert(0)
    sca.register_attention()
    model.set_attn_implementation(sca.ATTENTION_NAME)
    ids, am = _batch(seeded)
    calls = []
    real = kattn.attention_bshd
    with pytest.MonkeyPatch.context() as mp:  # count kernel calls: the kernel, not the fallback, ran
        mp.setattr(kattn, "attention_bshd", lambda *a, **k: calls.append(1) or real(*a, **k))
        got = _out(model, ids, am)
    assert len(calls) == 2
    torch.testing.assert_close(got, _out(sdpa_model, ids, am), atol=1e-5, rtol=1e-4)
    assert bool(torch.isfinite(got).all())


def test_use_fast_attention_switches_when_faster(built, seeded, monkeypatch):
    model, ref_model = _tiny_bert(1), _tiny_bert(1)
    ids, am = _batch(seeded)
    monkeypatch.setattr(sca, "interleaved_samples_ms", _fake_timing(0.5))
    choice = sc.use_fast_attention(model, (ids,), {"attention_mask": am}, rounds=10)
    assert choice.chosen == "sparsecore" and choice.previous == "sdpa"
    assert model.config._attn_implementation == "sparsecore"
    assert choice.speedup == pytest.approx(2.0) and choice.spread == (2.0, 2.0)
    assert choice.shapes == ((3, 4, 37, 20),)
    torch.testing.assert_close(_out(model, ids, am), _out(ref_model, ids, am), atol=1e-5, rtol=1e-4)


def test_use_fast_attention_keeps_sdpa_when_not_faster(built, seeded, monkeypatch):
    model = _tiny_bert(2)
    ids, am = _batch(seeded)
    monkeypatch.setattr(sca, "interleaved_samples_ms", _fake_timing(0.98))  # within the 5% margin
    choice = sc.use_fast_attention(model, (ids,), {"attention_mask": am}, rounds=10)
    assert choice.chosen == "sdpa" and model.config._attn_implementation == "sdpa"
    assert "not faster" in choice.reason


def test_use_fast_attention_rejects_disagreeing_output(built, seeded, monkeypatch):
    model = _tiny_bert(3)
    ids, am = _batch(seeded)
    monkeypatch.setattr(kattn, "attention_bshd", lambda q, *a, **k: torch.zeros(
        q.shape[0], q.shape[2], q.shape[1], q.shape[3]))
    choice = sc.use_fast_attention(model, (ids,), {"attention_mask": am}, rounds=10)
    assert choice.chosen == "sdpa" and "differs" in choice.reason


def test_use_fast_attention_without_extension_stays(monkeypatch, seeded):
    model = _tiny_bert(4)
    monkeypatch.setattr(kattn, "_state", {"error": "the native CPU attention kernel could not be built: no c++"})
    choice = sc.use_fast_attention(model, _batch(seeded)[:1])
    assert choice.chosen == "sdpa" and model.config._attn_implementation == "sdpa"
    assert "could not be built" in choice.reason


def test_use_fast_attention_bad_model():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        sc.use_fast_attention(torch.nn.Linear(2, 2))


def test_fallbacks_run_sdpa(built, seeded, monkeypatch):
    """Grad, dropout and bf16 calls run SDPA (the kernel is never called), with SDPA's results."""
    model = _tiny_bert(5)
    sca.register_attention()
    model.set_attn_implementation(sca.ATTENTION_NAME)
    monkeypatch.setattr(kattn, "attention_bshd", lambda *a, **k: pytest.fail("the kernel ran"))
    module = model.encoder.layer[0].attention.self
    q, k, v = (torch.randn(2, 4, 9, 20, generator=seeded) for _ in range(3))
    q.requires_grad_(True)
    out, _ = sca.sparsecore_attention_forward(module, q, k, v, None, scaling=0.3)
    out.sum().backward()
    assert q.grad is not None
    with torch.no_grad():
        ref = sca._sdpa()(module, q, k, v, None, scaling=0.3)[0]
        assert sca.sparsecore_attention_forward(module, q, k, v, None, dropout=0.1)[0].shape == ref.shape
        got = sca.sparsecore_attention_forward(module, q.bfloat16(), k.bfloat16(), v.bfloat16(), None, scaling=0.3)[0]
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), ref, atol=3e-2, rtol=3e-2)


def test_bert_under_torch_compile(built, seeded):
    model, ref_model = _tiny_bert(6), _tiny_bert(6)
    sca.register_attention()
    model.set_attn_implementation(sca.ATTENTION_NAME)
    ids, am = _batch(seeded)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(ids, attention_mask=am).last_hidden_state
    torch.testing.assert_close(got, _out(ref_model, ids, am), atol=1e-5, rtol=1e-4)
