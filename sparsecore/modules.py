"""SparseLinear and SparseConv2d: drop-in replacements holding a packed weight.

They look like the modules they replace (``in_features``/``out_features`` or ``in_channels``/...,
``[out, in]`` weight semantics via ``dense_weight()``, ``bias``, ``extra_repr``). The packed tensors are
buffers, so ``.to(device)``, ``.half()`` and ``state_dict()`` carry them. Execution goes through a
backend (see ``sparsecore.backends``): ``backend="auto"`` runs the planner's choice for the current
batch size when the layer was planned, and the masked dense weight otherwise (never slower than dense by
construction); any other value forces that backend and raises ``BackendUnavailable`` if it cannot run.

One copy per layer. A layer holds what its plan runs, never the packed form *and* a dense copy for it:

* packed-held (after construction or loading, and whenever no bucket of the plan runs dense): the
  ``packed_*`` buffers, plus each planned backend's prepared state (e.g. a CSR copy);
* dense-held (as soon as the layer runs dense: unplanned, forced ``"dense"`` or planned dense for some
  bucket): the masked dense weight as the non-persistent buffer ``dense_weight_held`` plus the flat indices
  of kept entries that are exactly +0.0 (``kept_zeros``, almost always empty), from which the mask and so
  the packed form are rebuilt exactly: ``state_dict()`` (and so ``sparsecore.save``) still writes the
  ``packed_*`` tensors, bit for bit those a packed-held layer holds. Resident bytes are those of dense.

* state-held (the plan runs only backends that can rebuild the weight from their prepared state, e.g. the
  native CPU layouts, ``BackendImpl.unpack``): those prepared states alone, no ``packed_*`` buffers;
  ``state_dict()`` rebuilds and writes the packed tensors, bit for bit, as for dense-held layers.

A plan mixing dense and a sparse backend over batch sizes holds both (dense plus that backend's state).
While the planner measures (``planning()``) both forms are kept; on exit the layer settles to its plan.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .autograd import SparseOpGrad, needs_grad
from .config import SparsityConfig
from .backends import AUTO, Backend, BackendImpl, BackendUnavailable, ConvParams, resolve
from .formats import FORMATS, PackedWeight
from .backends.registry import lookup
from .formats.base import SUPPORTED_DTYPES, dtype_name
from .layers import is_conv1d_t

__all__ = ["SparseLinear", "SparseConv1D", "SparseConv2d", "pack", "kept_mask", "m_bucket"]

_META_FIXED = ("kind", "version", "shape", "dtype")

_DENSE = "dense"  # what an AUTO layer runs at batch sizes the planner has not timed


def pack(weight: torch.Tensor, mask: torch.Tensor, config: SparsityConfig | str, n: int = 2, m: int = 4
         ) -> PackedWeight:
    """Pack ``weight`` under ``mask`` in the format ``config.pattern`` names, with the parameters it declares.

    ``config`` may also be a pattern name (a registered format kind), with ``n``/``m`` for N:M.
    """
    if isinstance(config, str):
        if config not in FORMATS:
            raise ValueError(f"pattern must be one of {sorted(FORMATS)}, got {config!r}")
        config = SparsityConfig(config, n=n, m=m)
    if not isinstance(config, SparsityConfig):
        raise TypeError(f"config must be a SparsityConfig or a pattern name, got {type(config).__name__}")
    fmt = config.format
    return fmt.from_dense(weight.detach(), mask, **fmt.pack_params(config))


def kept_mask(packed: PackedWeight) -> torch.Tensor:
    """The exact bool keep-mask of ``packed`` (kept +0.0 and -0.0 included), from its own index data."""
    tensors, meta = packed.state()
    ones = dict(tensors, values=torch.ones_like(tensors["values"]))
    return FORMATS[meta["kind"]].from_state(ones, meta).to_dense() != 0


@dataclass(frozen=True)
class _PackedShell:
    """What backend checks read of a packed weight, kept while a prepared state stands in for it."""

    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    kept: int


# What a call runs, as ``_dispatch`` hands it to ``forward``: ``(impl.run, prepared state, impl.accepts_nd,
# impl.differentiable)``. A plain tuple: torch.compile guards each item by position (no attribute look-ups on a
# ``BackendImpl`` per layer and call).
_Hit = tuple[Callable[..., torch.Tensor], Any, bool, bool]


def _hit(impl: BackendImpl, state: Any) -> _Hit:
    return impl.run, state, impl.accepts_nd, impl.differentiable


def m_bucket(rows: int) -> int:
    """Planner key for a batch of ``rows`` activation rows: the next power of two (1, 2, 4, ...).

    Traced by torch.compile, ``rows`` may be symbolic (dynamic shapes): it is then bucketed by comparisons
    only, so that the compiled graph guards on the bucket's range ``(b / 2, b]`` rather than on one size:
    it is reused for every batch of the same bucket and recompiled when another bucket (maybe another
    backend) is needed.
    """
    if torch.compiler.is_compiling():
        bucket = 1
        while bucket < rows:
            bucket *= 2
        return bucket
    return 1 if rows <= 1 else 1 << (rows - 1).bit_length()


class _SparseBase(nn.Module):
    """Shared machinery: packed tensors as buffers, per-backend prepared state, backend choice."""

    op: str

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None, backend: Backend | str) -> None:
        super().__init__()
        tensors, meta = packed.state()
        self._meta: dict[str, Any] = dict(meta)
        self._tensor_names = tuple(tensors)
        for name, t in tensors.items():
            self.register_buffer(f"packed_{name}", t)
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (packed.shape[0],):
                raise ValueError(f"bias must have shape [{packed.shape[0]}] (one per output), got "
                                 f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
            if bias.dtype != packed.dtype:
                raise TypeError(f"bias dtype {bias.dtype} differs from the weight's {packed.dtype}")
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.backend = backend
        # m_bucket -> backend name, filled by sparsecore.planner. Plain ``str`` values and keys, here and in
        # ``_resolved``: torch.compile guards them with one C++ equality each (``_dispatch``).
        self._plan: dict[int, str] = {}
        self._packed: PackedWeight | None = packed  # None while dense- or state-held
        self._owner: Backend | None = None  # the backend whose prepared state stands in for the packed form
        self._shell: _PackedShell | None = None
        self._prepared: dict[Backend, Any] = {}
        self._resolved: dict[tuple[str, torch.device, torch.dtype], _Hit] = {}
        self._pinned = 0  # > 0 inside planning(): keep every representation, switch none

    # -- packed weight ---------------------------------------------------------------------------
    @property
    def packed(self) -> PackedWeight:
        """The packed weight (rebuilt from the dense weight or the owning prepared state while not packed-held)."""
        if self._packed is not None:
            return self._packed
        return self._pack_from_state() if self._owner is not None else self._pack_from_dense()

    @property
    def dense_held(self) -> bool:
        """True when the layer holds its masked dense weight instead of the packed buffers (module docstring)."""
        return self._packed is None and self._owner is None

    @property
    def state_held(self) -> bool:
        """True when a backend's prepared state stands in for the packed buffers (module docstring)."""
        return self._owner is not None

    @property
    def format_meta(self) -> dict[str, Any]:
        """The packed format's metadata (``packed.state()[1]``) without rebuilding a dense-held layer's form."""
        return dict(self._meta)

    def kept_fraction(self) -> float:
        """Kept entries / all entries of the weight."""
        if self.dense_held:
            w = self.dense_weight_held
            kept = int(((w != 0) | torch.signbit(w)).sum()) + self.kept_zeros.numel()
            return kept / max(w.numel(), 1)
        if self._owner is not None:
            return self._shell.kept / max(math.prod(self._shell.shape), 1)
        p = self._packed
        return p.state()[0]["values"].numel() / max(math.prod(p.shape), 1)

    @property
    def packed_tensor_names(self) -> tuple[str, ...]:
        """Names of the packed tensors (``packed.state()``'s keys); buffer ``packed_<name>`` holds each."""
        return self._tensor_names

    # -- backend choice --------------------------------------------------------------------------
    @property
    def backend(self) -> Backend:
        """The forced backend, or ``"auto"`` (the plan's choice per batch size, dense where unplanned)."""
        return self._backend

    @backend.setter
    def backend(self, name: Backend | str) -> None:
        self._backend = Backend(name)
        self._forced = None if self._backend == AUTO else self._backend.value  # what _dispatch reads

    @property
    def plan(self) -> Mapping[int, Backend]:
        """Read-only ``{m_bucket: backend}`` chosen by ``sparsecore.planner`` (``set_plan`` / ``load_plan`` write it)."""
        return MappingProxyType({bucket: Backend(name) for bucket, name in self._plan.items()})

    def dense_weight(self) -> torch.Tensor:
        """The masked dense weight (``[out, in]`` or ``[C_out, C_in, kh, kw]``), materialised anew."""
        return self.dense_weight_held.clone() if self.dense_held else self.packed.to_dense()

    # -- storage: one copy per layer (module docstring) ----------------------------------------------
    def _pack_from_dense(self) -> PackedWeight:
        w = self.dense_weight_held
        mask = (w != 0) | torch.signbit(w)  # pruned entries are +0.0; kept -0.0 has its sign bit
        mask.view(-1)[self.kept_zeros] = True
        return self._pack(w, mask)

    def _pack_from_state(self) -> PackedWeight:
        impl = lookup(self.op, self._owner.value, self._meta["kind"])
        packed = self._pack(*impl.unpack(self._prepared[self._owner]))
        for backend, state in self._prepared.items():  # rebuilt equal: what they derived from it still holds
            other = lookup(self.op, backend, self._meta["kind"])
            if other is not None and other.adopt is not None:
                other.adopt(state, packed)
        return packed

    def _pack(self, w: torch.Tensor, mask: torch.Tensor) -> PackedWeight:
        params = {k: v for k, v in self._meta.items() if k not in _META_FIXED}
        packed = FORMATS[self._meta["kind"]].from_dense(w, mask, **params)
        if packed.state()[1] != self._meta:
            raise RuntimeError(f"rebuilding the {self._meta['kind']} packed weight changed its metadata: "
                               f"{packed.state()[1]} != {self._meta}")
        return packed

    def _hold_dense(self) -> None:
        if self.dense_held:
            return
        self._hold_packed()
        p = self._packed
        w = self._prepared.get(_DENSE)
        if w is None:
            w = p.to_dense()
        zeros = (kept_mask(p) & (w == 0) & ~torch.signbit(w)).reshape(-1).nonzero().reshape(-1)
        for name in self._tensor_names:
            del self._buffers[f"packed_{name}"]
        self.register_buffer("dense_weight_held", w, persistent=False)
        self.register_buffer("kept_zeros", zeros, persistent=False)
        self._packed = None
        self._prepared.pop(_DENSE, None)
        self._resolved.clear()

    def _hold_packed(self) -> None:
        if self._packed is not None:
            return
        if self._owner is not None:
            packed = self._pack_from_state()
            tensors, _ = packed.state()
            for name in self._tensor_names:
                self.register_buffer(f"packed_{name}", tensors[name])
            self._packed, self._owner, self._shell = packed, None, None
            self._resolved.clear()
            return
        packed = self._pack_from_dense()
        dense = self.dense_weight_held
        del self._buffers["dense_weight_held"], self._buffers["kept_zeros"]
        tensors, _ = packed.state()
        for name in self._tensor_names:
            self.register_buffer(f"packed_{name}", tensors[name])
        self._packed = packed
        if self._pinned:
            self._prepared[Backend(_DENSE)] = dense
        self._resolved.clear()

    def _probe_shape(self) -> tuple[int, ...]:
        """An input shape with zero rows that the layer's backends accept (for checks ahead of any call)."""
        raise NotImplementedError

    def _runs(self) -> set[str]:
        if self.backend != AUTO:
            return {self.backend.value}
        return set(self._plan.values()) or {_DENSE}

    def _hold_state(self, owner: Backend) -> None:
        p = self._packed
        kept = p.state()[0]["values"].numel()
        self._shell = _PackedShell(self._meta["kind"], tuple(p.shape), p.dtype, p.device, kept)
        for name in self._tensor_names:
            del self._buffers[f"packed_{name}"]
        self._packed, self._owner = None, owner
        self._resolved.clear()

    def _state_owner(self, runs: set[str]) -> Backend | None:
        """A prepared state to stand in for the packed form: once every backend the plan runs is prepared (so
        that they could share what they derive from the packed form) and each can unpack its state."""
        impls = [lookup(self.op, b, self._meta["kind"]) for b in sorted(runs)]
        if not impls or not all(i is not None and i.unpack is not None and i.backend in self._prepared
                                for i in impls):
            return None
        return impls[0].backend

    def _try_hold_state(self) -> None:
        if self._pinned or self._packed is None:
            return
        runs = self._runs()
        owner = None if _DENSE in runs else self._state_owner(runs)
        if owner is not None:
            self._hold_state(owner)

    def _settle(self) -> None:
        """Hold what the plan runs (module docstring); drop prepared states no plan uses."""
        if self._pinned:
            return
        runs = self._runs()
        if self._owner is not None and self._owner.value not in runs:
            self._hold_packed()  # rebuilt while the owning state still exists
        if _DENSE in runs:
            self._hold_dense()
        elif self.dense_held:
            self._hold_packed()
        self._prepared = {b: st for b, st in self._prepared.items() if b in runs and b != _DENSE}
        self._try_hold_state()
        self._resolved.clear()
        self._resolve_ahead(runs)

    def _resolve_ahead(self, runs: set[str]) -> None:
        """Resolve and prepare each backend of ``runs`` for the layer's own device and dtype now.

        torch.compile traces ``forward``, and a trace cannot run a backend's checks (they look for a compiler,
        build and load the native kernels) or its ``prepare`` (native layout builders): were they left to the
        first call, a model compiled right after ``sparsecore.plan`` would break its graph in every layer.
        An input of another dtype or device still misses the cache and gets the checks (and their error).
        A backend that cannot run is left unresolved, so that the call needing it raises ``BackendUnavailable``.
        """
        dtype, device = self.weight_dtype, self.packed_device
        probe = torch.empty(self._probe_shape(), dtype=dtype, device=device)  # zero rows: checks read no data
        impls = []
        for name in sorted(runs):
            if name == _DENSE and self.dense_held:
                impls.append(lookup(self.op, _DENSE, self._meta["kind"]))
                continue
            try:
                impl = resolve(self.op, name, self._shell if self._owner is not None else self.packed, probe)
            except BackendUnavailable:
                continue
            self.prepared(impl)  # may hand the weight to a state (``_try_hold_state``), which clears the cache
            impls.append(impl)
        for impl in impls:  # so the cache is filled once every state exists
            self._resolved[(impl.backend.value, device, dtype)] = _hit(impl, self.prepared(impl))

    @contextmanager
    def planning(self):
        """Keep the packed form and every prepared state while the planner times backends; settle on exit."""
        self._pinned += 1
        try:
            self._hold_packed()
            yield self
        finally:
            self._pinned -= 1
            self._settle()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._packed is None:  # state dicts (and so files) always carry the packed form
            tensors, _ = self.packed.state()
            for name in self._tensor_names:
                destination[f"{prefix}packed_{name}"] = tensors[name]

    def _rebuild(self) -> None:
        tensors = {name: getattr(self, f"packed_{name}") for name in self._tensor_names}
        floats = {t.dtype for t in tensors.values() if t.is_floating_point()}
        if len(floats) == 1:
            self._meta["dtype"] = dtype_name(floats.pop())
        self._packed = FORMATS[self._meta["kind"]].from_state(tensors, self._meta)
        self._prepared.clear()
        self._resolved.clear()

    def _apply(self, fn, recurse: bool = True):  # .to(), .half(), .cuda() ... keep the packed view in sync
        # Probe the conversion on an empty tensor first, so an unsupported dtype leaves the module untouched.
        probe = fn(torch.empty(0, dtype=self.weight_dtype, device=self.packed_device))
        if probe.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{type(self).__name__} holds float32/float16/bfloat16 weights; cannot convert to "
                            f"{probe.dtype} (keep a dense copy for float64 references)")
        moved = (probe.dtype, probe.device) != (self.weight_dtype, self.packed_device)
        was_dense = self._packed is None  # dense- or state-held: settle back after the conversion
        self._hold_packed()  # convert the packed form: a kept value rounding to +0.0 must stay kept
        super()._apply(fn, recurse)
        if not self._holds({name: getattr(self, f"packed_{name}") for name in self._tensor_names}):
            self._rebuild()  # a no-op move hands back the same tensors: the packed view is still valid
        if moved:
            self._plan.clear()  # timings were for another device or dtype: re-plan, run dense until then
        elif was_dense:
            self._settle()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._hold_packed()
        # Loading the very tensors the packed view holds (``sparsecore.load`` builds the module from the file's
        # tensors, then assigns them) changes nothing: skip a second validation of the packed data.
        same = self._holds({name: state_dict.get(f"{prefix}packed_{name}") for name in self._tensor_names})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if not same:
            self._rebuild()

    def _holds(self, tensors: dict[str, Any]) -> bool:
        """True when ``tensors`` are the very objects (not copies) the packed view is built on."""
        if self._packed is None:
            return False
        held = self._packed.state()[0]
        return held.keys() == tensors.keys() and all(held[n] is t for n, t in tensors.items())

    # -- execution -------------------------------------------------------------------------------
    def _dispatch(self, x: torch.Tensor, rows: int) -> _Hit:
        """``(run, state, accepts_nd, differentiable)`` for this input. Checks run once per (backend, device, dtype).

        Under torch.compile this is what each call's guards check, so it reads only plain attributes: the
        forced name (``None`` or a ``str``), the plan's ``str`` for the bucket and one ``_resolved`` entry whose
        key is made of constants. Dynamo then guards each with one C++ equality or dict look-up instead of a
        Python lambda per ``Backend`` (a ``str`` subclass) and a walk over every key of ``_resolved``. Any
        change of plan, forced backend, representation, device or dtype changes one of them (or drops the
        entry: ``_resolved`` is cleared whenever a state changes), so the compiled graph is not reused.
        """
        backend = self._forced
        if backend is None:
            backend = self._plan.get(m_bucket(rows), _DENSE)
        hit = self._resolved.get((backend, x.device, x.dtype))
        if hit is None:
            hit = self._resolve_for(backend, x)
        return hit

    @torch.compiler.disable
    def _resolve_for(self, backend: str, x: torch.Tensor) -> _Hit:
        """Check, resolve and prepare ``backend`` for ``x`` and cache the result.

        Eager code, also under torch.compile (a graph break there): checks and ``prepare`` cannot be traced.
        Planned and forced backends are resolved ahead (``_resolve_ahead``), so a compiled model only gets here
        for what no plan foresaw (a batch bucket the planner did not time, another dtype): that call runs as it
        would eagerly, and the cache entry it adds fails the trace's guard, so the next call recompiles
        without the break. Plan every batch size a compiled model will see.
        """
        self._check_input(x)
        if backend == _DENSE and not self.dense_held:
            self._settle()
        x_op = x.reshape(-1, x.shape[-1]) if self.op == "linear" else x  # backends see the 2-D view
        if self.dense_held and backend == _DENSE:  # the dense baseline runs every format
            impl = lookup(self.op, _DENSE, self._meta["kind"])
        else:
            impl = resolve(self.op, backend, self._shell if self._owner is not None else self.packed, x_op)
        hit = self._resolved[(Backend(backend).value, x.device, x.dtype)] = _hit(impl, self.prepared(impl))
        return hit

    def run_backend(self, impl: BackendImpl, x: torch.Tensor) -> torch.Tensor:
        """Run one backend directly (the planner's timing path): linear ``x [M, K]``, conv ``x [B, C, H, W]``."""
        state = self.prepared(impl)
        return impl.run(state, x, self.bias) if self.op == "linear" else impl.run(state, x, self.bias, self.conv)

    def set_plan(self, bucket: int, backend: Backend | str) -> None:
        """Record the planner's choice for ``m_bucket`` ``bucket``; drop prepared state no plan uses any more."""
        self._plan[bucket] = Backend(backend).value
        self._settle()

    def load_plan(self, plan: Mapping[int, Backend | str]) -> None:
        """Replace the whole plan (e.g. with another module's ``plan``: plans are per machine and not saved)."""
        new = {int(bucket): Backend(backend).value for bucket, backend in plan.items()}
        self._plan = new
        self._settle()

    def prepared_states(self) -> list[Any]:
        """The backends' one-time states held now (a dense copy, a CSR tensor, ...): for memory accounting."""
        return list(self._prepared.values())

    def prepared(self, impl: BackendImpl) -> Any:
        """The backend's one-time state (built on first use, dropped on device/dtype change)."""
        if self.dense_held and impl.backend == _DENSE:
            return self.dense_weight_held
        state = self._prepared.get(impl.backend)
        if state is None:
            state = impl.prepare(self.packed)
            self._prepared[impl.backend] = state
            self._try_hold_state()
        return state

    @property
    def weight_dtype(self) -> torch.dtype:
        if self._owner is not None:
            return self._shell.dtype
        return self.dense_weight_held.dtype if self.dense_held else self._packed.dtype

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dtype != self.weight_dtype:
            raise TypeError(f"{type(self).__name__}: input dtype {x.dtype} does not match weight dtype "
                            f"{self.weight_dtype}; cast the input or the module")
        if x.device != self.packed_device:
            raise ValueError(f"{type(self).__name__}: input on {x.device}, weight on {self.packed_device}")

    @property
    def packed_device(self) -> torch.device:
        if self.dense_held:
            return self.dense_weight_held.device
        if self._owner is not None:
            return self._shell.device
        return getattr(self, f"packed_{self._tensor_names[0]}").device

    def extra_repr(self) -> str:
        if self.dense_held:
            held = "held=dense"
        elif self._owner is not None:
            held = f"held={self._owner.value} state"
        else:
            p = self._packed
            held = f"bytes={p.nbytes} ({p.nbytes / max(p.dense_nbytes, 1):.3f} of dense)"
        return (f"format={self._meta['kind']}, dtype={dtype_name(self.weight_dtype)}, {held}, "
                f"backend={self.backend.value}, bias={self.bias is not None}")


