"""Hash MI estimator and SNACS: ~0 bits for independent data, valid channel masks, budget, limits, protection."""
import warnings

import pytest
import torch
from torch import nn

from sparsecore.masks import check_channel
from sparsecore.pruning import balanced_indices, hash_cmi, hash_mi, snacs_masks, snacs_scores
from sparsecore.pruning.mi import hash_codes, mi_from_codes


def test_mi_independent_near_zero_dependent_large(seeded):
    n = 2000
    x, y = torch.randn(n, generator=seeded), torch.randn(n, generator=seeded)
    indep = hash_mi(x, y, generator=seeded)
    strong = hash_mi(x, x + 0.1 * torch.randn(n, generator=seeded), generator=seeded)
    weak = hash_mi(x, x + torch.randn(n, generator=seeded), generator=seeded)  # true MI = 0.5 bit
    assert 0 <= indep < 0.2
    assert strong > 1.5 and strong > 8 * indep
    assert indep < weak < strong


def test_mi_of_identical_codes_is_entropy():
    # Each of 4 codes equally often, y = x: the EDGE average is log2(4) = 2 bits exactly.
    c = torch.arange(400) % 4
    assert float(mi_from_codes(c, c, 4, 4)) == pytest.approx(2.0, abs=1e-12)
    assert float(mi_from_codes(c, torch.arange(400) // 100, 4, 4)) == pytest.approx(0.001, abs=1e-12)  # clip floor


def test_hash_codes_range_and_shift():
    z = torch.linspace(-5, 5, 101)
    codes = hash_codes(z, 4, 0.0)
    assert int(codes.min()) == 0 and int(codes.max()) == 5
    assert torch.equal(codes, torch.floor((z + 2) / 1.0).clamp(0, 5).long())


def test_conditional_mi(seeded):
    n = 2000
    x, y, z = (torch.randn(n, generator=seeded) for _ in range(3))
    assert abs(hash_cmi(x + z, y, z, generator=seeded)) < 0.15
    assert hash_cmi(x + z, x, z, generator=seeded) > 0.5


def _trained_chain(g: torch.Generator):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 10), nn.ReLU(), nn.Linear(10, 3))
    x = torch.randn(240, 2, 4, 4, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0.3).long()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y


def test_snacs_masks_budget_protection_and_coupling(seeded):
    model, x, y = _trained_chain(seeded)
    idx = balanced_indices(y, 60, seeded)
    scores = snacs_scores(model, x[idx], y[idx], generator=seeded)
    assert scores.chain == ["0", "2", "5", "7"]
    assert {f: s.shape[0] for f, s in scores.filter_scores.items()} == {"0": 6, "2": 8, "5": 10}
    for f, imp in scores.importance.items():
        assert float(imp.sum()) == pytest.approx(1.0, abs=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = snacs_masks(model, scores, 0.5, protect=0.2, respect_limits=False)
    assert set(res.masks) == {"0", "2", "5"}  # the classifier is never pruned
    dropped = 0
    for f, mask in res.masks.items():
        kept = check_channel(mask)
        assert torch.equal(kept, res.channels[f])
        assert bool(kept[res.protected[f]].all())
        dropped += int((~kept).sum())
    assert dropped == round(0.5 * 24)
    # Without limits the cut is exactly "lowest pooled score first" among unprotected filters.
    pool = sorted((float(scores.filter_scores[f][i]), k, i, f) for k, f in enumerate(["0", "2", "5"])
                  for i in range(scores.filter_scores[f].numel()) if not res.protected[f][i])
    expect = {f: torch.ones_like(res.channels[f]) for f in res.channels}
    for _, _, i, f in pool[:12]:
        expect[f][i] = False
    assert all(torch.equal(expect[f], res.channels[f]) for f in expect)
    # Coupled input masks of the next layers: conv input channels, then flatten blocks of 4*4.
    assert torch.equal(res.input_masks["2"][0, :, 0, 0], res.channels["0"])
    assert torch.equal(res.input_masks["5"][0], res.channels["2"].repeat_interleave(16))
    assert torch.equal(res.input_masks["7"][0], res.channels["5"])


def test_snacs_upper_limits_honoured_then_relaxed(seeded):
    model, x, y = _trained_chain(seeded)
    scores = snacs_scores(model, x, y, shifts=1, generator=seeded)
    scores.upper_limits = {"0": 0.5, "2": 0.25, "5": 0.1}   # at most 3, 2, 1 filters
    res = snacs_masks(model, scores, 0.25, protect=0.1)        # 6 of 24: feasible
    assert not res.relaxed
    caps = {"0": 3, "2": 2, "5": 1}
    assert all(int((~res.channels[f]).sum()) <= caps[f] for f in caps)
    assert sum(int((~k).sum()) for k in res.channels.values()) == 6
    with pytest.warns(UserWarning, match="relaxing"):
        res = snacs_masks(model, scores, 0.5, protect=0.1)
    assert res.relaxed and sum(int((~k).sum()) for k in res.channels.values()) == 12
    assert all(bool(res.channels[f][res.protected[f]].all()) for f in res.channels)


def test_snacs_bad_chain(seeded):
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="at least 2 layers"):
        snacs_scores(model, torch.randn(8, 4), torch.zeros(8, dtype=torch.long))

    class TwoBranches(nn.Module):  # a and b are siblings, not consecutive: b does not consume a's 5 channels
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(4, 5), nn.Linear(4, 5), nn.Linear(5, 2)

        def forward(self, x):
            return self.head(self.a(x) + self.b(x))

    with pytest.raises(ValueError, match="does not follow a layer of 5 channels"):
        snacs_scores(TwoBranches(), torch.randn(8, 4), torch.zeros(8, dtype=torch.long))
