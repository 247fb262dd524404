"""The report after channel slimming: narrowed layers with their kept fractions, and why the others kept width."""
import copy

import pytest
import torch

import sparsecore as sc
from sparsecore import layers
from sparsecore.channel import plan_slim, slim_skipped
from sparsecore.models.resnet import resnet18
from sparsecore.models.transformer import DecoderBlock
from sparsecore.report import REPORT_KEY
from helpers import SENet


def _seed(gen):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))


def test_slimmed_layers_kept_fractions_and_pinned_reasons(seeded):
    _seed(seeded)
    model = SENet().eval()
    x = torch.randn(2, 3, 8, 8, generator=seeded)
    small = sc.sparsify(copy.deepcopy(model), sc.SparsityConfig("channel", 0.5), example_inputs=(x,))
    rep = sc.last_report(small)
    assert [r.fqn for r in rep.layers] == ["c1", "c2", "se", "c3", "fc"]
    # Half of each free group's channels go: c1 keeps 4 of 8 outputs, c3 3 of 6 (reading c1's 4 of 8 inputs);
    # c2 and se keep their outputs (the SE multiply pins them) and lose the inputs c1 dropped; fc reads 3 of c3's
    # 6 channels (16 positions each) plus c2's 8 pooled channels.
    want = {"c1": (4 * 3) / (8 * 3), "c2": (8 * 4) / (8 * 8), "se": (8 * 4) / (8 * 8), "c3": (3 * 4) / (6 * 8),
            "fc": (3 * 16 + 8) / (6 * 16 + 8)}
    for fqn, kept in want.items():
        row = rep.layer(fqn)
        assert row.status == "slimmed" and row.pattern == "channel" and row.kept == pytest.approx(kept, abs=1e-12)
        assert row.dense_shape == tuple(model.get_submodule(fqn).weight.shape)
        assert row.shape == tuple(small.get_submodule(fqn).weight.shape)
    assert rep.layer("c3").layout == "out 3/6 in 4/8" and rep.layer("fc").layout == "out 5/5 in 56/104"
    # Exactly the layers whose output width could not shrink carry a reason, and it says why.
    pinned = slim_skipped(small)
    assert set(pinned) == {"c2", "se", "fc"}
    assert {r.fqn for r in rep.layers if r.reason} == {"c2", "se", "fc"}
    head = layers.select(model, "channel")[1]["fc"][1]
    assert head.startswith("output layer: excluded from channel pruning")
    assert rep.layer("fc").reason == f"{head}; {pinned['fc']}"
    for fqn in ("c2", "se"):
        assert rep.layer(fqn).reason == pinned[fqn] and rep.layer(fqn).reason.startswith("output channels pinned")
    text = rep.format_table()
    assert "0 sparse, 5 slimmed, 0 skipped" in text
    fc_line = next(ln for ln in text.splitlines() if ln.startswith("fc "))
    assert fc_line.split()[2] == "5x104->5x56" and head in fc_line


def test_residual_layer_keeps_width_with_reason_and_file_round_trip(seeded, tmp_path):
    _seed(seeded)
    model = resnet18(10, 8).eval()
    x = torch.randn(1, 3, 32, 32, generator=seeded)
    keep = torch.ones(8, dtype=torch.bool)
    keep[[1, 6]] = False
    half = torch.tensor([True, False] * 4)
    masks = {"layer1.0.conv2": keep, "layer1.1.conv1": half}
    plan = plan_slim(model, masks, x)  # what the slimming decides, computed apart from sparsify
    assert set(plan.residual) == {"layer1.0.conv2"}
    weight_masks = {f: m[:, None, None, None].expand_as(model.get_submodule(f).weight) for f, m in masks.items()}
    small = sc.sparsify(copy.deepcopy(model), sc.SparsityConfig("channel"), masks=weight_masks, example_inputs=(x,))
    rep = sc.last_report(small)
    res = rep.layer("layer1.0.conv2")
    assert res.status == "sparse" and res.pattern == "channel" and res.reason == plan.residual["layer1.0.conv2"]
    assert res.kept == pytest.approx(6 / 8, abs=1e-12) and res.layout == "out 6/8 in 8/8"
    narrowed = rep.layer("layer1.1.conv1")
    assert narrowed.status == "slimmed" and narrowed.kept == pytest.approx(4 / 8, abs=1e-12) and not narrowed.reason
    assert rep.layer("layer1.1.conv2").status == "slimmed" and rep.layer("layer1.1.conv2").layout == "out 8/8 in 4/8"
    assert rep.layer("conv1").status == "skipped" and rep.layer("conv1").reason == "no mask given"
    assert {r.fqn for r in rep.sparse} == {"layer1.0.conv2"}
    path = sc.save(small, tmp_path / "r.safetensors", extra={REPORT_KEY: rep.to_json()})
    frep = sc.file_report(path)
    fields = lambda r: (r.fqn, r.status, r.pattern, r.layout, r.shape, r.dense_shape, r.reason)  # noqa: E731
    assert [fields(r) for r in frep.layers] == [fields(r) for r in rep.layers]
    assert [r.kept for r in frep.layers] == pytest.approx([r.kept for r in rep.layers], abs=1e-12)


def test_decoder_block_reasons_only_on_the_residual_stream_projections(seeded):
    _seed(seeded)
    block = DecoderBlock(dim=48, hidden=40, heads=6).eval()
    x = torch.randn(2, 5, 48, generator=seeded)
    small = sc.sparsify(copy.deepcopy(block), sc.SparsityConfig("channel", 0.5), example_inputs=(x,))
    rep = sc.last_report(small)
    pinned = slim_skipped(small)
    assert {r.fqn for r in rep.layers if r.reason} == set(pinned) == {"attn.o_proj", "down_proj"}
    for fqn in pinned:
        assert rep.layer(fqn).reason == pinned[fqn]
        assert rep.layer(fqn).layout.startswith("out 48/48 in ")  # width kept, inputs follow the kept heads/hidden
    assert rep.layer("up_proj").layout == "out 20/40 in 48/48" and rep.layer("up_proj").kept == pytest.approx(0.5)


def test_report_json_rejects_what_it_did_not_write():
    with pytest.raises(ValueError, match="not a layer report"):
        sc.SparsityReport.from_json([{"layer": "a", "kind": "Linear", "shape": [2, 2], "status": "gone"}])
    with pytest.raises(ValueError, match="not a layer report"):
        sc.SparsityReport.from_json("nope")
