"""One copy per layer: a sparsified model holds what its plan runs, never more than its dense self."""
import copy

import pytest
import torch
from torch import nn

import sparsecore as sc
from sparsecore.modules import pack
from helpers import nonzero_randn


def _mlp(g):
    model = nn.Sequential(nn.Linear(96, 160), nn.ReLU(), nn.Linear(160, 96), nn.ReLU(), nn.Linear(96, 40))
    with torch.no_grad():
        for mod in model:
            if isinstance(mod, nn.Linear):
                mod.weight.copy_(nonzero_randn(*mod.weight.shape, generator=g))
    return model


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("config", [sc.SparsityConfig("unstructured", 0.9), sc.SparsityConfig("nm", n=2, m=4),
                                    sc.SparsityConfig("channel", 0.5)], ids=lambda c: c.pattern)
def test_dense_run_layer_holds_dense_only_and_saves_the_same_packed_tensors(config, seeded):
    dense = _mlp(seeded)
    x = torch.randn(3, 96, generator=seeded)
    sparse = sc.sparsify(copy.deepcopy(dense), config)
    packed_state = _state(sparse)
    with torch.no_grad():
        before = sparse(x)  # unplanned: runs dense, so each layer keeps the dense weight only
    assert all(m.dense_held for m in sc.sparse_modules(sparse).values())
    assert all(not any(n.startswith("packed_") for n, _ in m.named_buffers()) for m in sc.sparse_modules(sparse).values())
    assert sc.resident_bytes(sparse) <= sc.resident_bytes(dense)
    assert _same(_state(sparse), packed_state)  # the packed form is rebuilt bit for bit
    with torch.no_grad():
        assert torch.equal(sparse(x), before)


def test_kept_zeros_survive_dense_holding_and_half_conversion(seeded):
    lin = nn.Linear(64, 32)
    w = nonzero_randn(32, 64, generator=seeded)
    mask = torch.rand(32, 64, generator=seeded) > 0.5
    kept = mask.nonzero()
    w[kept[0, 0], kept[0, 1]] = 0.0     # a kept +0.0
    w[kept[1, 0], kept[1, 1]] = -0.0    # a kept -0.0
    w[kept[2, 0], kept[2, 1]] = 1e-30   # a kept value that float16 rounds to +0.0
    lin.weight.data.copy_(w)
    model = sc.sparsify(nn.Sequential(lin), sc.SparsityConfig("unstructured"), masks={"0": mask})
    ref = _state(model)
    model(torch.randn(2, 64, generator=seeded))
    assert model[0].dense_held and model[0].kept_zeros.numel() == 1
    assert _same(_state(model), ref)
    model.half()
    want = pack(w.half(), mask, "unstructured").state()[0]
    got = model.state_dict()
    assert all(torch.equal(got[f"0.packed_{k}"], v) for k, v in want.items())
    model(torch.randn(2, 64, generator=seeded).half())
    assert model[0].dense_held and _same(model.state_dict(), got)


def test_sparse_planned_layer_drops_its_dense_copy(seeded):
    dense = _mlp(seeded)
    sparse = sc.sparsify(copy.deepcopy(dense), sc.SparsityConfig("unstructured", 0.9))
    x = torch.randn(1, 96, generator=seeded)
    sparse(x)
    for mod in sc.sparse_modules(sparse).values():
        mod.load_plan({1: "torch_csr"})
    assert not any(m.dense_held for m in sc.sparse_modules(sparse).values())
    y = sparse(x)
    states = [s for m in sc.sparse_modules(sparse).values() for s in m.prepared_states()]
    assert len(states) == 3  # one CSR state per layer, no dense copy
    assert sc.resident_bytes(sparse) < 0.5 * sc.resident_bytes(dense)
    ref = copy.deepcopy(dense).double()
    for f, m in sc.sparse_modules(sparse).items():
        ref.get_submodule(f).weight.data = m.dense_weight().double()
    torch.testing.assert_close(y.double(), ref(x.double()), atol=1e-4, rtol=1e-4)


def test_save_load_of_dense_held_model_round_trips(seeded, tmp_path):
    dense = _mlp(seeded)
    sparse = sc.sparsify(copy.deepcopy(dense), sc.SparsityConfig("unstructured", 0.7))
    x = torch.randn(4, 96, generator=seeded)
    y = sparse(x)
    loaded = sc.load(sc.save(sparse, tmp_path / "m.safetensors"), _mlp(seeded))
    assert _same(loaded.state_dict(), sparse.state_dict())
    assert torch.equal(loaded(x), y)


