"""Backend registry: backends declare themselves here; the planner and the modules look them up.

A backend is one file in ``sparsecore/backends/`` (found by ``pkgutil``, no list to edit) that calls
``register(BackendImpl(...))`` once per op it runs. The declaration carries everything the rest of the
library needs to know about it:

* ``name`` (the string users pass as ``backend=`` and saved files store), ``op`` and the format kinds it
  accepts (``ALL_FORMATS`` for backends that run any format through ``to_dense()``, including formats
  registered later);
* ``why_not(packed, x)``: a reason string when it cannot run this weight on this input, ``None`` when it can;
* ``prepare(packed) -> state`` (built once per module, device and dtype) and ``run``;
* ``unpack(state) -> (weight, mask)`` (optional): the weight rebuilt from a prepared state, so that a layer
  running only this backend can hold that state instead of its packed buffers;
* ``adopt(state, packed)`` (optional): ``packed`` was rebuilt from this state, so what the backend derived
  from the old packed form may be reused for it;
* capabilities: ``needs`` (any of ``"triton"``, ``"cuda"``, ``"compiler"``: checked after ``why_not``, and
  read by the planner), ``plannable`` (``False`` for oracles the planner never picks), ``differentiable``
  (autograd sees through ``run``; otherwise ``sparsecore.autograd`` supplies the backward) and
  ``accepts_nd`` (linear ``run`` takes ``x [..., K]`` as is).

Contracts of ``run``:
* op ``"linear"``: ``run(state, x, bias) -> y`` with ``x [M, K]`` (2-D, any strides), ``bias [N] | None``,
  ``y [M, N]`` in ``x``'s dtype.
* op ``"conv2d"``: ``run(state, x, bias, conv) -> y`` with ``x [B, C_in, H, W]`` (NCHW or channels-last
  memory format), ``conv`` a ``ConvParams``; ``y [B, C_out, H_out, W_out]``.

An explicitly requested backend that cannot run raises ``BackendUnavailable`` with the reason; nothing
falls back silently.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from ..formats.base import PackedWeight

__all__ = ["ALL_FORMATS", "AUTO", "Backend", "BackendImpl", "BackendUnavailable", "ConvParams", "register",
           "unregister", "candidates", "implementations", "resolve", "backend_names", "triton_why_not", "REGISTRY"]

ALL_FORMATS = "*"  # ``BackendImpl.kinds`` value: every format, including ones registered after the backend
AUTO = "auto"      # not a backend: "let the planner choose"
CAPABILITIES = ("triton", "cuda", "compiler")


class BackendUnavailable(RuntimeError):
    """A requested backend cannot run this layer on this input/device; the message says why."""


class _BackendNames(type):
    """``Backend.DENSE``-style attribute access and iteration over the declared backend names."""

    def __getattr__(cls, attr: str) -> "Backend":
        if attr.isupper() and attr.lower() in backend_names():
            return cls(attr.lower())
        raise AttributeError(f"no backend named {attr.lower()!r}; declared: {backend_names()}")

    def __iter__(cls) -> Iterator["Backend"]:
        return iter([cls(name) for name in backend_names()])


class Backend(str, metaclass=_BackendNames):
    """A backend name: a ``str`` checked against the declared backends (``"auto"`` lets the planner choose).

    ``Backend("triton_nm") == "triton_nm"``; ``Backend.TRITON_NM`` is the same name; ``.value`` is the plain
    string (kept so that code written against the former enum reads the same). Iterating ``Backend`` yields
    ``"auto"`` and every declared backend. Unknown names raise ``ValueError`` listing the known ones.
    """

    def __new__(cls, name: "str | Backend") -> "Backend":
        if isinstance(name, Backend):
            return name
        if not isinstance(name, str):
            raise TypeError(f"backend must be a name (str), got {type(name).__name__}")
        if name not in backend_names():
            raise ValueError(f"unknown backend {name!r}; one of {backend_names()}")
        return str.__new__(cls, name)

    @property
    def value(self) -> str:
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"Backend({self.value!r})"


@dataclass(frozen=True)
class ConvParams:
    """Conv2d hyper-parameters travelling with a conv call."""

    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1


@dataclass(frozen=True)
class BackendImpl:
    """One backend's declaration for one op (see the module docstring for each field's meaning)."""

    backend: str                                                   # the backend's name
    op: str                                                        # "linear" | "conv2d"
    kinds: tuple[str, ...] | str                                   # format kinds it accepts, or ALL_FORMATS
    why_not: Callable[[PackedWeight, torch.Tensor], str | None]    # None when it can run
    prepare: Callable[[PackedWeight], Any]
    run: Callable[..., torch.Tensor]
    accepts_nd: bool = False  # linear only: ``run`` takes ``x [..., K]`` as is (saves two reshapes per call)
    differentiable: bool = False  # built from torch ops autograd sees through (else sparsecore.autograd steps in)
    needs: frozenset[str] = field(default_factory=frozenset)  # subset of CAPABILITIES
    plannable: bool = True    # False: an oracle (e.g. a per-call decode) the planner never chooses
    # (weight, kept mask) rebuilt from a prepared state: a layer whose plan runs only such backends keeps
    # that state alone and drops its packed buffers (sparsecore.modules, "one copy per layer")
    unpack: Callable[[Any], tuple[torch.Tensor, torch.Tensor]] | None = None
    # told that ``packed`` was rebuilt from (and equals) what ``state`` was prepared from: lets the backend
    # reuse what it derived (shared layouts) for other backends prepared from ``packed`` later
    adopt: Callable[[Any, PackedWeight], None] | None = None

    def __post_init__(self) -> None:
        name = self.backend.value if isinstance(self.backend, Backend) else self.backend
        if not isinstance(name, str) or not name or name == AUTO or not name.replace("_", "").isalnum():
            raise ValueError(f"backend name must be a non-empty identifier other than {AUTO!r}, got {name!r}")
        if self.op not in ("linear", "conv2d"):
            raise ValueError(f"op must be 'linear' or 'conv2d', got {self.op!r}")
        kinds = self.kinds if self.kinds == ALL_FORMATS else tuple(self.kinds)
        if kinds != ALL_FORMATS and not (kinds and all(isinstance(k, str) for k in kinds)):
            raise ValueError(f"kinds must be ALL_FORMATS or a non-empty tuple of format kinds, got {self.kinds!r}")
        needs = frozenset(self.needs)
        if needs - set(CAPABILITIES):
            raise ValueError(f"needs must be a subset of {CAPABILITIES}, got {sorted(needs)}")
        object.__setattr__(self, "backend", str.__new__(Backend, name))
        object.__setattr__(self, "kinds", kinds)
        object.__setattr__(self, "needs", needs)

    @property
    def name(self) -> str:
        return self.backend.value

    def applies_to(self, kind: str) -> bool:
        return self.kinds == ALL_FORMATS or kind in self.kinds

    def check(self, packed: PackedWeight, x: torch.Tensor) -> str | None:
        """Why this backend cannot run ``packed`` on ``x``, or ``None``: its own ``why_not``, then its needs."""
        reason = self.why_not(packed, x)
        for need in sorted(self.needs):
            reason = reason or _NEED_CHECKS[need](x)
        return reason


# (op, backend name, format kind or ALL_FORMATS) -> implementation, in registration order.
REGISTRY: dict[tuple[str, str, str], BackendImpl] = {}


def register(impl: BackendImpl) -> BackendImpl:
    """Declare ``impl``: one implementation per (op, backend, format kind)."""
    kinds = (ALL_FORMATS,) if impl.kinds == ALL_FORMATS else impl.kinds
    for kind in kinds:
        key = (impl.op, impl.name, kind)
        if key in REGISTRY or (kind != ALL_FORMATS and (impl.op, impl.name, ALL_FORMATS) in REGISTRY):
            raise ValueError(f"backend {impl.name} for op {impl.op} and format {kind!r} registered twice")
    for kind in kinds:
        REGISTRY[(impl.op, impl.name, kind)] = impl
    return impl


def unregister(impl: BackendImpl) -> None:
    """Remove every registry entry of ``impl`` (tests and plugins that install a backend temporarily)."""
    for key in [k for k, v in REGISTRY.items() if v is impl]:
        del REGISTRY[key]


def _discover() -> None:
    from . import discover  # imports every backend module of the package once
    discover()


def backend_names() -> tuple[str, ...]:
    """``"auto"`` and every declared backend name (backends applying to all formats first)."""
    _discover()
    universal = [b for (_, b, k) in REGISTRY if k == ALL_FORMATS]
    rest = [b for (_, b, k) in REGISTRY if k != ALL_FORMATS]
    return (AUTO,) + tuple(dict.fromkeys(universal + rest))


def implementations(op: str, kind: str) -> list[BackendImpl]:
    """Every declared implementation of ``op`` for format ``kind``: all-format backends first, then the
    others in registration order (the planner times them in this order)."""
    _discover()
    universal = [impl for (o, _, k), impl in REGISTRY.items() if o == op and k == ALL_FORMATS]
    own = [impl for (o, _, k), impl in REGISTRY.items() if o == op and k == kind]
    return universal + own


def candidates(op: str, packed: PackedWeight, x: torch.Tensor) -> list[BackendImpl]:
    """Every registered backend for ``op`` and ``packed``'s format that can run ``packed`` on ``x``."""
    return [impl for impl in implementations(op, packed.kind) if impl.check(packed, x) is None]


