"""Channel slimming: dependency groups, physical removal, masked reference, rounding, block masks.

The reference in most tests is built here by hand, independently of ``sparsecore.channel``: the same
model with each pruned channel's conv/linear weight row and bias zeroed and the BatchNorm that follows
it given gamma = beta = 0, so the channel outputs exactly 0 (eval mode).
"""
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsecore.channel import (apply_plan, channel_groups, channel_weight_masks, masked_reference, plan_slim, slim)
from sparsecore.formats.channel import ChannelWeight
from sparsecore.models.cnn import mobilenet_small, vgg_small
from sparsecore.models.resnet import resnet18, resnet50
from helpers import SENet

X_SHAPE = (1, 3, 32, 32)


def _seed(g: torch.Generator) -> None:
    torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=g)))


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (fresh init has gamma=1, beta=0, mean=0, var=1)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _bn_after(fqn: str) -> str | None:
    """The BN that follows a conv in our models (resnet convN -> bnN, Sequential index +1)."""
    if re.search(r"(^|\.)conv\d$", fqn):
        return re.sub(r"conv(\d)$", r"bn\1", fqn)
    head, _, idx = fqn.rpartition(".")
    return f"{head}.{int(idx) + 1}" if idx.isdigit() else None


@torch.no_grad()
def _hand_reference(model: nn.Module, masks: dict) -> nn.Module:
    import copy
    ref = copy.deepcopy(model)
    mods = dict(ref.named_modules())
    for fqn, keep in masks.items():
        layer = mods[fqn]
        layer.weight[~keep] = 0
        if layer.bias is not None:
            layer.bias[~keep] = 0
        bn = mods.get(_bn_after(fqn))
        if isinstance(bn, nn.BatchNorm2d):
            bn.weight[~keep] = 0
            bn.bias[~keep] = 0
    return ref


