"""PQ Index closed forms and SAP rounds (Diao et al.): exact counts, scopes, caps, rewinding."""
import math

import pytest
import torch
from torch import nn

from sparsecore.masks import as_matrix, check_channel, check_nm
from sparsecore.pruning import SAP, Rewinder, pq_index, sap_keep_bound, sap_prune_count, sap_round


def _heavy(d: int, g: torch.Generator) -> torch.Tensor:
    """A vector whose I_{0.5,1} is well below the beta cap and varies with the draw."""
    return torch.randn(d, generator=g) * torch.rand(d, generator=g) ** 2


def test_pruned_fraction_equals_index_for_p_half_q_one(seeded):
    for _ in range(50):
        d = int(torch.randint(5, 400, (1,), generator=seeded))
        w = _heavy(d, seeded)
        index = float(pq_index(w, 0.5, 1.0))
        r = int(sap_keep_bound(d, index, 0.5, 1.0))
        c = int(sap_prune_count(d, r, 1.0, 1.0))
        assert 0 <= d * index - c < 1 + 1e-9          # c = floor(d * I)
        assert c == math.floor(d * index + 1e-9)


def test_kept_fraction_is_one_minus_index_squared_for_p1_q2(seeded):
    for _ in range(50):
        d = int(torch.randint(5, 400, (1,), generator=seeded))
        w = _heavy(d, seeded)
        index = float(pq_index(w, 1.0, 2.0))
        r = int(sap_keep_bound(d, index, 1.0, 2.0))
        assert 0 <= r - d * (1 - index) ** 2 < 1 + 1e-9  # r = ceil(d * (1 - I)^2)


