"""The packed-weight interface every format implements, plus shared input checks.

A packed weight is lossless: ``P.from_dense(w, m).to_dense()`` equals ``torch.where(m, w, 0)`` bit for
bit (pruned entries become +0.0; kept entries, -0.0 included, survive exactly). Its tensors and a
JSON-able ``meta`` dict are what ``sparsecore.io`` saves; ``from_state`` rebuilds it and validates
everything it is handed, so a corrupt file raises ``FormatError`` instead of running.
"""
from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..masks import check_mask

if TYPE_CHECKING:
    from ..config import SparsityConfig

__all__ = ["FormatError", "PackedWeight", "FORMATS", "register_format", "unregister_format", "check_weight_and_mask", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class FormatError(ValueError):
    """Packed data (from memory or a file) is inconsistent with its declared format."""


class PackedWeight(ABC):
    """A compressed ``[out, K]`` weight (Linear ``[out, in]`` or Conv2d ``[C_out, C_in, kh, kw]``).

    Subclasses document their exact byte layout in their docstring. A format is one file: the class, its
    ``@register_format`` decorator, and the three class-level hooks below that tie it to a
    ``SparsityConfig`` (whose ``pattern`` is the format's ``kind``) and to the pruners' selection rules.
    """

    kind: ClassVar[str]
    version: ClassVar[int] = 1
    # The selection rule (``sparsecore.pruning.rules``) that makes masks this format stores:
    # "unstructured" (keep-k entries), "nm" (keep n of every m along K) or "channel" (keep-k output channels).
    mask_rule: ClassVar[str] = "unstructured"

    @classmethod
    def check_config(cls, config: "SparsityConfig") -> None:
        """Raise ``ValueError`` unless ``config`` (whose pattern is this format) is one this format can store."""

    @classmethod
    def pack_params(cls, config: "SparsityConfig") -> dict[str, Any]:
        """The ``from_dense`` keyword parameters ``config`` implies (e.g. ``{"n": 2, "m": 4}``)."""
        return {}

    @classmethod
    def check_mask_pattern(cls, mask: torch.Tensor, config: "SparsityConfig") -> None:
        """Raise ``PatternError`` unless ``mask`` follows the pattern ``config`` declares (names the culprit)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    @abstractmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor, **params: Any) -> "PackedWeight":
        """Pack ``weight`` (2-D or 4-D) under the bool ``mask`` of the same shape."""

    @abstractmethod
    def to_dense(self) -> torch.Tensor:
        """Dense weight of ``self.shape``: kept values, +0.0 elsewhere."""

    @abstractmethod
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(tensors, meta)``: contiguous tensors to store and JSON-able parameters (shape, dtype, ...)."""

    @classmethod
    @abstractmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "PackedWeight":
        """Rebuild from ``state()``; raises ``FormatError`` on anything inconsistent."""

    @property
    def nbytes(self) -> int:
        """Bytes of all stored tensors (what the kernel streams)."""
        tensors, _ = self.state()
        return sum(t.numel() * t.element_size() for t in tensors.values())

    @functools.cached_property
    def nonzeros(self) -> int:
        """Non-zero entries of the dense weight (``count_nonzero(to_dense())``; a kept 0.0 does not count),
        counted once per object. Formats whose ``values`` tensor holds every dense non-zero and nothing else
        but zeros count over it (``_nonzeros_from_values``), without a dense copy."""
        if self._nonzeros_from_values:
            return int(torch.count_nonzero(self.values))
        return int(torch.count_nonzero(self.to_dense()))

    _nonzeros_from_values: ClassVar[bool] = False

    @property
    def device(self) -> torch.device:
        tensors, _ = self.state()
        return next(iter(tensors.values())).device

    def to(self, device: torch.device | str) -> "PackedWeight":
        """A copy with every tensor moved to ``device``."""
        tensors, meta = self.state()
        return type(self).from_state({k: v.to(device) for k, v in tensors.items()}, meta)

    @property
    def dense_nbytes(self) -> int:
        numel = 1
        for s in self.shape:
            numel *= s
        return numel * torch.empty((), dtype=self.dtype).element_size()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"nbytes={self.nbytes}, dense_nbytes={self.dense_nbytes})")


