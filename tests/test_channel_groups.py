"""Group-wise channel selection: residual adds, concats and depthwise convs are scored and pruned as one group.

Expected kept channels are computed here by hand from the weights (sum of the members' row L2 norms, top k);
outputs are compared with a hand-built masked model in float64.
"""
import copy

import pytest
import torch
from torch import nn

import sparsecore as sc
from sparsecore.channel import group_channel_masks, masked_reference, slim_skipped, trace_channels
from sparsecore.models.resnet import resnet50


class ResCatDw(nn.Module):
    """stem -> depthwise -> pointwise, added back to the stem's output; then cat with a branch; head conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.branch = nn.Conv2d(8, 6, 1)
        self.head = nn.Conv2d(14, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        y = self.pw(torch.relu(self.dw(s))) + s
        z = torch.cat([y, torch.relu(self.branch(y))], dim=1)
        return self.head(z)


def _l2(m: nn.Module) -> torch.Tensor:
    return m.weight.detach().double().flatten(1).norm(dim=1)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[scores.topk(k).indices] = True
    return keep


def test_residual_depthwise_group_kept_indices_exact(seeded):
    torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=seeded)))
    model = ResCatDw().eval()
    x = torch.randn(2, 3, 9, 7, generator=seeded)
    graph = trace_channels(model, x)
    masks, skipped = group_channel_masks(model, graph, 0.5)
    tied = _top(_l2(model.stem) + _l2(model.dw) + _l2(model.pw), 4)
    assert torch.equal(masks["stem"], tied) and torch.equal(masks["dw"], tied) and torch.equal(masks["pw"], tied)
    assert torch.equal(masks["branch"], _top(_l2(model.branch), 3))
    assert "head" not in masks and "output" in skipped["head"]

    small = sc.sparsify(copy.deepcopy(model), sc.SparsityConfig("channel", 0.5), example_inputs=(x,))
    assert sc.sparse_modules(small) == {}                      # every group agreed: nothing kept wide
    assert small.stem.out_channels == small.dw.out_channels == small.pw.out_channels == 4
    assert small.head.in_channels == 4 + 3
    # the hand-built masked model: pruned rows (and their biases) zeroed
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        for name, keep in masks.items():
            layer = ref.get_submodule(name)
            layer.weight[~keep] = 0
            layer.bias[~keep] = 0
    with torch.no_grad():
        torch.testing.assert_close(small.double()(x.double()), ref(x.double()), rtol=1e-10, atol=1e-10)


def test_filter_fn_exclusion_keeps_the_whole_group_and_says_why():
    model = ResCatDw().eval()
    x = torch.randn(1, 3, 8, 8)
    masks, skipped = group_channel_masks(model, trace_channels(model, x), 0.5, lambda m, f: f != "dw")
    assert not {"stem", "dw", "pw"} & set(masks)
    assert skipped["dw"] == "excluded by filter_fn" and "dw" in skipped["stem"]


def test_every_resnet50_conv_shrinks_and_matches_masked_model(seeded):
    torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=seeded)))
    model = resnet50(num_classes=10, width=8).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(), m.running_mean.normal_(), m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 32, 32, generator=seeded)
    keep_fc = lambda mod, fqn: fqn != "fc"  # noqa: E731
    small = sc.sparsify(copy.deepcopy(model), sc.SparsityConfig("channel", 0.5), filter_fn=keep_fc, example_inputs=(x,))
    convs = [f for f, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert sc.sparse_modules(small) == {}
    for f in convs:
        assert small.get_submodule(f).out_channels == model.get_submodule(f).out_channels // 2, f
    assert small.fc.out_features == 10 and "fc" in slim_skipped(small)
    masks, _ = group_channel_masks(model, trace_channels(model, x), 0.5, keep_fc)
    ref = masked_reference(model, masks, x).double()
    with torch.no_grad():
        torch.testing.assert_close(small.double()(x.double()), ref(x.double()), rtol=1e-9, atol=1e-9)


def test_group_masks_reject_bad_sparsity():
    model = ResCatDw()
    with pytest.raises(ValueError, match="sparsity"):
        group_channel_masks(model, trace_channels(model, torch.randn(1, 3, 8, 8)), 1.5)
