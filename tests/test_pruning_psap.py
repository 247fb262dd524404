"""PSAP (our interpretation): self-adaptive exact budgets, soft pruning, protective restoration; train helper."""
import pytest
import torch
from torch import nn

from sparsecore.masks import check_channel
from sparsecore.pruning import PSAP, attach, evaluate, masks_sparsity, psap_layer_counts, train, weight_sparsity_ratio
from sparsecore.pruning.sap import SAP


def _mlp(g: torch.Generator) -> nn.Module:
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))


def _hidden(mod, fqn):
    return fqn != "4"


def test_layer_counts_exact_and_adaptive(seeded):
    for _ in range(30):
        sizes = [int(v) for v in torch.randint(2, 40, (3,), generator=seeded)]
        rho = [float(v) for v in torch.rand(3, generator=seeded)]
        target = float(torch.rand(1, generator=seeded)) * 0.9
        counts = psap_layer_counts(sizes, rho, target)
        total = sum(sizes)
        assert sum(counts) == min(round(target * total), total - 3)
        assert all(0 <= c <= s - 1 for c, s in zip(counts, sizes))
    # Equal sizes: the sparser layer takes the larger share.
    counts = psap_layer_counts([20, 20], [0.8, 0.0], 0.5)
    assert sum(counts) == 20 and counts[0] > counts[1]
    assert psap_layer_counts([20, 20], [0.3, 0.3], 0.5) == [10, 10]


def test_weight_sparsity_ratio():
    w = torch.ones(8, 5)
    w[:3] *= 0.01
    assert weight_sparsity_ratio(w, 0.05) == pytest.approx(3 / 8)
    assert weight_sparsity_ratio(torch.zeros(4, 2)) == 0.0


def test_prune_step_zeroes_filters_with_exact_budget_and_stays_soft(seeded):
    model = _mlp(seeded)
    psap = PSAP(model, filter_fn=_hidden)
    masks = psap.prune_step(0.5)
    dropped = 0
    for f, mask in masks.items():
        kept = check_channel(mask)
        mod = model.get_submodule(f)
        assert bool((mod.weight[~kept] == 0).all()) and bool((mod.bias[~kept] == 0).all())
        dropped += int((~kept).sum())
    assert dropped == 14
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = attach(opt, psap)
    x = torch.randn(32, 10, generator=seeded)
    model[2].weight.data[~psap.channels()["2"]] = 0.5  # a pruned filter that comes back to life
    opt.zero_grad()
    model(x).square().sum().backward()
    opt.step()
    handle.remove()
    assert bool((model[2].weight[~psap.channels()["2"]] != 0).any())  # soft: not re-zeroed
    assert all(float(g.sum()) > 0 for g in psap.grad_sq.values())  # before_step recorded gradients


def test_protective_restoration(seeded):
    model = _mlp(seeded)
    psap = PSAP(model, filter_fn=_hidden)
    first = psap.prune_step(0.25)
    zeroed = (~psap.channels()["0"]).nonzero().reshape(-1)
    victim = int(zeroed[0])
    grads = torch.rand(16, generator=seeded, dtype=torch.float64)
    grads[victim] = 10.0  # far above the kept filters' median
    psap.grad_sq["0"] = grads ** 2
    psap.grad_sq["2"] = torch.rand(12, generator=seeded, dtype=torch.float64)
    second = psap.prune_step(0.25)
    assert bool(psap.channels()["0"][victim])
    assert victim in psap.restored["0"]
    assert sum(int((~psap.channels()[f]).sum()) for f in second) == 7  # budget still exact
    assert set(first) == set(second)


def test_train_helper_with_gmp_like_hard_pruner(seeded):
    model = _mlp(seeded)
    x = torch.randn(64, 10, generator=seeded)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    sap = SAP(model)
    sap.prune_round()
    losses = train(model, loader, 3, pruner=sap, lr=1e-2, progress=True)
    assert len(losses) == 3 and losses[-1] < losses[0]
    for f, mask in sap.masks.items():
        assert bool((model.get_submodule(f).weight[~mask] == 0).all())
    assert masks_sparsity(sap.masks) > 0
    assert 0.0 <= evaluate(model, loader) <= 1.0
    psap = PSAP(model, targets=[0.2, 0.4], filter_fn=_hidden)
    train(model, loader, 2, pruner=psap)
    assert [h["target"] for h in psap.history] == [0.2, 0.4]
    final = {f: m.clone() for f, m in psap.finalize().items()}
    train(model, loader, 2, pruner=psap)  # after finalize: no more prune steps, pruned filters stay zero
    assert len(psap.history) == 2 and all(torch.equal(final[f], psap.masks[f]) for f in final)
    for f, mask in final.items():
        assert bool((model.get_submodule(f).weight[~mask] == 0).all())
    with pytest.raises(ValueError, match="epochs must be"):
        train(model, loader, -1)