def _consistent_masks(model, x, g, keep_frac=0.5):
    masks = {}
    for grp in channel_groups(model, x):
        keep = (torch.rand(grp.n_units, generator=g) < keep_frac) | ~grp.prunable
        keep[torch.randint(grp.n_units, (1,), generator=g)] = True   # never empty a layer
        masks.update(grp.expand(keep))
    return masks


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _assert_same_output(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert bool(yb.abs().max() > 0)
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("builder", [vgg_small, mobilenet_small, lambda: resnet18(10, 16), lambda: resnet50(10, 8)],
                         ids=["vgg", "mobilenet", "resnet18", "resnet50"])
def test_slim_consistent_masks_equals_hand_reference(builder, seeded):
    _seed(seeded)
    model = _randomize_bn(builder())
    x = torch.randn(X_SHAPE, generator=seeded)
    masks = _consistent_masks(model, x, seeded)
    plan = plan_slim(model, masks, x)
    small = apply_plan(model, plan)
    assert plan.residual == {}                                   # every pruned channel could go
    for fqn, keep in masks.items():
        assert small.get_submodule(fqn).weight.shape[0] == int(keep.sum()), fqn
    assert _params(small) == plan.params_after < plan.params_before == _params(model)
    _assert_same_output(small.eval(), _hand_reference(model, masks).eval(), x)


def test_vgg_parameter_count_and_flatten_columns(seeded):
    _seed(seeded)
    model = _randomize_bn(vgg_small())        # convs features.0, 4, 8, 11 (16, 32, 48, 48); fc 192 -> 64 -> 10
    x = torch.randn(X_SHAPE, generator=seeded)
    kept = {"features.0": 5, "features.4": 9, "features.8": 13, "features.11": 7, "classifier.0": 11}
    masks = {f: torch.randperm(model.get_submodule(f).weight.shape[0], generator=seeded) < k for f, k in kept.items()}
    small = slim(model, masks, x)
    expect = (5 * 3 * 9 + 2 * 5) + (9 * 5 * 9 + 2 * 9) + (13 * 9 * 9 + 2 * 13) + (7 * 13 * 9 + 2 * 7) \
        + (11 * 7 * 4 + 11) + (10 * 11 + 10)
    assert _params(small) == expect
    # Flatten of a 2x2 map: classifier.0 keeps columns 4c..4c+3 of each kept channel c.
    cols = masks["features.11"].repeat_interleave(4)
    torch.testing.assert_close(small.classifier[0].weight,
                               model.classifier[0].weight[masks["classifier.0"]][:, cols], rtol=0, atol=0)
    _assert_same_output(small, _hand_reference(model, masks), x)


def test_resnet_groups_couple_residual_adds():
    x = torch.randn(X_SHAPE)
    g18 = {grp.fqns: grp for grp in channel_groups(resnet18(10, 8), x)}
    assert ("conv1", "layer1.0.conv2", "layer1.1.conv2") in g18
    assert ("layer2.0.downsample.0", "layer2.0.conv2", "layer2.1.conv2") in g18
    assert ("layer1.0.conv1",) in g18 and bool(g18[("layer1.0.conv1",)].prunable.all())
    assert not bool(g18[("fc",)].prunable.any())                 # the model output is pinned
    g50 = {grp.fqns: grp for grp in channel_groups(resnet50(10, 8), x)}
    assert ("layer1.0.downsample.0", "layer1.0.conv3", "layer1.1.conv3", "layer1.2.conv3") in g50


def test_disagreeing_residual_keeps_width_and_reports(seeded):
    _seed(seeded)
    model = _randomize_bn(resnet18(10, 8))
    x = torch.randn(X_SHAPE, generator=seeded)
    keep = torch.ones(8, dtype=torch.bool)
    keep[[1, 6]] = False
    internal = torch.tensor([True, False] * 4)
    masks = {"layer1.0.conv2": keep, "layer1.1.conv1": internal}
    plan = plan_slim(model, masks, x)
    small = apply_plan(model, plan)
    assert set(plan.residual) == {"layer1.0.conv2"} and "conv1" in plan.residual["layer1.0.conv2"]
    assert small.layer1[0].conv2.weight.shape[0] == 8             # width kept: conv1, layer1.1.conv2 keep them
    assert torch.equal(plan.residual_masks["layer1.0.conv2"], keep)
    assert bool((small.layer1[0].conv2.weight[~keep] == 0).all())
    assert small.layer1[1].conv1.weight.shape[0] == 4             # an unshared channel set does shrink
    _assert_same_output(small, _hand_reference(model, masks), x)


def test_random_masks_match_masked_reference(seeded):
    # Per-layer random masks disagree across adds and depthwise couplings (ResNet: see the block-mask test).
    _seed(seeded)
    model = _randomize_bn(mobilenet_small())
    x = torch.randn(X_SHAPE, generator=seeded)
    masks = {f: torch.rand(m.out_channels, generator=seeded) < 0.6
             for f, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    plan = plan_slim(model, masks, x)
    small = apply_plan(model, plan)
    assert plan.residual and _params(small) == plan.params_after < plan.params_before
    _assert_same_output(small, masked_reference(model, masks, x), x)


def test_round_to_restores_best_scoring_channels(seeded):
    _seed(seeded)
    model = _randomize_bn(vgg_small())
    x = torch.randn(X_SHAPE, generator=seeded)
    masks = {"features.0": torch.arange(16) % 3 == 0, "features.4": torch.arange(32) < 9}   # 6 and 9 kept
    scores = {"features.0": torch.arange(16.0), "features.4": -torch.arange(32.0)}
    plan = plan_slim(model, masks, x, round_to=8, scores=scores)
    expect0 = masks["features.0"].clone()
    expect0[[14, 13]] = True                       # 6 -> 8: the two best-scoring pruned channels
    expect4 = torch.arange(32) < 16                # 9 -> 16: lowest indices score best
    assert torch.equal(plan.masks["features.0"], expect0) and torch.equal(plan.masks["features.4"], expect4)
    small = apply_plan(model, plan)
    assert small.features[0].out_channels == 8 and small.features[4].out_channels == 16
    _assert_same_output(small, _hand_reference(model, plan.masks), x)


class _CatNet(nn.Module):
    """cat([relu(a(x)), b(x)]) + c(x) -> BN -> relu -> head: concat offsets coupled through an add."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 5, 1)
        self.c, self.bn = nn.Conv2d(3, 11, 1), nn.BatchNorm2d(11)
        self.head = nn.Conv2d(11, 4, 3, padding=1)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), self.b(x)], dim=1) + self.c(x)
        return self.head(F.relu(self.bn(y)))


def test_concat_offsets_and_add(seeded):
    _seed(seeded)
    model = _randomize_bn(_CatNet())
    x = torch.randn(1, 3, 7, 9, generator=seeded)
    (grp,) = [g for g in channel_groups(model, x) if "c" in g.fqns]
    assert grp.fqns == ("a", "b", "c")
    assert torch.equal(grp.unit_of["a"], torch.arange(6)) and torch.equal(grp.unit_of["b"], torch.arange(6, 11))
    assert torch.equal(grp.unit_of["c"], torch.arange(11))
    keep = torch.ones(11, dtype=torch.bool)
    keep[[1, 7]] = False
    masks = grp.expand(keep)
    small = slim(model, masks, x)
    assert (small.a.out_channels, small.b.out_channels, small.c.out_channels) == (5, 4, 9)
    assert small.bn.num_features == 9 and small.head.in_channels == 9
    ref = _hand_reference(model, masks)
    with torch.no_grad():                          # BN after the add is zeroed by hand too
        ref.bn.weight[~keep] = 0
        ref.bn.bias[~keep] = 0
    _assert_same_output(small, ref, x)


def test_grouped_conv_is_pinned(seeded):
    _seed(seeded)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 9, 9, generator=seeded)
    groups = {g.fqns: g for g in channel_groups(model, x)}
    assert not bool(groups[("0",)].prunable.any()) and not bool(groups[("2",)].prunable.any())
    masks = {"0": torch.arange(8) % 2 == 0}
    plan = plan_slim(model, masks, x)
    assert plan.keep_out == {} and "0" in plan.residual
    _assert_same_output(apply_plan(model, plan), _hand_reference(model, masks), x)


def test_block_masks_pack_losslessly(seeded):
    _seed(seeded)
    model = _randomize_bn(resnet18(10, 8))
    x = torch.randn(X_SHAPE, generator=seeded)
    masks = {f: torch.rand(m.out_channels, generator=seeded) < 0.6
             for f, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    ref = masked_reference(model, masks, x)
    blocks = channel_weight_masks(model, masks, x)
    assert {f for f, m in masks.items() if not bool(m.all())} <= set(blocks)  # a layer keeping every channel needs none
    for fqn, block in blocks.items():
        w = ref.get_submodule(fqn).weight.detach()
        packed = ChannelWeight.from_dense(w, block)
        assert torch.equal(packed.to_dense(), w), fqn         # the block mask covers every non-zero
        if fqn in masks:
            assert torch.equal(packed.out_idx.long(), masks[fqn].nonzero().flatten())
    # Residual layers of the slimmed model get block masks in slimmed coordinates.
    plan = plan_slim(model, masks, x)
    small = apply_plan(model, plan)
    small_blocks = channel_weight_masks(small, plan.residual_masks, x)
    for fqn in plan.residual:
        w = small.get_submodule(fqn).weight.detach()
        assert torch.equal(ChannelWeight.from_dense(w, small_blocks[fqn]).to_dense(), w)


def test_bad_masks_raise():
    model = vgg_small()
    x = torch.randn(X_SHAPE)
    with pytest.raises(ValueError, match="not a traced Conv2d/Linear"):
        plan_slim(model, {"features.1": torch.ones(16, dtype=torch.bool)}, x)     # a BatchNorm
    with pytest.raises(ValueError, match=r"must be a bool tensor of shape \(16,\)"):
        plan_slim(model, {"features.0": torch.ones(15, dtype=torch.bool)}, x)
    with pytest.raises(ValueError, match="must be a bool tensor"):
        plan_slim(model, {"features.0": torch.ones(16)}, x)
    with pytest.raises(ValueError, match="round_to"):
        plan_slim(model, {}, x, round_to=0)


def test_view_flatten_and_unknown_ops(seeded):
    _seed(seeded)
    model = SENet().eval()
    x = torch.randn(1, 3, 8, 8, generator=seeded)
    prunable = {g.fqns: bool(g.prunable.all()) for g in channel_groups(model, x)}
    assert prunable == {("c1",): True, ("c2",): False, ("se",): False, ("c3",): True, ("fc",): False}
    masks = {"c1": torch.arange(8) % 2 == 0, "c2": torch.arange(8) < 4, "c3": torch.arange(6) < 3}
    plan = plan_slim(model, masks, x)
    small = apply_plan(model, plan)
    assert set(plan.residual) == {"c2"} and "cannot see through" in plan.residual["c2"]
    assert small.c3.out_channels == 3 and small.fc.in_features == 3 * 16 + 8
    _assert_same_output(small, masked_reference(model, masks, x), x)
    _assert_same_output(small, _hand_reference(model, masks), x)
