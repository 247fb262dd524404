"""The providers of ``bench.bench_cpu``: one linear ``y [M, N] = x [M, K] @ W^T`` computed every way there is.

Groups (``Provider.group``):

* ``dense``: ``F.linear`` on the masked dense weight in the case's dtype (oneDNN / MKL): the baseline.
* ``peer``: CPU sparse libraries on the same weight: torch CSR and BSR (``torch.sparse.mm``, MKL), scipy
  CSR (single-threaded), ``sparse_dot_mkl`` (MKL inspector-executor). A peer that is not installed, or
  cannot run this dtype, is skipped with the reason.
* ``sparsecore``: every registered ``linear`` backend for the packed weight's format that can run on this
  CPU input, except the pure-torch ``reference``, each through ``SparseLinear`` with the backend forced
  (``sc_<backend>``); and ``sc_auto``, the module after ``sparsecore.plan`` on the same input. Backends
  added later (native CPU kernels) are picked up from the registry with no change here.

``nbytes`` is the weight representation the provider reads per call (for ``sc_*``: the backend's prepared
state, which may be the packed weight itself). Construction, conversion and planning happen here, never in
the timed calls.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import sparsecore as sc
from sparsecore.memory import object_bytes
from sparsecore.backends import Backend, implementations
from sparsecore.backends.registry import lookup
from sparsecore.formats import PackedWeight


BSR_BLOCK = 16  # torch BSR block (16 and 32 measured alike on random masks: blocks are rarely empty)


@dataclass
class Provider:
    name: str
    group: str                    # "dense" | "peer" | "sparsecore"
    fn: Callable[[], torch.Tensor]
    nbytes: int                   # weight representation read per call
    detail: str = ""              # e.g. the planner's choice for sc_auto
    extra: dict = field(default_factory=dict)


def tensor_nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def dense_provider(w: torch.Tensor, x: torch.Tensor) -> Provider:
    return Provider("dense", "dense", lambda: F.linear(x, w), tensor_nbytes(w), "F.linear")


def torch_peers(w: torch.Tensor, x: torch.Tensor) -> tuple[list[Provider], dict[str, str]]:
    """torch CSR and BSR (``torch.sparse.mm``: sparse must be the left operand, so ``(W @ x^T)^T``)."""
    ready, skipped = [], {}
    w, x_in, suffix = _fp32_operands(w, x)
    with warnings.catch_warnings():  # torch flags CSR/BSR as beta on every conversion
        warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta")
        for name, convert in (("torch_csr", lambda: w.to_sparse_csr()),
                              (f"torch_bsr{BSR_BLOCK}", lambda: w.to_sparse_bsr((BSR_BLOCK, BSR_BLOCK)))):
            name += suffix
            if w.shape[0] % BSR_BLOCK and name.startswith("torch_bsr"):
                skipped[name] = f"N = {w.shape[0]} is not a multiple of the {BSR_BLOCK} block"
                continue
            try:
                ws = convert()
                torch.sparse.mm(ws, x_in()[:1].t())  # fails here for dtypes MKL's kernel lacks
            except (RuntimeError, NotImplementedError) as e:
                skipped[name] = f"{w.dtype} unsupported on CPU: {str(e).splitlines()[0][:120]}"
                continue
            parts = (ws.crow_indices(), ws.col_indices(), ws.values())
            fn = lambda ws=ws: torch.sparse.mm(ws, x_in().t()).t().to(x.dtype)  # noqa: E731  (.to: no-op in fp32)
            ready.append(Provider(name, "peer", fn, tensor_nbytes(*parts)))
    return ready, skipped


def _fp32_operands(w: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, Callable[[], torch.Tensor], str]:
    """The peers compute in float32 only (MKL's sparse kernels, numpy). A bf16/fp16 case gives them an fp32 copy
    of the weight and casts ``x`` in and ``y`` back per call (timed), named ``<peer>_via_fp32``."""
    if x.dtype == torch.float32:
        return w, (lambda: x), ""
    return w.float(), (lambda: x.float()), "_via_fp32"


def scipy_peers(w: torch.Tensor, x: torch.Tensor) -> tuple[list[Provider], dict[str, str]]:
    """scipy CSR (``W @ x^T``, one thread) and sparse_dot_mkl on the same CSR matrix."""
    w, x_in, suffix = _fp32_operands(w, x)
    try:
        import scipy.sparse
    except ImportError:
        return [], {"scipy_csr" + suffix: "scipy is not installed", "sparse_dot_mkl" + suffix: "scipy is not installed"}
    wcsr = scipy.sparse.csr_matrix(w.numpy())
    nbytes = wcsr.data.nbytes + wcsr.indices.nbytes + wcsr.indptr.nbytes
    # x^T is a (K, M) view of x's buffer: no copy per call in float32
    scipy_fn = lambda: torch.from_numpy((wcsr @ x_in().numpy().T).T).to(x.dtype)  # noqa: E731
    ready = [Provider("scipy_csr" + suffix, "peer", scipy_fn, nbytes, "single-threaded")]
    dot, why = _sparse_dot_mkl()
    if dot is None:
        return ready, {"sparse_dot_mkl" + suffix: why}
    mkl_fn = lambda: torch.from_numpy(dot(wcsr, x_in().numpy().T).T).to(x.dtype)  # noqa: E731
    ready.append(Provider("sparse_dot_mkl" + suffix, "peer", mkl_fn, nbytes))
    return ready, {}


def _sparse_dot_mkl() -> tuple[Callable | None, str]:
    """``dot_product_mkl`` or the reason it is unavailable (points it at pip's ``mkl`` runtime if present)."""
    if "MKL_RT" not in os.environ:
        import sys
        libs = sorted(Path(sys.prefix, "lib").glob("libmkl_rt.so*"))
        if libs:
            os.environ["MKL_RT"] = str(libs[-1])
    try:
        from sparse_dot_mkl import dot_product_mkl
    except ImportError as e:
        return None, (f"not usable ({str(e).splitlines()[0][:100]}); "
                      "pip install sparse-dot-mkl mkl -c constraints-cpu.txt")
    return dot_product_mkl, ""


def sparsecore_providers(packed: PackedWeight, x: torch.Tensor, *, plan_rep: int = 20
                         ) -> tuple[list[Provider], dict[str, str]]:
    """``sc_<backend>`` for every registered CPU-capable linear backend of ``packed``'s format, then ``sc_auto``."""
    ready, skipped = [], {}
    for impl in implementations("linear", packed.kind):
        if impl.name == Backend.REFERENCE.value:
            continue
        name = f"sc_{impl.name}"
        reason = impl.check(packed, x)
        if reason is not None:
            skipped[name] = reason
            continue
        mod = sc.SparseLinear(packed, None, backend=impl.backend)
        with torch.no_grad():
            mod(x)  # prepares the backend's state, outside the timing
        ready.append(Provider(name, "sparsecore", _no_grad(mod, x), object_bytes(mod.prepared(impl))))
    auto = sc.SparseLinear(packed, None, backend=Backend.AUTO)
    entries = sc.plan(nn.Sequential(auto), (x,), use_cache=False, rep=plan_rep)
    impl = lookup("linear", entries[0].chosen, packed.kind)
    ready.append(Provider("sc_auto", "sparsecore", _no_grad(auto, x), object_bytes(auto.prepared(impl)),
                          f"planner chose {impl.name}"))
    return ready, skipped


def _no_grad(mod: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def call() -> torch.Tensor:
        with torch.no_grad():
            return mod(x)
    return call


def all_providers(w: torch.Tensor, packed: PackedWeight, x: torch.Tensor, *, plan_rep: int = 20
                  ) -> tuple[list[Provider], dict[str, str]]:
    """Every provider of one case (dense first) and ``{name: reason}`` for those that cannot run it."""
    ready, skipped = [dense_provider(w, x)], {}
    for build in (torch_peers, scipy_peers):
        got, why = build(w, x)
        ready += got
        skipped.update(why)
    got, why = sparsecore_providers(packed, x, plan_rep=plan_rep)
    return ready + got, {**skipped, **why}
