"""SparseLinear / SparseConv2d / sparsify: outputs equal the masked dense model (float64 reference)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecore as sc
from helpers import assert_close_to_ref

PATTERNS = [sc.SparsityConfig("unstructured", 0.7), sc.SparsityConfig("nm", n=2, m=4), sc.SparsityConfig("channel", 0.5)]


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 12, 3, padding=1, stride=2)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.fc1 = nn.Linear(12 * 4 * 4, 40)
        self.fc2 = nn.Linear(40, 7, bias=False)

    def forward(self, x):
        x = F.relu(self.dw(F.relu(self.conv(x))))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def _masked_reference(model: nn.Module, masks: dict, x: torch.Tensor) -> torch.Tensor:
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        for fqn, mask in masks.items():
            w = ref.get_submodule(fqn).weight
            w.copy_(torch.where(mask, w, torch.zeros((), dtype=w.dtype)))
    return ref(x.double())


@pytest.mark.parametrize("config", PATTERNS, ids=lambda c: c.pattern)
def test_sparsify_matches_masked_dense(config, seeded):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=seeded)))
    model = TinyNet().eval()
    masks = sc.magnitude_masks(model, config)
    assert set(masks) >= {"conv", "fc1"}
    ref = _masked_reference(model, masks, x := torch.randn(3, 8, 8, 8, generator=seeded))
    sc.sparsify(model, config, masks=masks)
    assert isinstance(model.conv, sc.SparseConv2d) and isinstance(model.fc1, sc.SparseLinear)
    assert model.fc1.in_features == 192 and model.fc1.out_features == 40
    with torch.no_grad():
        assert_close_to_ref(model(x), ref, k=192)
        assert torch.equal(model.fc1.dense_weight(), torch.where(masks["fc1"], model.fc1.dense_weight(), 0))


@pytest.mark.parametrize("config", PATTERNS, ids=lambda c: c.pattern)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_and_reference_backend(config, dtype, seeded):
    lin = nn.Linear(64, 24)
    mask = sc.magnitude_masks(nn.Sequential(lin), config)["0"]
    sl = sc.SparseLinear.from_dense(lin, mask, config.pattern).to(dtype)
    assert sl.packed.dtype == dtype
    x = torch.randn(5, 64, generator=seeded).to(dtype)
    ref = F.linear(x.double(), torch.where(mask, lin.weight, 0).to(dtype).double(), lin.bias.to(dtype).double())
    for backend in ("dense", "reference"):
        if backend == "reference" and config.pattern == "channel":
            backend = "sliced_dense"
        sl.backend = sc.Backend(backend)
        with torch.no_grad():
            assert_close_to_ref(sl(x), ref, k=64)


def test_bad_inputs_raise_clear_errors():
    lin = nn.Linear(16, 8)
    mask = torch.ones(8, 16, dtype=torch.bool)
    sl = sc.SparseLinear.from_dense(lin, mask, "unstructured")
    with pytest.raises(ValueError, match=r"expects \[\.\.\., 16\] input"):
        sl(torch.randn(2, 15))
    with pytest.raises(TypeError, match="dtype"):
        sl(torch.randn(2, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="expects nn.Linear"):
        sc.SparseLinear.from_dense(nn.Conv2d(1, 1, 1), mask, "unstructured")
    with pytest.raises(ValueError, match="pattern must be one of"):
        sc.SparseLinear.from_dense(lin, mask, "blocky")
    with pytest.raises(sc.PatternError):
        sc.sparsify(nn.Sequential(lin), sc.SparsityConfig("nm"), masks={"0": mask})
    with pytest.raises(ValueError, match="expected an nn.Linear or nn.Conv2d"):
        sc.sparsify(nn.Sequential(nn.ReLU()), sc.SparsityConfig(), masks={"0": mask})
    with pytest.raises(ValueError, match="NaN or Inf"):
        bad = nn.Linear(16, 8)
        with torch.no_grad():
            bad.weight[0, 0] = float("nan")
        sc.SparseLinear.from_dense(bad, mask, "unstructured")
    sl.backend = sc.Backend.CUSPARSELT
    with pytest.raises(sc.BackendUnavailable, match="cusparselt"):
        sl(torch.randn(2, 16))
    with pytest.raises(ValueError, match="backend must be one of"):
        sc.SparsityConfig(backend="fastest")


def test_state_dict_round_trip_and_device_moves(seeded):
    model = TinyNet()
    sc.sparsify(model, sc.SparsityConfig("unstructured", 0.8))
    clone = sc.sparsify(TinyNet(), sc.SparsityConfig("unstructured", 0.8))
    clone.load_state_dict(model.state_dict())
    for a, b in zip(model.state_dict().values(), clone.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(clone.fc1.dense_weight(), model.fc1.dense_weight())
    x = torch.randn(2, 8, 8, 8, generator=seeded)
    with torch.no_grad():
        assert torch.equal(model(x), clone(x))
    assert "format=unstructured" in repr(model.fc1)