def lookup(op: str, backend: str, kind: str) -> BackendImpl | None:
    """The implementation of ``backend`` for ``op`` and format ``kind``, or ``None``."""
    _discover()
    return REGISTRY.get((op, backend, kind)) or REGISTRY.get((op, backend, ALL_FORMATS))


def resolve(op: str, backend: Backend | str, packed: PackedWeight, x: torch.Tensor) -> BackendImpl:
    """The implementation of an explicitly chosen ``backend``; raises ``BackendUnavailable`` with the reason."""
    backend = Backend(backend)
    if backend == AUTO:
        raise ValueError("resolve() takes a concrete backend; AUTO is the planner's job")
    impl = lookup(op, backend.value, packed.kind)
    if impl is None:
        have = sorted(i.name for i in implementations(op, packed.kind))
        raise BackendUnavailable(f"backend {backend.value!r} has no {op} implementation for the {packed.kind!r} "
                                 f"format; available: {have}")
    reason = impl.check(packed, x)
    if reason is not None:
        raise BackendUnavailable(f"backend {backend.value!r} cannot run this {op} layer: {reason}")
    return impl


def triton_why_not(x: torch.Tensor) -> str | None:
    """Triton kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``."""
    from ..kernels._host import dry_active, interpreting  # torch only: the kernel modules stay unimported

    if x.is_cuda:
        return None
    if (interpreting() or dry_active()) and x.device.type == "cpu":
        return None
    return f"Triton needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU); input is on {x.device}"


