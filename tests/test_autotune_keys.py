"""The unstructured kernels' autotuners key on sparsity: a config tuned at 50% is not reused at 90%.

The launch is intercepted (no kernel runs): what is checked is the key argument each launcher passes for
a weight of known density, and that the autotuner lists it among its keys.
"""
from __future__ import annotations

import pytest
import torch

import sparsecore.kernels.sell_matmul as sell_mod
import sparsecore.kernels.spmm as spmm_mod
from sparsecore.formats import UnstructuredWeight
from sparsecore.formats.sell import pack_sell
from sparsecore.kernels._host import sparsity_bucket

pytestmark = pytest.mark.interpreter  # the launchers accept CPU tensors under TRITON_INTERPRET=1


class _Stop(Exception):
    pass


def _weight(n: int, k: int, sparsity: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, generator=g)
    w = torch.where(w == 0, torch.ones(()), w)  # kept values non-zero
    mask = torch.rand(n, k, generator=g) >= sparsity
    return w, mask


def test_sparsity_bucket_separates_the_benchmarked_sparsities():
    buckets = [sparsity_bucket(round(1000 * (1 - s)), 1000) for s in (0.0, 0.5, 0.7, 0.9, 0.95)]
    assert buckets == [0, 2, 3, 7, 9]
    assert sparsity_bucket(0, 1000) == 40 and sparsity_bucket(5, 0) == 40
    assert sparsity_bucket(1, 10**12) == 40  # clamped


def test_spmm_launch_keys_on_sparsity(monkeypatch, seeded):
    assert "sparsity_key" in spmm_mod._spmm_autotuned.keys
    names = spmm_mod._spmm_kernel.arg_names
    seen = []

    def run(*args, **kwargs):
        seen.append(dict(zip(names, args)) | kwargs)
        raise _Stop

    monkeypatch.setattr(spmm_mod._spmm_autotuned, "run", run)
    x = torch.randn(3, 96, generator=seeded)
    for sparsity in (0.5, 0.9):
        p = UnstructuredWeight.from_dense(*_weight(40, 96, sparsity, seeded))
        with pytest.raises(_Stop):
            spmm_mod.spmm(x, p.bitmap, p.values, p.tile_offsets, p.n, k=96)
        assert seen[-1]["sparsity_key"] == sparsity_bucket(p.nnz, 40 * 96)
    assert seen[0]["sparsity_key"] != seen[1]["sparsity_key"]


def test_sell_launch_keys_on_sparsity(monkeypatch, seeded):
    assert "SPARSITY_BUCKET" in sell_mod._sell_matmul_kernel.keys
    names = sell_mod._sell_matmul_kernel.fn.arg_names
    seen = []

    class _Launch:  # stands in for the kernel: records the arguments of ``kernel[grid](...)``
        fn = None

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(dict(zip(names, args)) | kwargs)
                raise _Stop
            return launch

    fake = _Launch()
    fake.fn = fake  # the interpreter path launches ``kernel.fn[grid]``, the compiled one ``kernel[grid]``
    monkeypatch.setattr(sell_mod, "_sell_matmul_kernel", fake)
    x = torch.randn(2, 96, generator=seeded)
    for sparsity in (0.5, 0.9):
        layout = pack_sell(*_weight(40, 96, sparsity, seeded))
        with pytest.raises(_Stop):
            sell_mod.sell_matmul(x, layout)
        assert seen[-1]["SPARSITY_BUCKET"] == sparsity_bucket(layout.values.numel(), 40 * 96)
    assert seen[0]["SPARSITY_BUCKET"] != seen[1]["SPARSITY_BUCKET"]
