"""Host side of the launchers: the interpreter switch, buffer allocation and the one launch call.

The launchers take ``cdiv`` and ``next_pow2`` from here (``sparsecore.intmath``), never Triton's
``constexpr_function`` versions, whose Python calls cost more than a decode launch can afford (see
tests/test_host_path.py; figures in ``bench/results/overhead_*``).

Every kernel launch goes through ``launch`` so that ``dry_launches`` can turn them into grid evaluations:
the seam ``bench.bench_overhead`` uses to time sparsecore's own host path on a machine without a GPU.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Any, Callable, Iterator

import torch

from sparsecore.intmath import cdiv, next_pow2

__all__ = ["cdiv", "next_pow2", "sparsity_bucket", "num_sms", "needs_op", "interpreting", "cpu_launch_ok",
           "dry_launches", "launch", "launched_config", "empty", "poisoned_buffers", "dry_active"]


def interpreting() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``). ``triton.jit`` reads the variable when a kernel is
    decorated, so the kernel modules read this once at import (their configs depend on it)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


class _Dry:
    active = False


def cpu_launch_ok(interpreted: bool) -> bool:
    """A launcher may take CPU tensors: its kernel module was imported under the interpreter
    (``interpreted``, fixed at import as ``triton.jit`` fixes it), or inside ``dry_launches``."""
    return interpreted or _Dry.active


def dry_active() -> bool:
    """True inside ``dry_launches``."""
    return _Dry.active


@contextlib.contextmanager
def dry_launches() -> Iterator[None]:
    """Inside: launchers check their inputs and allocate as usual, evaluate the launch grid with the kernel's
    first config, and launch nothing (outputs are left as allocated); Triton backends accept CPU tensors.

    For timing sparsecore's own host path per call on a machine without a GPU (``bench.bench_overhead``);
    the outputs are meaningless.
    """
    previous, _Dry.active = _Dry.active, True
    try:
        yield
    finally:
        _Dry.active = previous


class _Poison:
    active = False
    listeners: list[Callable[[bool], None]] = []  # native code that allocates its own outputs


def on_poison_change(fn: Callable[[bool], None]) -> None:
    """Call ``fn(active)`` now and whenever ``poisoned_buffers`` is entered or left (for outputs allocated in
    native code, e.g. the C++ CPU kernels)."""
    _Poison.listeners.append(fn)
    fn(_Poison.active)


def _set_poison(active: bool) -> None:
    _Poison.active = active
    for fn in _Poison.listeners:
        fn(active)


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a launcher allocates comes from here (NaN-filled inside ``poisoned_buffers``)."""
    if _Poison.active:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@contextlib.contextmanager
def poisoned_buffers() -> Iterator[None]:
    """Inside: launcher buffers (outputs, split-K partials) start as NaN, so a test sees any element a kernel
    leaves unwritten."""
    previous = _Poison.active
    _set_poison(True)
    try:
        yield
    finally:
        _set_poison(previous)


def _first_config(kernel: Any) -> dict:
    configs = getattr(kernel, "configs", None)
    return dict(configs[0].kwargs) if configs else {}


def launch(kernel: Any, grid: Callable[[dict], tuple] | tuple, *args: Any, **meta: Any) -> None:
    """``kernel[grid](*args, **meta)``, or only the grid's evaluation inside ``dry_launches``."""
    if _Dry.active:
        if callable(grid):
            grid({**_first_config(kernel), **meta})
        return
    kernel[grid](*args, **meta)


def launched_config(kernel: Any) -> dict:
    """The constexpr config an autotuned ``kernel`` ran with last (its first config inside ``dry_launches``)."""
    if _Dry.active:
        return _first_config(kernel)
    return kernel.best_config.kwargs


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
