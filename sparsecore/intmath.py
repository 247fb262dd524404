"""Integer helpers shared by the packed layouts (``formats/``) and the kernel launchers (``kernels/_host.py``).

Plain Python integer expressions: ``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function``
objects whose Python calls cost far more than the arithmetic, and the launchers call these on every launch.
"""
from __future__ import annotations

__all__ = ["cdiv", "next_pow2"]


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints, ``b > 0``."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
