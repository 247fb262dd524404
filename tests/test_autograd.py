"""Input and bias gradients through every backend that runs here equal the masked dense layer's."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecore as sc
from sparsecore.backends import implementations

CASES = [("linear", "unstructured"), ("linear", "nm"), ("linear", "channel"), ("conv2d", "unstructured"),
         ("conv2d", "channel"), ("conv2d", "nm")]


def _layer(op, pattern, g):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
    dense = nn.Linear(24, 10) if op == "linear" else nn.Conv2d(8, 6, 3, padding=1)
    config = sc.SparsityConfig(pattern, 0.5)
    mask = sc.magnitude_masks(nn.Sequential(dense), config)["0"]
    cls = sc.SparseLinear if op == "linear" else sc.SparseConv2d
    return dense, mask, cls.from_dense(dense, mask, pattern)


@pytest.mark.parametrize("op,pattern", CASES)
def test_grads_match_masked_dense_for_every_backend(op, pattern, seeded):
    dense, mask, sparse = _layer(op, pattern, seeded)
    shape = (5, 24) if op == "linear" else (2, 8, 5, 5)
    x0 = torch.randn(shape, generator=seeded, dtype=torch.float64)
    w = torch.where(mask, dense.weight, 0).double().detach()
    xr = x0.clone().requires_grad_(True)
    br = dense.bias.detach().double().requires_grad_(True)
    yr = F.linear(xr, w, br) if op == "linear" else F.conv2d(xr, w, br, padding=1)
    gy = torch.randn(yr.shape, generator=seeded, dtype=torch.float64)
    yr.backward(gy)
    backends = sorted({impl.backend for impl in implementations(op, pattern)})
    tried = 0
    for backend in backends:
        sparse.backend = backend
        sparse.bias.grad = None
        x = x0.float().requires_grad_(True)
        try:
            y = sparse(x)
        except sc.BackendUnavailable:
            continue  # e.g. cuSPARSELt on CPU: covered by its own refusal tests
        tried += 1
        y.backward(gy.float())
        torch.testing.assert_close(x.grad.double(), xr.grad, atol=1e-4, rtol=1e-4, msg=f"{backend.value}: dX")
        torch.testing.assert_close(sparse.bias.grad.double(), br.grad, atol=1e-4, rtol=1e-4, msg=f"{backend.value}: db")
    assert tried >= 2, f"only {tried} backends ran for {op}/{pattern}"
