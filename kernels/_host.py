"""Host-side integer helpers for the launchers, kept off Triton's Python API on the hot path.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function`` objects in Triton >= 3.6: a
call from Python unwraps every argument and costs ~2.7 us on the 2-core CI machine, against ~10 ns for
the integer expression. A decode launch used seven of them, more than the whole GPU time of a
4096 x 4096 2:4 GEMV, so the launchers use these instead (same results, see tests/test_host_path.py).
"""
from __future__ import annotations

import functools
import math

import torch

__all__ = ["cdiv", "next_pow2", "sparsity_bucket", "num_sms", "needs_op"]


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints, ``b > 0``."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def sparsity_bucket(kept: int, total: int) -> int:
    """Autotuning key for the share of a weight kept: ``round(2 * log2(total / kept))``, half-octave steps.

    0 when dense, 2 at 50% sparsity, 3 at 70%, 7 at 90%, 9 at 95%, 40 when nothing is kept: the best config
    depends on the work per output (kept values per row), so a config tuned at 50% is not reused at 90%.
    """
    if kept <= 0 or total <= 0:
        return 40
    return min(40, round(2 * math.log2(max(total / kept, 1.0))))


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (cached); 4 for the CPU interpreter (a small pretend GPU)."""
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def needs_op(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether a launcher must go through its torch.library custom op rather than launch directly.

    Under torch.compile the op is what the graph records; with autograd on, the op refuses backward loudly
    instead of detaching silently. Eager inference skips the dispatcher, whose Python overhead rivals a
    whole decode GEMV.
    """
    return torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))