def cuda_why_not(x: torch.Tensor) -> str | None:
    return None if x.is_cuda else f"needs a CUDA tensor, input is on {x.device}"


def compiler_why_not(x: torch.Tensor) -> str | None:
    """Backends built on first use need a C++ compiler (``$CXX``, else ``c++``)."""
    cxx = os.environ.get("CXX", "c++")
    return None if shutil.which(cxx) else f"needs a C++ compiler to build its kernels; {cxx!r} not found on PATH"


_NEED_CHECKS: dict[str, Callable[[torch.Tensor], str | None]] = {
    "triton": triton_why_not, "cuda": cuda_why_not, "compiler": compiler_why_not}


def runs_natively(impl: BackendImpl, x: torch.Tensor) -> bool:
    """False for Triton backends on CPU: there they run only in Triton's interpreter, a test vehicle."""
    return "triton" not in impl.needs or x.is_cuda


def linear_why_not(packed: PackedWeight, x: torch.Tensor) -> str | None:
    """Shared linear checks: 2-D weight, ``x [M, K]`` with the weight's K, dtype and device."""
    if len(packed.shape) != 2:
        return f"linear needs a 2-D weight, this one has shape {tuple(packed.shape)}"
    if x.dim() != 2 or x.shape[1] != packed.shape[1]:
        return f"input must be [M, {packed.shape[1]}], got {tuple(x.shape)}"
    return _same_place(packed, x)


def conv_why_not(packed: PackedWeight, x: torch.Tensor) -> str | None:
    """Shared conv2d checks: 4-D weight, a 4-D input, dtype and device."""
    if len(packed.shape) != 4:
        return f"conv2d needs a 4-D weight, this one has shape {tuple(packed.shape)}"
    if x.dim() != 4:
        return f"conv2d input must be [B, C, H, W], got {tuple(x.shape)}"
    return _same_place(packed, x)


def _same_place(packed: PackedWeight, x: torch.Tensor) -> str | None:
    if x.dtype != packed.dtype:
        return f"input dtype {x.dtype} differs from weight dtype {packed.dtype}"
    if x.device != packed.device:
        return f"input is on {x.device}, packed weight on {packed.device}"
    return None
