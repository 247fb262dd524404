"""sparsify on an already sparse model, and clear errors for bad sparsify/config arguments."""
import pytest
import torch
from torch import nn

import sparsecore as sc
from sparsecore.masks import is_nm
from sparsecore.resparsify import kept_mask


def _mlp():
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))


def _masked_copy(model):
    """A dense model holding the sparse model's masked weights (the reference for re-sparsifying)."""
    dense = _mlp()
    with torch.no_grad():
        for i in (0, 2):
            dense[i].weight.copy_(model[i].dense_weight())
            dense[i].bias.copy_(model[i].bias)
    return dense


def test_sparsify_twice_prunes_further(seeded):
    model = sc.sparsify(_mlp(), sc.SparsityConfig("unstructured", 0.5))
    first = {i: kept_mask(model[i]) for i in (0, 2)}
    reference = sc.sparsify(_masked_copy(model), sc.SparsityConfig("unstructured", 0.9))
    again = sc.sparsify(model, sc.SparsityConfig("unstructured", 0.9))
    assert again is model
    for i in (0, 2):
        mask = kept_mask(model[i])
        assert int(mask.sum()) == mask.numel() - round(0.9 * mask.numel())
        assert not bool((mask & ~first[i]).any())  # a subset of what the first call kept
        assert torch.equal(mask, kept_mask(reference[i]))
    x = torch.randn(4, 32, generator=seeded)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_lower_sparsity_refused_and_model_unchanged():
    model = sc.sparsify(_mlp(), sc.SparsityConfig("unstructured", 0.9))
    layers = [model[0], model[2]]
    with pytest.raises(ValueError, match="layer '0' is already sparse.*pruned"):
        sc.sparsify(model, sc.SparsityConfig("unstructured", 0.5))
    assert [model[0], model[2]] == layers


def test_nm_after_unstructured_keeps_at_most_n_and_never_revives():
    model = sc.sparsify(_mlp(), sc.SparsityConfig("unstructured", 0.8))
    before = kept_mask(model[0])
    sc.sparsify(model, sc.SparsityConfig("nm", n=2, m=4))
    assert model[0].packed.kind == "nm"
    after = model[0].dense_weight() != 0
    assert is_nm(after, 2, 4) and not bool((after & ~before).any())


def test_channel_after_sparse_refused_and_unselected_layers_untouched():
    model = sc.sparsify(_mlp(), sc.SparsityConfig("unstructured", 0.5))
    with pytest.raises(ValueError, match="channel pruning .* starts from a dense model"):
        sc.sparsify(model, sc.SparsityConfig("channel", 0.5))
    last = model[2]
    sc.sparsify(model, sc.SparsityConfig("unstructured", 0.75), filter_fn=lambda mod, fqn: fqn == "0")
    assert model[2] is last
    assert int(kept_mask(model[0]).sum()) == 32 * 64 // 4


def test_masks_must_be_a_dict():
    with pytest.raises(TypeError, match="masks must be a dict"):
        sc.sparsify(_mlp(), sc.SparsityConfig("unstructured", 0.5), masks=[torch.ones(64, 32, dtype=torch.bool)])


def test_channel_sparsity_one_with_example_inputs():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    with pytest.raises(ValueError, match="would keep 0 of"):
        sc.sparsify(model, sc.SparsityConfig("channel", 1.0), example_inputs=(torch.randn(1, 3, 8, 8),))
    assert type(model[0]) is nn.Conv2d and model[0].out_channels == 8


def test_nm_config_types_and_sparsity():
    with pytest.raises(TypeError, match="n must be an int, got '2'"):
        sc.SparsityConfig("nm", n="2")
    with pytest.raises(ValueError, match="sparsity 0.9 contradicts"):
        sc.SparsityConfig("nm", sparsity=0.9)
    assert sc.SparsityConfig("nm", n=1, m=8).sparsity == 0.875
    assert sc.SparsityConfig("nm", 0.5).sparsity == 0.5
    assert sc.SparsityConfig("unstructured").sparsity == 0.5
    cfg = sc.SparsityConfig("nm", n=1, m=4)
    assert sc.SparsityConfig.from_json(cfg.to_json()) == cfg
