"""Fused CPU attention: ``softmax(q k^T * scale + mask) v`` in one pass per block of query rows.

* ``attention(q, k, v, attn_mask, scale, is_causal)``: the arguments and result of
  ``torch.nn.functional.scaled_dot_product_attention`` (fp32, CPU, inference): q ``[B, H, Sq, D]``, k ``[B, H, Sk, D]``,
  v ``[B, H, Sk, Dv]`` -> ``[B, H, Sq, Dv]``, returned as a view of a contiguous ``[B, Sq, H, Dv]`` buffer
  (``attention_bshd`` returns that buffer: the layout transformers reshapes to ``[B, Sq, H * Dv]`` for free).
* ``attention_ref``: the same in float64 torch (the test oracle).

Any strides with a contiguous last dimension are read in place (transformers' BERT passes q/k/v as
``[B, S, H, D]`` transposed to ``[B, H, S, D]``); otherwise the launcher copies (``needs_copy`` says when).
The mask is float (added to the scaled scores) or bool (``True`` = attend), broadcastable to ``[B, H, Sq, Sk]``.
A query row whose every key is masked gets zeros, as torch's CPU SDPA gives. ``is_causal`` masks key ``j > i``
(upper-left aligned, as SDPA).

Instruction sets: ``avx512`` (register tiles of 8 query rows x 32 keys for the scores, 8 rows x 32 or 4 x 64
output columns for p v, polynomial exp) and ``portable`` (plain C++, whole score rows, ``std::exp``: the oracle).
The widest the CPU runs is the default; ``isa`` forces one, and ``SPARSECORE_CPU_ISA`` caps it (``avx2`` and
``portable`` select ``portable``, there being no AVX2 attention path).

The extension is a sibling of the sparse linear one (``sparsecore.kernels.cpu``), built the same way on first
use (``kernels/cpu/_extension.py``); if it cannot be built, ``why_unavailable()`` says why and the launchers raise
``CpuKernelsUnavailable``.
"""
from __future__ import annotations

import math
import os
import threading
from types import ModuleType
from typing import Optional

import torch

from ._extension import X86, CpuKernelsUnavailable, build, isas, load_once, unavailable_reason

__all__ = ["ATTENTION_ISAS", "attention", "attention_bshd", "attention_ref", "available_isas", "default_isa",
           "needs_copy", "why_unavailable"]

ATTENTION_ISAS = ("portable", "avx512")  # the index is the code the C++ side takes
_SOURCES = ("attention.cpp",) + (("attention_avx512.cpp",) if X86 else ())

_lock = threading.Lock()
_state: dict[str, object] = {}  # "module" or "error", set once; "isas"


def extension() -> ModuleType:
    """The compiled attention extension (built on the first call, then cached); raises ``CpuKernelsUnavailable``."""
    return load_once(_state, _lock, lambda: build("sparsecore_attn", _SOURCES, ["attention.h"]),
                     "the native CPU attention kernel")


def why_unavailable() -> Optional[str]:
    """``None`` if the extension builds (building it if needed), else the reason."""
    return unavailable_reason(extension)


def available_isas() -> tuple[str, ...]:
    """Attention paths this CPU runs, plainest first (builds the extension)."""
    return isas(_state, extension)


def default_isa() -> str:
    """The widest path this CPU runs, capped by ``SPARSECORE_CPU_ISA`` if set (``avx2`` caps at ``portable``)."""
    have = available_isas()
    forced = os.environ.get("SPARSECORE_CPU_ISA")
    if forced:
        if forced not in ("portable", "avx2", "avx512"):
            raise ValueError(f"SPARSECORE_CPU_ISA must be one of ('portable', 'avx2', 'avx512'), got {forced!r}")
        cap = "avx512" if forced == "avx512" else "portable"
        if cap not in have:
            raise CpuKernelsUnavailable(f"SPARSECORE_CPU_ISA={forced} but this CPU runs only {have}")
        return cap
    return have[-1]


