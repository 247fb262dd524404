"""GMP: the cubic schedule's end points and monotonicity, exact zero counts, N:M held, channel counts."""
import pytest
import torch
from torch import nn

from sparsecore.masks import check_channel, check_nm, keep_n_of_m
from sparsecore.pruning import GMP, apply_masks, attach, gmp_sparsity


def _model(g: torch.Generator) -> nn.Module:
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    return nn.Sequential(nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 3 * 3, 20), nn.ReLU(), nn.Linear(20, 5))


def test_schedule_end_points_and_monotone(seeded):
    for _ in range(20):
        t0 = int(torch.randint(0, 50, (1,), generator=seeded))
        n = int(torch.randint(1, 12, (1,), generator=seeded))
        dt = int(torch.randint(1, 30, (1,), generator=seeded))
        s_i = float(torch.rand(1, generator=seeded)) * 0.3
        s_f = s_i + float(torch.rand(1, generator=seeded)) * (1 - s_i)
        assert gmp_sparsity(t0, s_f, t0, n, dt, s_i) == s_i
        assert gmp_sparsity(t0 + n * dt, s_f, t0, n, dt, s_i) == s_f
        assert gmp_sparsity(t0 + n * dt + 1000, s_f, t0, n, dt, s_i) == gmp_sparsity(t0 + n * dt, s_f, t0, n, dt, s_i)
        assert gmp_sparsity(max(0, t0 - 5), s_f, t0, n, dt, s_i) == s_i
        values = [gmp_sparsity(t, s_f, t0, n, dt, s_i) for t in range(t0, t0 + n * dt + 1)]
        assert all(b >= a for a, b in zip(values, values[1:]))
    # The cubic shape itself: half way through, 1 - (1/2)^3 of the way to s_f.
    assert gmp_sparsity(50, 0.8, 0, 10, 10) == pytest.approx(0.8 * (1 - 0.5 ** 3), abs=1e-15)


def test_exact_zero_counts_on_grid_and_frozen_after(seeded):
    model = _model(seeded)
    pruner = GMP(model, 0.87, t0=3, n=4, dt=5)
    layers = dict(model.named_modules())
    updates = []
    for t in range(40):
        with torch.no_grad():  # weights keep changing, as in training
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=seeded))
        changed = pruner.step()
        updates.append(changed)
        pruner.apply()
        if changed:
            s = pruner.sparsity_at(t)
            for fqn, mask in pruner.masks.items():
                w = layers[fqn].weight.detach()
                n_zero = int((~mask).sum())
                assert n_zero == round(w.numel() * s)
                assert int((w == 0).sum()) >= n_zero
                # every kept |w| is >= every pruned |w| (largest magnitudes kept)
                if 0 < n_zero < w.numel():
                    assert float(w.abs()[mask].min()) >= float(w.abs()[~mask].max())
    assert [t for t, c in enumerate(updates) if c] == [3, 8, 13, 18, 23]
    final = {f: m.clone() for f, m in pruner.masks.items()}
    for f, m in final.items():
        assert int((~m).sum()) == round(m.numel() * 0.87)
    pruner.step(100)
    assert all(torch.equal(final[f], pruner.masks[f]) for f in final)


def test_skipped_steps_catch_up(seeded):
    pruner = GMP(_model(seeded), 0.5, t0=0, n=4, dt=10)
    assert pruner.step(0) and not pruner.step(5)
    assert pruner.step(37)  # jumps to grid index 3 (t = 30)
    for f, m in pruner.masks.items():
        assert int((~m).sum()) == round(m.numel() * gmp_sparsity(30, 0.5, 0, 4, 10))


def test_per_layer_targets(seeded):
    pruner = GMP(_model(seeded), 0.5, t0=0, n=2, dt=3, per_layer={"5": 0.9, "0": 0.1})
    for _ in range(10):
        pruner.step()
    expect = {"0": 0.1, "3": 0.5, "5": 0.9}
    assert {f: int((~m).sum()) for f, m in pruner.masks.items()} == {f: round(pruner.masks[f].numel() * s)
                                                                     for f, s in expect.items()}


def test_nm_chosen_once_and_held(seeded):
    model = _model(seeded)
    pruner = GMP(model, 0.0, t0=2, n=3, dt=2, pattern="nm", nm=(2, 4))
    # Conv2d(4, ...) has K = 3*3*4 = 36, Linear(54) is not a multiple of 4, Linear(20) is.
    assert set(pruner.masks) == {"0", "5"}
    for _ in range(3):
        pruner.step()
    first = {f: m.clone() for f, m in pruner.masks.items()}
    layers = dict(model.named_modules())
    for f, m in first.items():
        check_nm(m, 2, 4)
        assert torch.equal(m, keep_n_of_m(layers[f].weight.detach().abs(), 2, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=seeded))
    for _ in range(20):
        pruner.step()
    assert all(torch.equal(first[f], pruner.masks[f]) for f in first)


def test_channel_counts(seeded):
    model = _model(seeded)
    pruner = GMP(model, 0.6, t0=0, n=2, dt=1, pattern="channel", filter_fn=lambda m, f: f != "5")
    for _ in range(3):
        pruner.step()
    for f, m in pruner.masks.items():
        kept = check_channel(m)
        assert int((~kept).sum()) == round(m.shape[0] * 0.6)


def test_optimizer_hook_keeps_pruned_weights_zero(seeded):
    model = _model(seeded)
    pruner = GMP(model, 0.75, t0=0, n=1, dt=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    handle = attach(opt, pruner)
    x = torch.randn(8, 4, 5, 5, generator=seeded)
    for _ in range(5):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    layers = dict(model.named_modules())
    for f, m in pruner.masks.items():
        assert int((~m).sum()) == round(m.numel() * 0.75)
        assert bool((layers[f].weight[~m] == 0).all())
    handle.remove()
    opt.zero_grad()
    model(x).square().sum().backward()
    opt.step()  # hooks removed: momentum now revives pruned weights
    assert any(bool((layers[f].weight[~m] != 0).any()) for f, m in pruner.masks.items())


def test_bad_arguments(seeded):
    model = _model(seeded)
    with pytest.raises(ValueError, match="sparsity must lie in"):
        GMP(model, 1.5)
    with pytest.raises(ValueError, match="n >= 1"):
        GMP(model, 0.5, n=0)
    with pytest.raises(ValueError, match="pattern must be one of"):
        GMP(model, 0.5, pattern="blocks")
    with pytest.raises(KeyError, match="not pruned"):
        GMP(model, 0.5, per_layer={"nope": 0.1})
    with pytest.raises(KeyError, match="no such module"):
        apply_masks(model, {"nope": torch.ones(1, dtype=torch.bool)})
