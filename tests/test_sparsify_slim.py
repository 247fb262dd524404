"""sparsify with the channel pattern slims the model physically, stays exact, and saves/loads into the full skeleton."""
import copy

import pytest
import torch

import sparsecore as sc
from sparsecore.channel import masked_reference
from sparsecore.masks import check_channel
from sparsecore.models.resnet import resnet18


def _size(model) -> int:
    return sum(t.numel() for t in list(model.parameters()) + list(model.buffers()))


def test_slimmed_resnet_matches_masked_model_and_round_trips(tmp_path, seeded):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=seeded)))
    model = resnet18(num_classes=10, width=16).eval()
    x = torch.randn(2, 3, 32, 32, generator=seeded)
    config = sc.SparsityConfig("channel", 0.5)
    masks = sc.magnitude_masks(model, config, filter_fn=lambda mod, fqn: fqn != "fc")  # keep every class
    ref = masked_reference(model, {f: check_channel(m) for f, m in masks.items()}, x).double()
    small = sc.sparsify(copy.deepcopy(model), config, masks=masks, example_inputs=(x,))
    assert small is not model
    # residual adds keep some layers wide (packed as ChannelWeight); everything else shrank for real
    assert 0 < len(sc.sparse_modules(small)) < len(masks)
    assert _size(small) < 0.6 * _size(model)
    with torch.no_grad():
        out = small(x)
        torch.testing.assert_close(out.double(), ref(x.double()), atol=1e-4, rtol=1e-4)
        path = sc.save(small, tmp_path / "slim.safetensors", config=config)
        back = sc.load(path, resnet18(num_classes=10, width=16).eval())  # the unpruned skeleton
        for fqn, mod in sc.sparse_modules(back).items():
            mod.load_plan(small.get_submodule(fqn).plan)
        assert torch.equal(back(x), out)
    assert _size(back) == _size(small)


def test_slim_needs_channel_pattern_and_an_input():
    model = resnet18(num_classes=4, width=8).eval()
    with pytest.raises(ValueError, match="needs the 'channel' pattern"):
        sc.sparsify(model, sc.SparsityConfig("unstructured", 0.5), slim=True, example_inputs=(torch.randn(1, 3, 16, 16),))
    with pytest.raises(ValueError, match="example_inputs"):
        sc.sparsify(model, sc.SparsityConfig("channel", 0.5), slim=True)