class SparseLinear(_SparseBase):
    """``y = x @ W^T + b`` with ``W [out_features, in_features]`` packed.

    Input ``[..., in_features]`` -> output ``[..., out_features]``.

    >>> lin = nn.Linear(64, 32); mask = torch.rand(32, 64) > 0.9
    >>> sl = SparseLinear.from_dense(lin, mask, "unstructured")
    """

    op = "linear"

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None, backend: Backend | str = AUTO):
        if len(packed.shape) != 2:
            raise ValueError(f"SparseLinear needs a 2-D packed weight, got shape {packed.shape}")
        super().__init__(packed, bias, backend)
        self.out_features, self.in_features = packed.shape

    @classmethod
    def from_dense(cls, module: nn.Linear, mask: torch.Tensor, pattern: SparsityConfig | str, n: int = 2, m: int = 4,
                   backend: Backend | str = AUTO) -> "SparseLinear":
        """Build from an ``nn.Linear`` (or a subclass keeping its forward) and a bool keep-mask of its weight's
        shape (``pattern``: see ``pack``). GPT-2 ``Conv1D`` layers go through ``SparseConv1D.from_dense``."""
        if not isinstance(module, nn.Linear):
            raise TypeError(f"SparseLinear.from_dense expects nn.Linear, got {type(module).__name__}")
        return cls(pack(module.weight, mask, pattern, n, m), module.bias, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear expects [..., {self.in_features}] input, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        run, state, accepts_nd, differentiable = self._dispatch(x, x.numel() // max(1, self.in_features))
        if accepts_nd and (differentiable or not needs_grad(x, self.bias)):
            return run(state, x, self.bias)
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)  # (M, K)
        if differentiable or not needs_grad(x2, self.bias):
            y = run(state, x2, self.bias)  # (M, N)
        else:
            y = SparseOpGrad.apply(x2, self.bias, lambda xx, b: run(state, xx, b), self.dense_weight, None)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def _probe_shape(self) -> tuple[int, ...]:
        return (0, self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + super().extra_repr()


class SparseConv1D(SparseLinear):
    """Sparse twin of transformers' GPT-2 ``Conv1D`` (``y = x @ W + b`` with ``W [nx, nf]``: a linear with a
    transposed weight). Packed ``[nf, nx]`` like any linear; keeps ``nf`` and ``nx``.

    The mask handed to ``from_dense`` has the Conv1D weight's own shape ``[nx, nf]``.
    """

    @property
    def nf(self) -> int:
        return self.out_features

    @property
    def nx(self) -> int:
        return self.in_features

    @classmethod
    def from_dense(cls, module: nn.Module, mask: torch.Tensor, pattern: SparsityConfig | str, n: int = 2, m: int = 4,
                   backend: Backend | str = AUTO) -> "SparseConv1D":
        if not is_conv1d_t(module):
            raise TypeError(f"SparseConv1D.from_dense expects a transformers Conv1D, got {type(module).__name__}")
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(module.weight.shape):
            raise ValueError(f"mask must have the Conv1D weight's shape {tuple(module.weight.shape)} ([nx, nf]), got "
                             f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        return cls(pack(module.weight.t(), mask.t(), pattern, n, m), module.bias, backend)


def _explicit_padding(padding, stride: tuple[int, int], dilation: tuple[int, int], kernel: tuple[int, int]):
    """Integer padding for nn.Conv2d's ``'valid'``/``'same'`` (symmetric 'same' only, as F.conv2d itself needs)."""
    if not isinstance(padding, str):
        return padding
    if padding == "valid":
        return 0
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
        if stride != (1, 1) or any(t % 2 for t in totals):
            raise ValueError(f"padding='same' needs stride 1 and an even total padding; got stride {stride}, "
                             f"kernel {kernel}, dilation {dilation}")
        return tuple(t // 2 for t in totals)
    raise ValueError(f"padding must be integers, 'valid' or 'same', got {padding!r}")


class SparseConv2d(_SparseBase):
    """Conv2d with a packed ``[C_out, C_in/groups, kh, kw]`` weight. Input ``[B, C_in, H, W]``."""

    op = "conv2d"

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None, in_channels: int, stride=1, padding=0,
                 dilation=1, groups: int = 1, backend: Backend | str = AUTO):
        if len(packed.shape) != 4:
            raise ValueError(f"SparseConv2d needs a 4-D packed weight, got shape {packed.shape}")
        super().__init__(packed, bias, backend)
        pair = nn.modules.utils._pair
        padding = _explicit_padding(padding, pair(stride), pair(dilation), tuple(packed.shape[2:]))
        self.conv = ConvParams(pair(stride), pair(padding), pair(dilation), int(groups))
        self.in_channels, self.out_channels = int(in_channels), packed.shape[0]
        self.kernel_size = tuple(packed.shape[2:])
        if packed.shape[1] * groups != in_channels:
            raise ValueError(f"weight has {packed.shape[1]} input channels per group x {groups} groups != in_channels {in_channels}")

    @classmethod
    def from_dense(cls, module: nn.Conv2d, mask: torch.Tensor, pattern: SparsityConfig | str, n: int = 2, m: int = 4,
                   backend: Backend | str = AUTO) -> "SparseConv2d":
        """Build from an ``nn.Conv2d`` (zero padding mode) and a bool keep-mask of its weight's shape."""
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"SparseConv2d.from_dense expects nn.Conv2d, got {type(module).__name__}")
        if module.padding_mode != "zeros":
            raise ValueError(f"only padding_mode='zeros' is supported, got {module.padding_mode!r}")
        return cls(pack(module.weight, mask, pattern, n, m), module.bias, module.in_channels, module.stride,
                   module.padding, module.dilation, module.groups, backend)

    def _probe_shape(self) -> tuple[int, ...]:
        c = self.conv
        return (0, self.in_channels, *(d * (k - 1) + 1 for d, k in zip(c.dilation, self.kernel_size)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SparseConv2d expects a [B, {self.in_channels}, H, W] input, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        run, state, _, differentiable = self._dispatch(x, x.shape[0])
        if differentiable or not needs_grad(x, self.bias):
            return run(state, x, self.bias, self.conv)
        return SparseOpGrad.apply(x, self.bias, lambda xx, b: run(state, xx, b, self.conv), self.dense_weight,
                                  self.conv)

    def extra_repr(self) -> str:
        c = self.conv
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={c.stride}, "
                f"padding={c.padding}, dilation={c.dilation}, groups={c.groups}, " + super().extra_repr())