def _isa_code(isa: Optional[str]) -> int:
    isa = default_isa() if isa is None else isa
    if isa not in ATTENTION_ISAS:
        raise ValueError(f"isa must be one of {ATTENTION_ISAS}, got {isa!r}")
    if isa not in available_isas():
        raise CpuKernelsUnavailable(f"this CPU cannot run the {isa} attention path; it runs {available_isas()}")
    return ATTENTION_ISAS.index(isa)


@torch.library.custom_op("sparsecore::cpu_attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
                  causal: bool, isa: int) -> torch.Tensor:
    return extension().attention(q, k, v, mask, scale, causal, isa)


@_attention_op.register_fake
def _(q, k, v, mask, scale, causal, isa):
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1], v.shape[3]))


def needs_copy(t: torch.Tensor) -> bool:
    """Whether the launcher copies ``t`` (its last dimension is not contiguous); BERT's q/k/v never are."""
    return t.shape[-1] > 1 and t.stride(-1) != 1


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
           dropout_p: float, is_causal: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, S, D], got {tuple(getattr(t, 'shape', ()))}")
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise TypeError(f"{name} must be a CPU float32 tensor, got {t.dtype} on {t.device}")
    B, H, _, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"k must be [{B}, {H}, Sk, {D}] like q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must be [{B}, {H}, {k.shape[2]}, Dv] like k, got {tuple(v.shape)}")
    if dropout_p != 0.0:
        raise ValueError(f"the fused CPU attention is for inference: dropout_p must be 0.0, got {dropout_p}")
    if attn_mask is not None:
        if attn_mask.dtype not in (torch.float32, torch.bool):
            raise TypeError(f"attn_mask must be float32 (added) or bool (True = attend), got {attn_mask.dtype}")
        target = (B, H, q.shape[2], k.shape[2])
        shape = tuple(attn_mask.shape)
        if len(shape) > 4 or any(s not in (1, t) for s, t in zip(shape[::-1], target[::-1])):
            raise ValueError(f"attn_mask must broadcast to {list(target)}, got {shape}")
        if is_causal:
            raise ValueError("pass either attn_mask or is_causal=True, not both (as scaled_dot_product_attention)")


def attention_bshd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                   scale: Optional[float] = None, is_causal: bool = False, dropout_p: float = 0.0,
                   isa: Optional[str] = None) -> torch.Tensor:
    """Attention of q ``[B, H, Sq, D]``, k ``[B, H, Sk, D]``, v ``[B, H, Sk, Dv]`` as a contiguous ``[B, Sq, H, Dv]``.

    >>> out = attention_bshd(q, k, v, mask)   # == F.scaled_dot_product_attention(q, k, v, mask).transpose(1, 2)
    """
    _check(q, k, v, attn_mask, dropout_p, is_causal)
    code = _isa_code(isa)
    q, k, v = (t.contiguous() if needs_copy(t) else t for t in (q, k, v))
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if torch.compiler.is_compiling() or torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _attention_op(q, k, v, attn_mask, s, bool(is_causal), code)  # refuses backward loudly
    return extension().attention(q, k, v, attn_mask, s, bool(is_causal), code)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
              isa: Optional[str] = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention``'s result ``[B, H, Sq, Dv]`` (fp32, CPU, no dropout); ``isa`` forces a path.

    >>> out = attention(q, k, v, attn_mask=mask)   # == F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    """
    return attention_bshd(q, k, v, attn_mask, scale, is_causal, dropout_p, isa).transpose(1, 2)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                  is_causal: bool = False, scale: Optional[float] = None) -> torch.Tensor:
    """float64 ``softmax(q k^T scale + mask) v`` ``[B, H, Sq, Dv]``; a fully masked row gives zeros."""
    q, k, v = q.double(), k.double(), v.double()
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    scores = q @ k.transpose(-1, -2) * s
    if is_causal:
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else scores + attn_mask.double()
    m = scores.amax(-1, keepdim=True)
    p = torch.exp(scores - torch.where(torch.isinf(m), torch.zeros_like(m), m))
    denom = p.sum(-1, keepdim=True)
    return (p / torch.where(denom > 0, denom, torch.ones_like(denom))) @ v