def test_k_sparse_equal_magnitudes(seeded):
    for _ in range(20):
        d = int(torch.randint(10, 300, (1,), generator=seeded))
        k = int(torch.randint(max(1, d // 10 + 1), d + 1, (1,), generator=seeded))
        w = torch.zeros(d)
        support = torch.randperm(d, generator=seeded)[:k]
        w[support] = 0.37 * torch.where(torch.rand(k, generator=seeded) < 0.5, -1.0, 1.0)
        index = float(pq_index(w, 0.5, 1.0))
        assert index == pytest.approx(1 - k / d, abs=1e-12)
        # One SAP round prunes exactly the zeros (beta=0.9 does not bind since k/d > 0.1).
        masks, info = sap_round({"w": w[None, :]}, {"w": torch.ones(1, d, dtype=torch.bool)})
        assert torch.equal(masks["w"][0], w != 0)
        assert info["pruned"] == d - k


def test_gaussian_values(seeded):
    w = torch.randn(40000, generator=seeded)
    # Closed forms: 1 - (E|w|^.5)^2 / E|w| = 0.1528..., 1 - E|w| / sqrt(E w^2) = 1 - sqrt(2/pi) = 0.2021...
    e_half = 2 ** 0.25 * math.gamma(0.75) / math.sqrt(math.pi)
    assert float(pq_index(w, 0.5, 1.0)) == pytest.approx(1 - e_half ** 2 / math.sqrt(2 / math.pi), abs=0.006)
    assert float(pq_index(w, 0.5, 1.0)) == pytest.approx(0.153, abs=0.006)
    assert float(pq_index(w, 1.0, 2.0)) == pytest.approx(0.202, abs=0.006)


def test_index_range_and_degenerate_cases(seeded):
    w = torch.randn(7, 9, generator=seeded)
    assert float(pq_index(w, 0.5, 1.0, mask=torch.zeros(7, 9, dtype=torch.bool))) == 0.0
    assert float(pq_index(torch.zeros(5))) == 0.0
    assert float(pq_index(torch.full((11,), -2.5))) == 0.0
    one_hot = torch.zeros(16)
    one_hot[3] = 4.0
    assert float(pq_index(one_hot, 1.0, 2.0)) == pytest.approx(1 - 16 ** (0.5 - 1.0), abs=1e-12)  # the upper bound
    rows = pq_index(w, 0.5, 1.0, dim=1)
    assert rows.shape == (7,)
    for i in range(7):
        assert float(rows[i]) == pytest.approx(float(pq_index(w[i])), abs=1e-12)
    masked = pq_index(w, 0.5, 1.0, mask=w > 0)
    assert float(masked) == pytest.approx(float(pq_index(w[w > 0])), abs=1e-12)


def test_beta_cap_and_eta():
    d = 1000
    assert int(sap_prune_count(d, sap_keep_bound(d, 0.99), 1.0, 0.9)) == 900
    assert int(sap_prune_count(d, sap_keep_bound(d, 0.99), 1.0, 1.0)) == 990
    r0, r1 = int(sap_keep_bound(d, 0.3, eta=0.0)), int(sap_keep_bound(d, 0.3, eta=0.5))
    assert r0 == 700 and r1 == math.ceil(700 / 1.5 ** 2 - 1e-9)


def test_layer_and_neuron_scopes(seeded):
    w = {"a": torch.randn(6, 20, generator=seeded) * torch.rand(6, 20, generator=seeded) ** 3,
         "b": torch.randn(4, 3, 2, 2, generator=seeded)}
    m = {f: torch.ones_like(v, dtype=torch.bool) for f, v in w.items()}
    new, _ = sap_round(w, m, scope="layer")
    for f in w:
        d = w[f].numel()
        c = int(sap_prune_count(d, sap_keep_bound(d, pq_index(w[f]))))
        assert int((~new[f]).sum()) == c
        if c:
            assert float(w[f].abs()[new[f]].min()) >= float(w[f].abs()[~new[f]].max())
    new, _ = sap_round(w, m, scope="neuron")
    mat, wm = as_matrix(new["b"]), as_matrix(w["b"])
    for i in range(mat.shape[0]):
        d = wm.shape[1]
        c = int(sap_prune_count(d, sap_keep_bound(d, pq_index(wm[i]))))
        assert int((~mat[i]).sum()) == c
    # A second round only removes more: masks are nested.
    new2, _ = sap_round(w, new, scope="neuron")
    assert all(bool((new2[f] <= new[f]).all()) for f in w)


def test_global_scope_and_target_cap(seeded):
    w = {"a": torch.randn(10, 10, generator=seeded) * 5, "b": torch.randn(10, 10, generator=seeded) * 0.1}
    m = {f: torch.ones_like(v, dtype=torch.bool) for f, v in w.items()}
    new, info = sap_round(w, m, scope="global")
    flat = torch.cat([w["a"].reshape(-1), w["b"].reshape(-1)])
    c = int(sap_prune_count(200, sap_keep_bound(200, pq_index(flat))))
    assert info["pruned"] == c == int((~new["a"]).sum() + (~new["b"]).sum())
    assert int((~new["b"]).sum()) > int((~new["a"]).sum())  # the small layer loses more
    capped, _ = sap_round(w, m, scope="layer", gamma=5.0, target=0.25)
    assert all(int((~capped[f]).sum()) == 25 for f in w)


def test_channel_and_nm_patterns(seeded):
    w = {"a": torch.randn(12, 8, generator=seeded) * torch.rand(12, 1, generator=seeded) ** 4}
    m = {"a": torch.ones(12, 8, dtype=torch.bool)}
    new, info = sap_round(w, m, pattern="channel")
    kept = check_channel(new["a"])
    norms = w["a"].norm(dim=1)
    c = int(sap_prune_count(12, sap_keep_bound(12, pq_index(norms))))
    assert int((~kept).sum()) == c > 0
    assert float(norms[kept].min()) >= float(norms[~kept].max())
    heavy = {"a": torch.randn(8, 16, generator=seeded) * torch.rand(8, 16, generator=seeded) ** 6}
    new, _ = sap_round(heavy, {"a": torch.ones(8, 16, dtype=torch.bool)}, pattern="nm", m=4)
    n_kept = int(new["a"].reshape(8, 4, 4).sum(-1).max())
    check_nm(new["a"], n_kept, 4)
    assert int(new["a"].sum()) == 8 * 4 * n_kept and n_kept < 4


def test_sap_pruner_history_and_rewind(seeded):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=seeded)))
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    sap = SAP(model, rewind=True)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0).add_(torch.randn(p.shape, generator=seeded))
    expected_pqi = float(pq_index(torch.cat([model[0].weight.detach().reshape(-1), model[2].weight.detach().reshape(-1)])))
    masks = sap.prune_round()
    assert sap.history[0]["pqi"] == pytest.approx(expected_pqi, abs=1e-12)
    for f, mask in masks.items():
        w = model.get_submodule(f).weight
        assert torch.equal(w[mask], init[f + ".weight"][mask])
        assert bool((w[~mask] == 0).all())
    sap.prune_round()
    assert [h["round"] for h in sap.history] == [0, 1]
    assert sap.history[1]["sparsity"] > sap.history[0]["sparsity"] > 0
    rw = Rewinder(model)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    rw.rewind(model, sap.masks)
    assert bool((model[0].weight[~sap.masks["0"]] == 0).all())


def test_bad_arguments():
    with pytest.raises(ValueError, match="0 < p < q"):
        pq_index(torch.ones(3), 1.0, 1.0)
    with pytest.raises(ValueError, match="scope must be one of"):
        sap_round({"a": torch.ones(2, 2)}, {"a": torch.ones(2, 2, dtype=torch.bool)}, scope="row")
    with pytest.raises(ValueError, match="neuron scope"):
        sap_round({"a": torch.ones(2, 2)}, {"a": torch.ones(2, 2, dtype=torch.bool)}, scope="neuron", pattern="channel")
    with pytest.raises(KeyError, match="different layers"):
        sap_round({"a": torch.ones(2, 2)}, {"b": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="beta"):
        sap_prune_count(10, 5, 1.0, 1.5)
