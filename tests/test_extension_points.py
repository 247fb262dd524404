"""Extension points: a format and a backend defined here, outside the package, run through sparsify, plan,
save and load with no edit to sparsecore; and the import layering ARCHITECTURE.md states holds."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecore as sc
from helpers import assert_close_to_ref, nonzero_randn
from sparsecore.backends import BackendImpl, implementations, register, unregister
from sparsecore.backends.registry import linear_why_not
from sparsecore.formats import FORMATS, PackedWeight, register_format, unregister_format
from sparsecore.formats.base import (FormatError, check_weight_and_mask, dtype_from_name, dtype_name, expect_state,
                                     expect_tensor, meta_shape)

ROOT = Path(__file__).resolve().parents[1]


class ToyCOO(PackedWeight):
    """Toy coordinate format: ``rows``/``cols`` int64 ``[nnz]`` and ``values`` ``[nnz]`` of a 2-D weight."""

    kind = "toy_coo"
    mask_rule = "unstructured"

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...]):
        self.rows, self.cols, self.values, self.shape, self.dtype = rows, cols, values, tuple(shape), values.dtype

    @classmethod
    def check_config(cls, config: Any) -> None:
        if config.scope != "layer":
            raise ValueError("toy_coo prunes layer by layer")

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor, **params: Any) -> "ToyCOO":
        check_weight_and_mask(weight, mask)
        if weight.dim() != 2:
            raise ValueError("toy_coo stores Linear weights only")
        rows, cols = mask.nonzero(as_tuple=True)
        return cls(rows, cols, weight[rows, cols].contiguous(), tuple(weight.shape))

    def to_dense(self) -> torch.Tensor:
        w = torch.zeros(self.shape, dtype=self.dtype, device=self.values.device)
        w[self.rows, self.cols] = self.values
        return w

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return ({"rows": self.rows, "cols": self.cols, "values": self.values},
                {"kind": self.kind, "version": self.version, "shape": list(self.shape), "dtype": dtype_name(self.dtype)})

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "ToyCOO":
        expect_state(cls, tensors, meta, {"rows", "cols", "values"})
        shape, dtype = meta_shape(meta), dtype_from_name(meta.get("dtype"))
        nnz = tensors["values"].shape[0]
        rows = expect_tensor(tensors, "rows", torch.int64, (nnz,))
        cols = expect_tensor(tensors, "cols", torch.int64, (nnz,))
        values = expect_tensor(tensors, "values", dtype, (nnz,))
        if nnz and (int(rows.max()) >= shape[0] or int(cols.max()) >= shape[1] or int(rows.min()) < 0):
            raise FormatError("toy_coo indices out of range")
        return cls(rows, cols, values, shape)


def _toy_run(state: ToyCOO, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # y[m, r] += x[m, c] * v for each stored (r, c, v): no dense weight involved
    y = torch.zeros(x.shape[0], state.shape[0], dtype=x.dtype, device=x.device)
    y.index_add_(1, state.rows, x[:, state.cols] * state.values)
    return y if bias is None else y + bias


TOY_BACKEND = "toy_coo_scatter"


@pytest.fixture
def toy():
    """Register the toy format and backend for one test, and remove them afterwards."""
    fmt = register_format(ToyCOO)
    impl = register(BackendImpl(TOY_BACKEND, "linear", ("toy_coo",), linear_why_not, lambda p: p, _toy_run))
    try:
        yield fmt, impl
    finally:
        unregister(impl)
        unregister_format(fmt)


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 7))


def _reference(dense: nn.Module, masks: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    w = {f: torch.where(masks[f], dense.get_submodule(f).weight, 0).double() for f in masks}
    b = {f: dense.get_submodule(f).bias.double() for f in masks}
    return F.linear(F.relu(F.linear(x.double(), w["0"], b["0"])), w["2"], b["2"])


def test_toy_format_and_backend_through_sparsify_plan_save_load(toy, seeded, tmp_path):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=seeded)))
    dense = _net()
    config = sc.SparsityConfig("toy_coo", 0.75)                  # the pattern is the new format's kind
    masks = sc.magnitude_masks(dense, config)                     # its mask_rule picks the selection rule
    assert all(int(m.sum()) == m.numel() - round(0.75 * m.numel()) for m in masks.values())
    x = nonzero_randn(5, 24, generator=seeded)
    ref = _reference(dense, masks, x)

    model = _net()
    model.load_state_dict(dense.state_dict())
    model = sc.sparsify(model, config, masks=masks)
    assert {type(m.packed) for m in sc.sparse_modules(model).values()} == {ToyCOO}

    decisions = sc.plan(model, (x,), cache_path=tmp_path / "plan.json", rep=3)
    assert len(decisions) == 2
    for d in decisions:  # the new backend was a candidate next to dense and torch CSR (which apply to every format)
        assert {TOY_BACKEND, "dense", "torch_csr"} <= set(d.times_ms) | set(d.rejected)
        assert TOY_BACKEND not in d.rejected
    with torch.no_grad():
        assert_close_to_ref(model(x), ref, k=40)
        for mod in sc.sparse_modules(model).values():
            mod.backend = TOY_BACKEND                              # forced: runs the toy kernel, nothing else
        assert_close_to_ref(model(x), ref, k=40)

    path = sc.save(model, tmp_path / "toy.safetensors", config=sc.SparsityConfig("toy_coo", 0.75, backend=TOY_BACKEND))
    loaded = sc.load(path, _net())
    assert sc.SparsityConfig.from_json(sc.read(path).header["config"]) == sc.SparsityConfig("toy_coo", 0.75, backend=TOY_BACKEND)
    for fqn, mod in sc.sparse_modules(loaded).items():
        src = model.get_submodule(fqn).packed
        assert isinstance(mod.packed, ToyCOO)
        assert torch.equal(mod.packed.rows, src.rows) and torch.equal(mod.packed.cols, src.cols)
        assert torch.equal(mod.packed.values, src.values)
        assert mod.backend == TOY_BACKEND
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_format_registered_later_gets_the_dense_baselines(toy):
    names = {impl.name for impl in implementations("linear", "toy_coo")}
    assert {"dense", "torch_csr", TOY_BACKEND} <= names
    assert "triton_spmm" not in names                             # format-specific backends stay theirs
    assert sc.Backend(TOY_BACKEND) == TOY_BACKEND and TOY_BACKEND in {b.value for b in sc.Backend}


def test_unregistered_names_are_refused_with_the_known_ones(toy):
    unregister(toy[1])
    with pytest.raises(ValueError, match="backend must be one of"):
        sc.SparsityConfig("toy_coo", 0.5, backend=TOY_BACKEND)
    unregister_format(toy[0])
    with pytest.raises(ValueError, match="pattern must be one of"):
        sc.SparsityConfig("toy_coo", 0.5)
    assert "toy_coo" not in FORMATS


def test_backend_declaration_is_validated():
    run = lambda s, x, b: x  # noqa: E731
    with pytest.raises(ValueError, match="needs must be a subset"):
        BackendImpl("x_backend", "linear", ("nm",), linear_why_not, lambda p: p, run, needs=frozenset({"fpga"}))
    with pytest.raises(ValueError, match="op must be"):
        BackendImpl("x_backend", "matmul", ("nm",), linear_why_not, lambda p: p, run)
    with pytest.raises(ValueError, match="other than 'auto'"):
        BackendImpl("auto", "linear", ("nm",), linear_why_not, lambda p: p, run)
    impl = register(BackendImpl("x_backend", "linear", ("nm",), linear_why_not, lambda p: p, run))
    try:
        with pytest.raises(ValueError, match="registered twice"):
            register(BackendImpl("x_backend", "linear", ("nm",), linear_why_not, lambda p: p, run))
    finally:
        unregister(impl)


# ---- import layering ---------------------------------------------------------------------------------
def _imports(path: Path, package: str) -> set[str]:
    """Absolute module names imported by ``path`` (relative imports resolved against ``package``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.add(mod)
            names |= {f"{mod}.{a.name}" for a in node.names}
    return names


def _modules(folder: Path, package: str) -> dict[Path, set[str]]:
    out = {}
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(folder).with_suffix("").parts
        out[path] = _imports(path, ".".join([package, *parts[:-1]]))  # the package the module sits in
    return out


@pytest.mark.parametrize("folder, package, forbidden", [
    ("sparsecore", "sparsecore", ("bench",)),
    ("sparsecore/formats", "sparsecore.formats", ("sparsecore.backends", "sparsecore.kernels", "sparsecore.modules",
                                                  "sparsecore.planner", "bench")),
    ("sparsecore/masks.py", "sparsecore", ("sparsecore.formats", "sparsecore.backends", "sparsecore.pruning", "bench")),
    ("kernels", "sparsecore.kernels", ("sparsecore.backends", "sparsecore.modules", "sparsecore.planner", "bench")),
    ("sparsecore/backends", "sparsecore.backends", ("sparsecore.modules", "sparsecore.planner", "sparsecore.pruning",
                                                    "bench")),
    ("sparsecore/pruning", "sparsecore.pruning", ("sparsecore.backends", "sparsecore.kernels", "sparsecore.modules",
                                                  "sparsecore.planner", "bench")),
])
def test_import_layering(folder, package, forbidden):
    target = ROOT / folder
    files = {target: _imports(target, package)} if target.is_file() else _modules(target, package)
    bad = [f"{p.relative_to(ROOT)} imports {name}" for p, names in files.items() for name in sorted(names)
           if any(name == f or name.startswith(f + ".") for f in forbidden)]
    assert not bad, bad
