"""PDP: midpoint thresholds, soft -> hard mask as tau -> 0, gradients through mask and weight, exact hard counts."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from sparsecore.masks import as_matrix, check_channel, check_nm, keep_n_of_m, keep_topk
from sparsecore.pruning import PDP, pdp_soft_mask, pdp_target, pdp_threshold
from sparsecore.pruning.pdp import _nm_threshold


def _model(g: torch.Generator) -> nn.Module:
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    return nn.Sequential(nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 2 * 2, 20), nn.ReLU(), nn.Linear(20, 5))


def test_threshold_is_midpoint(seeded):
    for _ in range(10):
        v = torch.randn(37, 5, generator=seeded).abs()
        k = int(torch.randint(1, v.numel(), (1,), generator=seeded))
        ref = torch.tensor(sorted(v.reshape(-1).double().tolist(), reverse=True))
        assert float(pdp_threshold(v, k)) == pytest.approx(float((ref[k - 1] + ref[k]) / 2), rel=1e-6)
    with pytest.raises(ValueError, match="k must lie in"):
        pdp_threshold(torch.ones(4), 4)


def test_soft_mask_becomes_hard_mask_as_tau_goes_to_zero(seeded):
    w = torch.randn(9, 24, generator=seeded)
    k = 70
    t = pdp_threshold(w.abs(), k)
    hard = keep_topk(w.abs(), k)
    assert torch.equal(w.abs() >= t, hard)
    soft = pdp_soft_mask(w, t, 1e-12)
    assert torch.equal(soft, hard.float())
    # at a moderate tau the mask is strictly between 0 and 1 near the threshold and ordered by |w|
    warm = pdp_soft_mask(w, t, 0.1 * float(t) ** 2)
    order = torch.argsort(w.abs().reshape(-1))
    assert bool((warm.reshape(-1)[order].diff() >= 0).all())
    assert bool(((warm > 0.01) & (warm < 0.99)).any())


def test_nm_threshold_per_group(seeded):
    w = torch.randn(5, 3, 2, 4, generator=seeded)  # conv: K = 2*4*3 = 24
    t = _nm_threshold(w.abs(), 2, 4)
    soft = pdp_soft_mask(w, t, 1e-12)
    hard = keep_n_of_m(w.abs(), 2, 4)
    assert torch.equal(soft, hard.float())
    groups = as_matrix(w.abs()).reshape(5, 6, 4).sort(-1, descending=True).values
    assert torch.allclose(as_matrix(t).reshape(5, 6, 4)[..., 0], (groups[..., 1] + groups[..., 2]) / 2)


def test_schedule():
    assert pdp_target(0, 0.9, warmup=2, eps=0.25) == 0.0
    assert pdp_target(2, 0.9, warmup=2, eps=0.25) == pytest.approx(0.225)
    assert pdp_target(5, 0.9, warmup=2, eps=0.25) == pytest.approx(0.9)
    assert pdp_target(50, 0.9, warmup=2, eps=0.25) == pytest.approx(0.9)


def test_gradient_flows_through_mask_and_weight(seeded):
    lin = nn.Linear(12, 7)
    model = nn.Sequential(lin)
    pdp = PDP(model, 0.5, tau=0.05)
    pdp.set_epoch(100)
    w = lin.parametrizations.weight.original
    x = torch.randn(3, 12, generator=seeded)
    g_out = torch.randn(3, 7, generator=seeded)
    (model(x) * g_out).sum().backward()
    # float64 reference: eff = m(w) * w, m = sigmoid((w^2 - t^2)/tau), t held constant
    w64 = w.detach().double()
    t = float(pdp_threshold(w.detach().abs(), 42))
    m = torch.sigmoid((w64 ** 2 - t ** 2) / 0.05)
    d_eff = g_out.double().T @ x.double()
    ref = d_eff * (m + w64 * m * (1 - m) * 2 * w64 / 0.05)
    torch.testing.assert_close(w.grad.double(), ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(ref, d_eff * m)  # the mask's own gradient matters


@pytest.mark.parametrize("pattern", ["unstructured", "nm", "channel"])
def test_finalize_gives_exact_hard_masks(seeded, pattern):
    model = _model(seeded)
    params = list(model.parameters())
    filt = (lambda m, f: f != "5") if pattern == "channel" else None
    pdp = PDP(model, 0.7, pattern=pattern, warmup=0, eps=0.5, filter_fn=filt)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(8, 4, 4, 4, generator=seeded)
    for epoch in range(3):
        pdp.set_epoch(epoch)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    raw = {f: m.parametrizations.weight.original.detach().clone() for f, m in pdp.layers.items()}
    masks = pdp.finalize()
    for f, mod in pdp.layers.items():
        assert not parametrize.is_parametrized(mod)
        mask, w = masks[f], mod.weight
        assert bool((w[~mask] == 0).all()) and torch.equal(w[mask], raw[f][mask])
        if pattern == "unstructured":
            assert int((~mask).sum()) == round(0.7 * mask.numel())
            assert torch.equal(mask, keep_topk(raw[f].abs(), mask.numel() - round(0.7 * mask.numel())))
        elif pattern == "nm":
            check_nm(mask, 2, 4)
            assert torch.equal(mask, keep_n_of_m(raw[f].abs(), 2, 4))
        else:
            assert int((~check_channel(mask)).sum()) == round(0.7 * mask.shape[0])
    assert {id(p) for p in params} == {id(p) for p in model.parameters()}  # the optimiser still owns the weights
    assert pdp.finalize() is not None  # idempotent


def test_warmup_is_identity_and_bad_arguments(seeded):
    model = _model(seeded)
    x = torch.randn(2, 4, 4, 4, generator=seeded)
    ref = model(x)
    pdp = PDP(model, 0.8, warmup=2)
    assert torch.equal(model(x), ref)
    pdp.set_epoch(2)
    assert not torch.equal(model(x), ref)
    with pytest.raises(ValueError, match="sparsity must lie in"):
        PDP(_model(seeded), 1.0)
    with pytest.raises(ValueError, match="must be > 0"):
        PDP(_model(seeded), 0.5, tau=0.0)