FORMATS: dict[str, type[PackedWeight]] = {}


def register_format(cls: type[PackedWeight]) -> type[PackedWeight]:
    """Class decorator: make a format usable as ``SparsityConfig(pattern=cls.kind)`` and loadable by its ``kind``."""
    if not (isinstance(getattr(cls, "kind", None), str) and cls.kind.isidentifier()):
        raise ValueError(f"format {cls.__name__} needs a class attribute kind = '<identifier>'")
    if cls.mask_rule not in ("unstructured", "nm", "channel"):
        raise ValueError(f"format {cls.kind!r}: mask_rule must be 'unstructured', 'nm' or 'channel', got {cls.mask_rule!r}")
    if cls.kind in FORMATS:
        raise ValueError(f"format kind {cls.kind!r} registered twice")
    FORMATS[cls.kind] = cls
    return cls


def unregister_format(cls: type[PackedWeight]) -> None:
    """Remove a format registered with ``register_format`` (tests and plugins that install one temporarily)."""
    if FORMATS.get(cls.kind) is cls:
        del FORMATS[cls.kind]


def check_weight_and_mask(weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Shared ``from_dense`` checks: tensor types, dtype, rank, shapes, devices, finiteness of kept values."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"weight dtype must be one of float32/float16/bfloat16, got {weight.dtype}")
    if weight.dim() not in (2, 4):
        raise ValueError(f"weight must be 2-D [out, in] or 4-D [C_out, C_in, kh, kw], got shape {tuple(weight.shape)}")
    check_mask(mask, weight)
    kept = weight[mask]
    if kept.numel() and not bool(torch.isfinite(kept).all()):
        raise ValueError("weight has NaN or Inf at kept positions; refusing to pack non-finite values")


def dtype_name(dtype: torch.dtype) -> str:
    """'float16' for torch.float16, and so on (JSON-able)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of ``dtype_name`` for the supported dtypes; raises ``FormatError`` otherwise."""
    for d in SUPPORTED_DTYPES:
        if dtype_name(d) == name:
            return d
    raise FormatError(f"unsupported dtype {name!r} in packed metadata; expected one of {[dtype_name(d) for d in SUPPORTED_DTYPES]}")


def expect_tensor(tensors: dict[str, torch.Tensor], name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Fetch ``tensors[name]`` and check dtype and shape, raising ``FormatError`` naming what was expected."""
    if name not in tensors:
        raise FormatError(f"packed data lacks tensor {name!r}; has {sorted(tensors)}")
    t = tensors[name]
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise FormatError(f"tensor {name!r}: expected {dtype} {tuple(shape)}, got {t.dtype} {tuple(t.shape)}")
    return t


def meta_shape(meta: dict[str, Any]) -> tuple[int, ...]:
    """Validated dense shape from ``meta['shape']`` (2 or 4 positive ints)."""
    shape = meta.get("shape")
    if not (isinstance(shape, list) and len(shape) in (2, 4) and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise FormatError(f"meta 'shape' must be a list of 2 or 4 non-negative ints, got {shape!r}")
    return tuple(shape)


def expect_state(cls: type[PackedWeight], tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                 names: set[str]) -> None:
    """Common ``from_state`` checks: meta is a dict of this kind and version, tensors are exactly ``names``."""
    if not isinstance(meta, dict):
        raise FormatError(f"{cls.kind} metadata must be a JSON object, got {type(meta).__name__}")
    if meta.get("kind", cls.kind) != cls.kind:
        raise FormatError(f"metadata declares kind {meta.get('kind')!r}, expected {cls.kind!r}")
    if meta.get("version") != cls.version:
        raise FormatError(f"{cls.kind} format version {meta.get('version')!r} unsupported; expected {cls.version}")
    if set(tensors) != names:
        raise FormatError(f"{cls.kind} data must hold tensors {sorted(names)}, got {sorted(tensors)}")
