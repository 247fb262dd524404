"""The planner: time every backend that can run a sparse layer, on the real input, and keep the fastest.

For each sparse module whose ``backend`` is AUTO, ``plan`` records its input on one forward pass of
``example_inputs``, then times each candidate backend (dense included) on that input with
``sparsecore.timing.time_ms``. A sparse backend is chosen only when it beats the dense time by
``margin`` (default 5%): at equal speed, dense wins, so a planned model is never slower than its dense
self beyond measurement noise.

What "time" means on CUDA depends on how the model will run. Eagerly, a layer costs
``max(GPU time, host time)``: at decode sizes a kernel can finish before Python has issued the next one,
and then the launch cost is the layer's cost (``sparsecore.timing.host_ms``). Under CUDA graphs
(``torch.compile(mode="reduce-overhead")`` or a captured ``torch.cuda.CUDAGraph``) replays issue no Python,
so ``cuda_graphs=True`` compares GPU time alone. On CPU host time is the latency and both modes agree. A candidate whose output disagrees with dense beyond the dtype's
tolerance is rejected and reported, never chosen. Decisions are cached in a JSON file keyed by device,
torch/triton versions, op, format, shapes, dtype and batch bucket.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backends import AUTO, Backend, BackendImpl, BackendUnavailable, candidates, resolve
from .backends.registry import runs_natively
from .modules import SparseConv2d, SparseLinear, m_bucket
from .timing import host_ms, time_ms

__all__ = ["plan", "PlanEntry", "default_cache_path"]

_DENSE = "dense"
_AGREE_TOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 1e-1}


@dataclass
class PlanEntry:
    """One layer's decision: measured times per backend (ms) and the choice."""

    fqn: str
    bucket: int
    chosen: str
    times_ms: dict[str, float] = field(default_factory=dict)  # the cost compared: see the module docstring
    rejected: dict[str, str] = field(default_factory=dict)
    cached: bool = False
    gpu_ms: dict[str, float] = field(default_factory=dict)    # CUDA: kernel time alone (do_bench)
    host_ms: dict[str, float] = field(default_factory=dict)   # CUDA: time to issue one call (host_ms)


def default_cache_path() -> Path:
    root = os.environ.get("SPARSECORE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sparsecore")
    return Path(root) / "plans.json"


def _device_key(x: torch.Tensor) -> str:
    try:
        import triton
        tv = triton.__version__
    except ImportError:  # triton is a dependency; tolerate its absence only in the key
        tv = "none"
    dev = torch.cuda.get_device_name(x.device) if x.is_cuda else f"cpu{torch.get_num_threads()}"
    return f"{dev}|torch{torch.__version__}|triton{tv}"


def _layer_key(mod: SparseLinear | SparseConv2d, x: torch.Tensor, cuda_graphs: bool) -> str:
    p = mod.packed
    _, meta = p.state()
    shape = list(x.shape[1:]) if mod.op == "conv2d" else [x.shape[-1]]
    mode = ("graphs" if cuda_graphs else "eager") if _on_cuda(x) else "cpu"
    parts = [_device_key(x), mode, mod.op, json.dumps(meta, sort_keys=True), str(x.dtype), f"in{shape}",
             f"m{m_bucket(x.shape[0])}", f"nnz{_nnz(mod)}"]
    if isinstance(mod, SparseConv2d):
        parts.append(json.dumps(asdict(mod.conv)))
    return "|".join(parts)


def _nnz(mod: SparseLinear | SparseConv2d) -> int:
    # Sparsity matters for speed but is not in every format's meta; count it once (cheap next to timing).
    return int(torch.count_nonzero(mod.dense_weight()))


