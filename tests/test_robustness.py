"""Edge cases a deployment hits: dtype/device moves after planning, train-mode planning, shared layers,
wrong skeletons, malformed headers and caches, bare layers, string padding."""
import copy
import json
import struct

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecore as sc
from sparsecore.backends import Backend


def _planned_csr_layer(tmp_path):
    lin = nn.Linear(64, 32)
    sl = sc.SparseLinear.from_dense(lin, torch.ones(32, 64, dtype=torch.bool), "unstructured")
    model = nn.Sequential(sl)
    sl.set_plan(1, Backend.TORCH_CSR)  # as the planner would on CPU at high sparsity
    return lin, model


def test_dtype_move_drops_the_plan_and_still_runs(tmp_path, seeded):
    lin, model = _planned_csr_layer(tmp_path)
    model.half()
    assert model[0].plan == {} and model[0].packed.dtype == torch.float16
    x = torch.randn(1, 64, generator=seeded)
    with torch.no_grad():
        ref = F.linear(x.half().double(), lin.weight.half().double(), lin.bias.half().double())
        torch.testing.assert_close(model(x.half()).double(), ref, atol=2e-2, rtol=1e-2)


def test_float64_conversion_refused_without_damage(seeded):
    lin, model = _planned_csr_layer(None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="cannot convert to torch.float64"):
        model.double()
    after = model.state_dict()
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        model(torch.randn(2, 64, generator=seeded))


def test_planning_in_train_mode_leaves_batchnorm_alone(tmp_path, seeded):
    model = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Linear(16, 4)).train()
    bn_state = copy.deepcopy(model[1].state_dict())
    sc.sparsify(model, sc.SparsityConfig("unstructured", 0.5), example_inputs=(torch.randn(8, 16, generator=seeded),))
    assert model.training and model[1].training
    for k, v in model[1].state_dict().items():
        assert torch.equal(v, bn_state[k]), k


def test_shared_module_swapped_everywhere(seeded):
    lin = nn.Linear(8, 8)
    model = nn.Module()
    model.a = lin
    model.b = lin
    sc.sparsify(model, sc.SparsityConfig("unstructured", 0.5))
    assert isinstance(model.a, sc.SparseLinear) and model.a is model.b


def test_bare_layer_returns_its_twin():
    new = sc.sparsify(nn.Linear(8, 4), sc.SparsityConfig("nm"))
    assert isinstance(new, sc.SparseLinear) and new.packed.kind == "nm"


def test_wrong_skeleton_rejected_even_when_smaller(tmp_path):
    model = sc.sparsify(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)), sc.SparsityConfig("unstructured", 0.5))
    path = sc.save(model, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="does not fit model weight shape"):
        sc.load(path, nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)))


def test_bias_validated():
    packed = sc.pack(torch.randn(8, 4), torch.ones(8, 4, dtype=torch.bool), "unstructured")
    with pytest.raises(ValueError, match=r"bias must have shape \[8\]"):
        sc.SparseLinear(packed, torch.zeros(1))
    with pytest.raises(TypeError, match="bias dtype"):
        sc.SparseLinear(packed, torch.zeros(8, dtype=torch.float16))


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8: 8 + n])
    inner = json.loads(header["__metadata__"]["sparsecore"])
    edit(inner)
    header["__metadata__"]["sparsecore"] = json.dumps(inner)
    blob = json.dumps(header).encode()
    blob += b" " * ((8 - len(blob) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


@pytest.mark.parametrize("edit,match", [
    (lambda h: h["layers"].__setitem__("0", "oops"), "header entry must be an object"),
    (lambda h: h["layers"]["0"].__setitem__("backend", "bogus"), "unknown backend 'bogus'"),
    (lambda h: h["layers"]["0"].__setitem__("type", "conv3d"), "type must be 'linear' or 'conv2d'"),
    (lambda h: h["layers"]["0"]["packed"].__setitem__("kind", "nm"), "layer '0'"),
])
def test_malformed_headers_name_the_layer(tmp_path, edit, match):
    model = sc.sparsify(nn.Sequential(nn.Linear(16, 8)), sc.SparsityConfig("unstructured", 0.5))
    path = sc.save(model, tmp_path / "m.safetensors")
    _rewrite_header(path, edit)
    with pytest.raises(sc.FileFormatError, match=match):
        sc.load(path, nn.Sequential(nn.Linear(16, 8)))


def test_malformed_or_stale_cache_entries_are_remeasured(tmp_path, seeded):
    model = sc.sparsify(nn.Sequential(nn.Linear(32, 16)), sc.SparsityConfig("unstructured", 0.9))
    x = torch.randn(1, 32, generator=seeded)
    path = tmp_path / "plans.json"
    first = sc.plan(model, (x,), cache_path=path, rep=3)
    cache = json.loads(path.read_text())
    (key,) = cache
    for bad in ("x", {"chosen": ["dense"]}, {"chosen": "triton_spmm"}, {"chosen": "cusparselt"}):
        path.write_text(json.dumps({key: bad}))
        again = sc.plan(model, (x,), cache_path=path, rep=3)
        # re-measured: the choice is one of the backends just timed on this CPU, never the stale entry
        assert not again[0].cached and again[0].chosen in again[0].times_ms, bad
        assert again[0].chosen not in ("triton_spmm", "cusparselt"), bad
    assert first[0].chosen in first[0].times_ms


@pytest.mark.parametrize("padding,kernel,dilation", [("same", 3, 1), ("valid", 3, 1), ("same", 5, 2)])
def test_string_padding(padding, kernel, dilation, seeded):
    conv = nn.Conv2d(4, 6, kernel, padding=padding, dilation=dilation)
    mask = torch.rand(conv.weight.shape, generator=seeded) > 0.5
    sparse = sc.SparseConv2d.from_dense(conv, mask, "unstructured")
    x = torch.randn(1, 4, 9, 9, generator=seeded)
    with torch.no_grad():
        ref = F.conv2d(x.double(), torch.where(mask, conv.weight, 0).double(), conv.bias.double(), 1, padding, dilation)
        torch.testing.assert_close(sparse(x).double(), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="padding='same' needs"):
        sc.SparseConv2d.from_dense(nn.Conv2d(4, 6, 4, padding="same"), torch.ones(6, 4, 4, 4, dtype=torch.bool), "unstructured")