def test_resident_bytes_counts_shared_storage_once():
    lin = nn.Linear(10, 10)
    model = nn.Sequential(lin, lin)
    assert sc.resident_bytes(model) == (100 + 10) * 4
    with pytest.raises(TypeError):
        sc.resident_bytes("model")


def _cpu_kernels_or_skip() -> None:
    from sparsecore.backends.registry import compiler_why_not

    reason = compiler_why_not(torch.empty(0))
    if reason is not None:
        pytest.skip(reason)
    from sparsecore.kernels import cpu

    if cpu.why_unavailable() is not None:
        pytest.skip(cpu.why_unavailable())


def _close_fp32(out: torch.Tensor, ref64: torch.Tensor) -> None:
    """fp32 through three layers of K <= 160 with N(0, 1) weights: outputs reach the hundreds, so the absolute
    tolerance follows the output's scale (a few fp32 ulps of its largest entry per layer)."""
    ref64 = ref64.detach()
    torch.testing.assert_close(out.detach().double(), ref64, atol=1e-5 * float(ref64.abs().max()), rtol=1e-4)


def test_layer_running_cpu_layouts_holds_them_instead_of_its_packed_form(seeded, tmp_path):
    """At 50% fp32 the packed form (2.1 B/entry) plus a CPU layout would exceed dense (4 B/entry): a layer whose
    plan runs only the CPU layouts keeps them (sharing one copy of the values) and drops its packed buffers."""
    _cpu_kernels_or_skip()
    dense = _mlp(seeded)
    sparse = sc.sparsify(copy.deepcopy(dense), sc.SparsityConfig("unstructured", 0.5))
    before = {k: v.clone() for k, v in sparse.state_dict().items()}
    ref = copy.deepcopy(dense).double()
    for f, m in sc.sparse_modules(sparse).items():
        ref.get_submodule(f).weight.data = m.dense_weight().double()
    for mod in sc.sparse_modules(sparse).values():
        mod.load_plan({1: "cpu_bitmap", 32: "cpu_columns"})
    for rows in (1, 20):
        x = torch.randn(rows, 96, generator=seeded)
        _close_fp32(sparse(x), ref(x.double()))
    mods = list(sc.sparse_modules(sparse).values())
    assert all(m.state_held and not m.dense_held for m in mods)
    assert not any(name.startswith("packed_") for m in mods for name, _ in m.named_buffers())
    assert all(len(m.prepared_states()) == 2 for m in mods)
    assert sc.resident_bytes(sparse) < sc.resident_bytes(dense)
    assert _same(sparse.state_dict(), before)  # rebuilt bit for bit for saving
    assert all(abs(m.kept_fraction() - float((m.dense_weight() != 0).float().mean())) < 1e-9 for m in mods)
    loaded = sc.load(sc.save(sparse, tmp_path / "m.safetensors"), _mlp(seeded))
    assert _same(loaded.state_dict(), before)
    x = torch.randn(3, 96, generator=seeded)
    for mod in mods:  # a plan that runs dense again holds the dense weight, rebuilt from the layouts
        mod.load_plan({1: "dense"})
    assert all(m.dense_held for m in mods) and _same(sparse.state_dict(), before)
    _close_fp32(sparse(x[:1]), ref(x[:1].double()))


def test_layouts_stay_shared_when_a_plan_grows_after_the_layer_dropped_its_packed_form(seeded):
    """Planned at M = 1 first (the layer then holds only the bitmap layout), then at M = 32: the column layout
    derived from the rebuilt packed form reuses the bitmap layout's values instead of copying them."""
    _cpu_kernels_or_skip()
    sparse = sc.sparsify(_mlp(seeded), sc.SparsityConfig("unstructured", 0.5))
    mods = list(sc.sparse_modules(sparse).values())
    for mod in mods:
        mod.load_plan({1: "cpu_bitmap"})
    sparse(torch.randn(1, 96, generator=seeded))
    assert all(m.state_held for m in mods)
    for mod in mods:
        mod.load_plan({1: "cpu_bitmap", 32: "cpu_columns"})
    sparse(torch.randn(20, 96, generator=seeded))
    for m in mods:
        bitmap, columns = (s[1] for s in m.prepared_states())
        assert columns.values is bitmap.values and columns.row_ptr is bitmap.row_ptr
