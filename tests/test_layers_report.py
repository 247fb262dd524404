"""Layer support (nn.Linear subclasses, GPT-2 Conv1D, MHA, grouped Conv2d), skip reasons and the report."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecore as sc
from sparsecore import layers
from helpers import assert_close_to_ref


def _gpt2(seed: int):
    transformers = pytest.importorskip("transformers", reason="GPT-2 Conv1D tests need transformers (test extra)")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=101,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Model(cfg).eval(), transformers


def test_gpt2_conv1d_layers_become_sparse_and_match_masked_float64(seeded, tmp_path):
    model, transformers = _gpt2(int(torch.randint(0, 2**31, (1,), generator=seeded)))
    ids = torch.randint(0, 101, (2, 7), generator=seeded)
    config = sc.SparsityConfig("nm", n=2, m=4)
    masks = sc.magnitude_masks(model, config)
    assert len(masks) == 8  # c_attn, c_proj, c_fc, mlp.c_proj in each of 2 blocks
    ref = copy.deepcopy(model).double()
    for fqn, mask in masks.items():
        conv = model.get_submodule(fqn)
        assert tuple(mask.shape) == tuple(conv.weight.shape)  # [nx, nf], like the weight
        groups = mask.t().reshape(conv.nf, -1, 4).sum(-1)     # N:M runs along K = nx
        assert torch.equal(groups, torch.full_like(groups, 2))
        ref.get_submodule(fqn).weight.data *= mask
    sparse = sc.sparsify(model, config, masks=masks)
    convs = {f: m for f, m in sparse.named_modules() if isinstance(m, sc.SparseConv1D)}
    assert set(convs) == set(masks)
    assert convs["h.0.attn.c_attn"].nf == 192 and convs["h.0.attn.c_attn"].nx == 64
    with torch.no_grad():
        out = sparse(ids).last_hidden_state
        want = ref(ids).last_hidden_state
    assert_close_to_ref(out, want, 256)
    path = sc.save(sparse, tmp_path / "gpt2.safetensors")
    skeleton, _ = _gpt2(1)
    loaded = sc.load(path, skeleton)
    assert all(isinstance(loaded.get_submodule(f), sc.SparseConv1D) for f in masks)
    a, b = sparse.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_multihead_attention_out_proj_is_skipped_with_reason_never_wrong(seeded):
    enc = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0).eval()
    sparse = sc.sparsify(copy.deepcopy(enc), sc.SparsityConfig("unstructured", 0.5))
    rep = sc.last_report(sparse)
    assert rep.layer("self_attn.out_proj").status == "skipped"
    assert "MultiheadAttention" in rep.layer("self_attn.out_proj").reason
    assert rep.layer("self_attn").status == "skipped"
    assert {r.fqn for r in rep.sparse} == {"linear1", "linear2"}
    with pytest.raises(ValueError, match="MultiheadAttention"):
        sc.sparsify(copy.deepcopy(enc), sc.SparsityConfig("unstructured", 0.5),
                    masks={"self_attn.out_proj": torch.ones(32, 32, dtype=torch.bool)})


class _Scaled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_linear_subclasses_kept_forward_supported_overridden_skipped(seeded):
    quant = nn.modules.linear.NonDynamicallyQuantizableLinear(16, 8)
    model = nn.Sequential(quant, nn.ReLU(), _Scaled(8, 8), nn.Linear(8, 4))
    x = torch.randn(3, 16, generator=seeded)
    masks = sc.magnitude_masks(model, sc.SparsityConfig("unstructured", 0.5))
    assert set(masks) == {"0", "3"}
    ref = copy.deepcopy(model).double()
    for f, m in masks.items():
        ref.get_submodule(f).weight.data *= m
    sparse = sc.sparsify(model, sc.SparsityConfig("unstructured", 0.5), masks=masks)
    assert isinstance(sparse[0], sc.SparseLinear) and isinstance(sparse[2], _Scaled)
    assert "overrides nn.Linear.forward" in sc.last_report(sparse).layer("2").reason
    with torch.no_grad():
        assert_close_to_ref(sparse(x), ref(x.double()), 16)


def test_output_layer_excluded_from_channel_pruning_unless_opted_in(seeded):
    def make():
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    cfg = sc.SparsityConfig("channel", 0.5)
    masks = sc.magnitude_masks(make(), cfg)
    assert set(masks) == {"0", "2"}
    sparse = sc.sparsify(make(), cfg)
    assert "output layer" in sc.last_report(sparse).layer("4").reason
    assert isinstance(sparse[4], nn.Linear) and not isinstance(sparse[4], sc.SparseLinear)
    assert set(sc.magnitude_masks(make(), cfg, prune_output=True)) == {"0", "2", "4"}
    assert isinstance(sc.sparsify(make(), cfg, prune_output=True)[4], sc.SparseLinear)


def test_grouped_conv_nm_sparsified_depthwise_and_stem_skipped_with_reason(seeded):
    model = nn.Sequential(nn.Conv2d(3, 16, 7, padding=3), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                          nn.Conv2d(16, 32, 3, padding=1, groups=4), nn.Conv2d(32, 8, 1))
    x = torch.randn(2, 3, 9, 9, generator=seeded)
    cfg = sc.SparsityConfig("nm", n=2, m=4)
    masks = sc.magnitude_masks(model, cfg)
    assert set(masks) == {"2", "3"}  # grouped conv: K = 4 * 3 * 3 = 36
    ref = copy.deepcopy(model).double()
    for f, m in masks.items():
        ref.get_submodule(f).weight.data *= m
    sparse = sc.sparsify(model, cfg, masks=masks)
    rep = sc.last_report(sparse)
    assert "K = 147" in rep.layer("0").reason and "K = 9" in rep.layer("1").reason
    assert isinstance(sparse[2], sc.SparseConv2d) and sparse[2].conv.groups == 4
    with torch.no_grad():
        assert_close_to_ref(sparse(x), ref(x.double()), 300)


def test_report_kept_fractions_and_file_report_agree(seeded, tmp_path):
    model = nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 8), nn.Conv1d(1, 1, 1))
    masks = {"0": torch.rand(24, 40, generator=seeded) > 0.7, "2": torch.rand(8, 24, generator=seeded) > 0.4}
    sparse = sc.sparsify(model, sc.SparsityConfig("unstructured"), masks=masks)
    rep = sc.last_report(sparse)
    for f, m in masks.items():
        assert rep.layer(f).kept == int(m.sum()) / m.numel()
        assert rep.layer(f).pattern == "unstructured" and rep.layer(f).shape == tuple(m.shape)
    assert "no sparse twin" in rep.layer("3").reason
    rows = rep.to_rows()
    assert [r["layer"] for r in rows] == ["0", "2", "3"] and all(set(r) == set(sc.report.COLUMNS) for r in rows)
    assert "2 sparse, 1 skipped" in rep.format_table()
    sparse[:3](torch.randn(5, 40, generator=seeded))  # runs dense unplanned: the layers become dense-held
    assert [sc.last_report(sparse).layer(f).kept for f in masks] == [rep.layer(f).kept for f in masks]
    frep = sc.file_report(sc.save(sparse, tmp_path / "m.safetensors"))
    assert [(r.fqn, r.pattern, r.shape) for r in frep.layers] == [(r.fqn, r.pattern, r.shape) for r in rep.sparse]
    for r in frep.layers:
        assert r.kept == int(masks[r.fqn].sum()) / masks[r.fqn].numel()


def test_layers_helpers_reject_nothing_silently():
    assert layers.skip_reason(nn.Conv2d(3, 3, 3, padding_mode="reflect"), "unstructured") is not None
    assert layers.skip_reason(nn.Linear(6, 4), "nm") == "N:M needs K % 4 == 0; K = 6"
    assert layers.skip_reason(nn.Linear(8, 4), "nm") is None


def test_output_layer_is_a_head_not_a_residual_blocks_last_projection():
    from sparsecore.models.transformer import DecoderBlock
    assert layers.output_layer(DecoderBlock(32, 48, 2)) is None  # down_proj feeds the residual stream
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 8), nn.Linear(8, 5))
    assert layers.output_layer(cnn) == "3"
