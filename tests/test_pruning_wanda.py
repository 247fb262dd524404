"""Wanda one-shot pruning against an independent float64 reference of the scores; exact mask counts."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecore as sc
from sparsecore.pruning.wanda import wanda_masks


def _mlp(g):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
    return nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 16), nn.Tanh(), nn.Linear(16, 12))


@torch.no_grad()
def _ref_scores(model, batches):
    """float64 scores computed by hand: each layer's inputs through the dense model, feature norms, |W| * norm."""
    xs = [b.double() for b in batches]
    w0, b0 = model[0].weight.double(), model[0].bias.double()
    w2, b2 = model[2].weight.double(), model[2].bias.double()
    h1 = [torch.relu(x @ w0.T + b0) for x in xs]
    h2 = [torch.tanh(h @ w2.T + b2) for h in h1]
    out = {}
    for fqn, inputs in (("0", xs), ("2", h1), ("4", h2)):
        feats = torch.cat(inputs)  # [tokens, in]
        norm = torch.sqrt((feats * feats).sum(0))
        out[fqn] = model.get_submodule(fqn).weight.detach().double().abs() * norm[None, :]
    return out


def _ref_row_mask(scores, sparsity):
    k = scores.shape[1] - round(scores.shape[1] * sparsity)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    for i in range(scores.shape[0]):
        idx = sorted(range(scores.shape[1]), key=lambda j: -float(scores[i, j]))[:k]
        mask[i, idx] = True
    return mask


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_unstructured_masks_match_float64_reference_per_row(sparsity, seeded):
    model = _mlp(seeded)
    batches = [torch.randn(5, 24, generator=seeded) * torch.linspace(0.1, 3, 24) for _ in range(3)]
    masks = wanda_masks(model, batches, sc.SparsityConfig("unstructured", sparsity))
    ref = _ref_scores(model, batches)
    assert set(masks) == {"0", "2", "4"}
    for fqn, mask in masks.items():
        k = mask.shape[1] - round(mask.shape[1] * sparsity)
        assert torch.equal(mask.sum(1), torch.full((mask.shape[0],), k))  # exact per-row counts
        assert torch.equal(mask, _ref_row_mask(ref[fqn], sparsity))


def test_nm_masks_keep_the_top_n_scores_per_group(seeded):
    model = _mlp(seeded)
    batches = [(torch.randn(7, 24, generator=seeded) * torch.linspace(3, 0.1, 24),)]  # tuple: positional inputs
    masks = wanda_masks(model, batches, sc.SparsityConfig("nm", n=2, m=4))
    ref = _ref_scores(model, [b[0] for b in batches])
    for fqn, mask in masks.items():
        s = ref[fqn].reshape(mask.shape[0], -1, 4)
        want = torch.zeros_like(s, dtype=torch.bool)
        top = s.argsort(dim=-1, descending=True)[..., :2]
        want.scatter_(-1, top, True)
        assert torch.equal(mask, want.reshape(mask.shape))
        assert torch.equal(mask.reshape(mask.shape[0], -1, 4).sum(-1), torch.full(s.shape[:2], 2))


def test_activation_scale_changes_the_choice_where_magnitude_cannot(seeded):
    # Feature 0 carries 100x the activation of feature 1: Wanda keeps a smaller weight on feature 0.
    lin = nn.Linear(2, 1, bias=False)
    lin.weight.data = torch.tensor([[0.1, 1.0]])
    x = torch.randn(16, 2, generator=seeded) * torch.tensor([100.0, 1.0])
    cfg = sc.SparsityConfig("unstructured", 0.5)
    assert wanda_masks(nn.Sequential(lin), [x], cfg)["0"].tolist() == [[True, False]]
    assert sc.magnitude_masks(nn.Sequential(lin), cfg)["0"].tolist() == [[False, True]]


def test_grouped_conv_scores_use_each_groups_input_channels(seeded):
    conv = nn.Conv2d(6, 4, 3, groups=2, padding=1)
    x = torch.randn(3, 6, 5, 5, generator=seeded) * torch.arange(1, 7).view(1, 6, 1, 1)
    masks = wanda_masks(nn.Sequential(conv), [x], sc.SparsityConfig("unstructured", 0.5))
    norm = x.double().pow(2).sum(dim=(0, 2, 3)).sqrt()  # [6]
    ref = torch.empty(4, 3, 3, 3, dtype=torch.float64)
    for o in range(4):  # noqa: SIM113
        g = o // 2
        for c in range(3):
            ref[o, c] = conv.weight[o, c].detach().double().abs() * norm[g * 3 + c]
    mat = ref.permute(0, 2, 3, 1).reshape(4, -1)
    want = _ref_row_mask(mat, 0.5).reshape(4, 3, 3, 3).permute(0, 3, 1, 2)
    assert torch.equal(masks["0"], want)


def test_masks_feed_sparsify_and_bad_input_raises(seeded):
    model = _mlp(seeded)
    x = torch.randn(4, 24, generator=seeded)
    cfg = sc.SparsityConfig("unstructured", 0.5)
    masks = wanda_masks(model, [x], cfg)
    ref = {f: model.get_submodule(f).weight.detach() * m for f, m in masks.items()}
    sparse = sc.sparsify(model, cfg, masks=masks)
    for f, w in ref.items():
        assert torch.equal(sparse.get_submodule(f).dense_weight(), w)
    with pytest.raises(ValueError, match="no batches"):
        wanda_masks(_mlp(seeded), [], cfg)
    with pytest.raises(ValueError, match="scope"):
        wanda_masks(_mlp(seeded), [x], sc.SparsityConfig("unstructured", 0.5, scope="global"))
    with pytest.raises(TypeError, match="calibration batch"):
        wanda_masks(_mlp(seeded), ["text"], cfg)