def _capture_inputs(model: nn.Module, example_inputs: tuple, mods: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for fqn, mod in mods.items():
        def hook(module, args, fqn=fqn):
            x = args[0]
            seen.setdefault(fqn, x.reshape(-1, x.shape[-1]) if module.op == "linear" else x)
        hooks.append(mod.register_forward_pre_hook(hook))
    # eval mode: a planning pass must not update BatchNorm statistics or draw dropout masks
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        model(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return seen


def _on_cuda(x: torch.Tensor) -> bool:
    return x.is_cuda


def _cost_ms(mod, impl, x: torch.Tensor, rep: int, cuda_graphs: bool, entry: PlanEntry) -> float:
    """The time the choice compares (recording its parts on CUDA): see the module docstring.

    GPU time is the backend's own call; host time is a whole forward of the module forced to that
    backend, so the per-layer checks and dispatch every backend pays count as well: they are not
    constant under ``max(gpu, host)``.
    """
    name = impl.backend.value
    gpu = time_ms(lambda: mod.run_backend(impl, x), x.device, rep=rep)
    if not _on_cuda(x):
        return gpu
    entry.gpu_ms[name] = gpu
    if cuda_graphs:
        return gpu
    previous = mod.backend
    mod.backend = impl.backend
    try:
        entry.host_ms[name] = host_ms(lambda: mod(x), x.device, rep=rep)
    finally:
        mod.backend = previous
    return max(gpu, entry.host_ms[name])


def _measure(fqn: str, mod, x: torch.Tensor, margin: float, rep: int, cuda_graphs: bool = False) -> PlanEntry:
    bucket = m_bucket(x.shape[0])
    entry = PlanEntry(fqn, bucket, _DENSE)
    dense = resolve(mod.op, _DENSE, mod.packed, x)
    ref = mod.run_backend(dense, x).float()
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    tol = _AGREE_TOL[x.dtype] * max(1.0, scale)
    for impl in candidates(mod.op, mod.packed, x):
        if not _contender(impl, x):
            continue
        name = impl.backend.value
        try:
            out = mod.run_backend(impl, x)
        except (RuntimeError, ValueError, TypeError) as e:  # reported, never chosen
            entry.rejected[name] = f"failed: {e}"
            continue
        err = float((out.float() - ref).abs().max()) if ref.numel() else 0.0
        if not err <= tol:
            entry.rejected[name] = f"output differs from dense by {err:.3g} > {tol:.3g}"
            continue
        entry.times_ms[name] = _cost_ms(mod, impl, x, rep, cuda_graphs, entry)
    dense_ms = entry.times_ms[_DENSE]
    best = min(entry.times_ms, key=entry.times_ms.get)
    if best != _DENSE and entry.times_ms[best] < dense_ms * (1.0 - margin):
        entry.chosen = best
    return entry


def _cached_choice(entry: Any, mod, x: torch.Tensor) -> str | None:
    """The cached backend if the entry is well formed and that backend can run here; else None (re-measure)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("chosen"), str):
        return None
    try:
        impl = resolve(mod.op, entry["chosen"], mod.packed, x)
    except (ValueError, BackendUnavailable):
        return None
    return entry["chosen"] if _contender(impl, x) else None


def _floats(value: Any) -> dict[str, float]:
    """A cached ``{backend: ms}`` dict, keeping only well-formed items (the file may have been edited)."""
    if not isinstance(value, dict):
        return {}
    return {k: float(v) for k, v in value.items()
            if isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _contender(impl: BackendImpl, x: torch.Tensor) -> bool:
    """Backends the planner may choose: declared plannable (not an oracle such as the reference), and not
    Triton on CPU (there it only runs in its interpreter, a test vehicle)."""
    return impl.plannable and runs_natively(impl, x)


def _load_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


@torch.no_grad()
def plan(model: nn.Module, example_inputs: tuple, *, margin: float = 0.05, use_cache: bool = True,
         cache_path: str | Path | None = None, rep: int = 20, cuda_graphs: bool = False) -> list[PlanEntry]:
    """Choose a backend per AUTO sparse layer for the batch size in ``example_inputs``; returns the decisions.

    ``model(*example_inputs)`` must run. Layers with a forced backend are left alone. ``cuda_graphs``:
    the model will run under CUDA graphs, so on CUDA launch cost is ignored (eager: it counts). Calling ``plan``
    again with another batch size adds a decision for that size (``module.plan`` is keyed by
    ``m_bucket(rows)``); unplanned sizes run dense.
    """
    if not isinstance(example_inputs, tuple):
        raise TypeError(f"example_inputs must be a tuple of model inputs, got {type(example_inputs).__name__}")
    mods = {f: m for f, m in model.named_modules()
            if isinstance(m, (SparseLinear, SparseConv2d)) and m.backend == AUTO}
    if not mods:
        return []
    inputs = _capture_inputs(model, example_inputs, mods)
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    cache = _load_cache(path) if use_cache else {}
    decisions = []
    for fqn, mod in mods.items():
        if fqn not in inputs:
            continue  # not reached by this forward pass
        x = inputs[fqn]
        key = _layer_key(mod, x, cuda_graphs)
        hit = _cached_choice(cache.get(key), mod, x) if use_cache else None
        if hit is not None:
            got = cache[key]
            entry = PlanEntry(fqn, m_bucket(x.shape[0]), hit, _floats(got.get("times_ms")), cached=True,
                              gpu_ms=_floats(got.get("gpu_ms")), host_ms=_floats(got.get("host_ms")))
        else:
            entry = _measure(fqn, mod, x, margin, rep, cuda_graphs)
            cache[key] = {"chosen": entry.chosen, "times_ms": entry.times_ms, "gpu_ms": entry.gpu_ms,
                          "host_ms": entry.host_ms}
        mod.set_plan(entry.bucket, Backend(entry.chosen))  # also frees the losing candidates' prepared state
        decisions.append(entry)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        tmp.replace(path)
    return decisions
