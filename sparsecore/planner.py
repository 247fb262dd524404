"""The planner: time every backend that can run a sparse layer, on the real input, and keep the fastest.

For each sparse module whose ``backend`` is AUTO, ``plan`` records its input on one forward pass of
``example_inputs``, then times each candidate backend (dense included, and every backend registered for
the layer's format: ``sparsecore.backends.candidates``) on that input:

1. a quick round (3 interleaved samples each) drops hopeless candidates: slower than 2x dense;
2. the survivors are sampled in turn (a, b, b, a, ...) for as many rounds as ``budget_s`` allows
   (5 to ``rep``; on CUDA 3 rounds of ``do_bench`` medians); each round gives a paired ratio
   ``dense / candidate``;
3. a sparse backend wins only when it is faster beyond the noise: its median time is under
   ``(1 - margin)`` x dense's *and* the lower quartile of its paired ratios exceeds 1;
4. a surprising outcome is measured again, dense against that one backend: a sparse choice (it must win
   the second round too), or a dense choice while a candidate showed a median speedup of 1.5x or more.

Every ratio is recorded with its spread (``PlanEntry.speedup`` / ``PlanEntry.spread``: q25 and q75 of the
paired ratios). Layers of the same key (shape, format, sparsity, batch bucket) are measured once per run
and, with ``use_cache``, once per machine.

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
import sys
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backends import AUTO, Backend, BackendImpl, BackendUnavailable, candidates, resolve
from .backends.registry import runs_natively
from .modules import SparseConv2d, SparseLinear, m_bucket
from .report import record_plan
from .timing import host_ms, interleaved_samples_ms, quantiles, time_ms

__all__ = ["plan", "PlanEntry", "default_cache_path"]

_DENSE = "dense"
_AGREE_TOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 1e-1}
_PLANNER_VERSION = 2  # in every cache key: decisions of an earlier decision rule are measured anew
_QUICK_ROUNDS = 3
_HOPELESS = 2.0    # quick-round time / dense time above which a candidate is dropped
_MIN_ROUNDS = 5
_CUDA_ROUNDS = 3
_SURPRISE = 1.5    # a median speedup this large that noise kept from winning is measured again


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
    speedup: dict[str, float] = field(default_factory=dict)   # dense median / backend median
    spread: dict[str, tuple[float, float]] = field(default_factory=dict)  # q25, q75 of paired dense/backend ratios
    dropped: dict[str, str] = field(default_factory=dict)     # hopeless after the quick round
    rounds: int = 0                                           # interleaved rounds of the main measurement
    rechecked: str = ""                                       # what the re-check measured and found, if one ran

    def to_json(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "times_ms": self.times_ms, "gpu_ms": self.gpu_ms, "host_ms": self.host_ms,
                "speedup": self.speedup, "spread": {k: list(v) for k, v in self.spread.items()},
                "dropped": self.dropped, "rounds": self.rounds, "rechecked": self.rechecked}


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
    return f"{dev}|torch{torch.__version__}|triton{tv}|planner{_PLANNER_VERSION}"


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
    # Sparsity matters for speed but is not in every format's meta.
    numel = 1
    for s in mod.format_meta["shape"]:
        numel *= s
    return round(mod.kept_fraction() * numel)


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
    if not _on_cuda(x):
        return time_ms(lambda: mod.run_backend(impl, x), x.device, rep=rep)
    gpu = time_ms(lambda: mod.run_backend(impl, x), x.device)  # do_bench's own time budget: see time_ms
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


def _samples(mod, impls: dict[str, BackendImpl], x: torch.Tensor, rounds: int, warmup: int, cuda_graphs: bool,
             entry: PlanEntry) -> dict[str, list[float]]:
    """Per-round cost samples (ms) of each backend, interleaved. CPU: one call per sample. CUDA: each sample
    is a short ``do_bench`` (plus host time when eager), rounds alternating the order."""
    if not _on_cuda(x):
        return interleaved_samples_ms({n: (lambda i=i: mod.run_backend(i, x)) for n, i in impls.items()},
                                      warmup=warmup, rounds=rounds)
    out: dict[str, list[float]] = {n: [] for n in impls}
    order = list(impls.items())
    for r in range(rounds):
        for name, impl in (order if r % 2 == 0 else order[::-1]):
            out[name].append(_cost_ms(mod, impl, x, 5, cuda_graphs, entry))
    return out


def _ratios(samples: dict[str, list[float]], name: str) -> tuple[float, tuple[float, float]]:
    """(median-time speedup of ``name`` over dense, (q25, q75) of the paired per-round ratios)."""
    dense, mine = samples[_DENSE], samples[name]
    paired = [d / max(o, 1e-9) for d, o in zip(dense, mine)]
    q25, _, q75 = quantiles(paired)
    return quantiles(dense)[1] / max(quantiles(mine)[1], 1e-9), (q25, q75)


def _wins(samples: dict[str, list[float]], name: str, margin: float) -> bool:
    """Faster beyond the noise: median time under ``(1 - margin)`` x dense's, and the lower quartile of the
    paired dense/candidate ratios above 1."""
    _, spread = _ratios(samples, name)
    return quantiles(samples[name])[1] < (1.0 - margin) * quantiles(samples[_DENSE])[1] and spread[0] > 1.0


def _measure(fqn: str, mod, x: torch.Tensor, margin: float, rep: int, cuda_graphs: bool = False,
             budget_s: float = 0.4) -> PlanEntry:
    bucket = m_bucket(x.shape[0])
    entry = PlanEntry(fqn, bucket, _DENSE)
    dense = resolve(mod.op, _DENSE, mod.packed, x)
    ref = mod.run_backend(dense, x).float()
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    tol = _AGREE_TOL[x.dtype] * max(1.0, scale)
    ok: dict[str, BackendImpl] = {_DENSE: dense}
    for impl in candidates(mod.op, mod.packed, x):
        if not _contender(impl, x) or impl.backend.value == _DENSE:
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
        ok[name] = impl
    # 1. quick round: drop the hopeless
    # CUDA: each sample is itself a do_bench median over many runs, so fewer rounds are needed
    cuda = _on_cuda(x)
    quick = _samples(mod, ok, x, 1 if cuda else _QUICK_ROUNDS, 0 if cuda else 1, cuda_graphs, entry)
    med = {n: quantiles(s)[1] for n, s in quick.items()}
    for name in list(ok):
        if name != _DENSE and med[name] > _HOPELESS * med[_DENSE]:
            entry.times_ms[name] = med[name]
            entry.dropped[name] = f"{med[name] / max(med[_DENSE], 1e-9):.2f}x dense time in the quick round"
            del ok[name]
    # 2. main rounds, as many as the budget allows
    per_round_s = sum(med[n] for n in ok) / 1e3
    entry.rounds = _CUDA_ROUNDS if cuda else max(_MIN_ROUNDS, min(rep, int(budget_s / max(per_round_s, 1e-9))))
    samples = _samples(mod, ok, x, entry.rounds, 0, cuda_graphs, entry)
    for name, s in samples.items():
        entry.times_ms[name] = quantiles(s)[1]
        if name != _DENSE:
            entry.speedup[name], entry.spread[name] = _ratios(samples, name)
    # 3. decide: faster beyond the noise
    contenders = [n for n in entry.speedup if _wins(samples, n, margin)]
    best = max(contenders, key=entry.speedup.get, default=None)
    surprise = max(entry.speedup, key=entry.speedup.get, default=None)
    # 4. re-check a sparse choice, or a large speedup that noise kept out
    again = best if best is not None else (surprise if surprise and entry.speedup[surprise] >= _SURPRISE else None)
    if again is not None:
        rounds = _CUDA_ROUNDS if cuda else max(_MIN_ROUNDS, entry.rounds * len(ok) // 4)  # ~half the main budget
        second = _samples(mod, {_DENSE: dense, again: ok[again]}, x, rounds, 0, cuda_graphs, entry)
        speed, spread = _ratios(second, again)
        confirmed = _wins(second, again, margin)
        entry.rechecked = (f"{again}: {speed:.2f}x [{spread[0]:.2f}-{spread[1]:.2f}] on re-check, "
                           f"{'confirmed' if confirmed else 'not confirmed'}")
        if confirmed and best is not None:  # a confirmed winner: record the pooled figures
            entry.speedup[again] = min(entry.speedup[again], speed)
        best = again if confirmed else None
    entry.chosen = best or _DENSE
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


def _strings(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


def _pairs(value: Any) -> dict[str, tuple[float, float]]:
    """A cached ``{backend: [q25, q75]}`` dict, keeping only well-formed items."""
    if not isinstance(value, dict):
        return {}
    return {k: (float(v[0]), float(v[1])) for k, v in value.items()
            if isinstance(k, str) and isinstance(v, list) and len(v) == 2
            and all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in v)}


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
         cache_path: str | Path | None = None, rep: int = 20, cuda_graphs: bool = False, budget_s: float = 0.4,
         progress: bool | None = None) -> list[PlanEntry]:
    """Choose a backend per AUTO sparse layer for the batch size in ``example_inputs``; returns the decisions.

    ``rep``: the most interleaved rounds per layer; ``budget_s``: the time the main rounds aim for per
    distinct layer (the quick round and a re-check come on top). ``progress``: a tqdm bar over the layers
    (default: when there are 16 or more and stderr is a terminal). The decisions, with their timings and
    spread, also go into ``sparsecore.last_report(model)``.

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
    with ExitStack() as stack:  # each layer keeps packed and dense forms while measured, then settles
        for mod in mods.values():
            stack.enter_context(mod.planning())
        decisions = _plan_layers(model, example_inputs, mods, margin, use_cache, cache_path, rep, cuda_graphs,
                                 budget_s, progress)
    record_plan(model, decisions)
    return decisions


def _plan_layers(model, example_inputs, mods, margin, use_cache, cache_path, rep, cuda_graphs, budget_s,
                 progress) -> list[PlanEntry]:
    inputs = _capture_inputs(model, example_inputs, mods)
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    cache = _load_cache(path) if use_cache else {}  # also holds this run's decisions: one measurement per key
    decisions = []
    items = list(mods.items())
    if progress is None:
        progress = len(items) >= 16 and sys.stderr.isatty()
    if progress:
        from tqdm import tqdm
        items = tqdm(items, desc="planning", unit="layer")
    for fqn, mod in items:
        if fqn not in inputs:
            continue  # not reached by this forward pass
        x = inputs[fqn]
        key = _layer_key(mod, x, cuda_graphs)
        hit = _cached_choice(cache.get(key), mod, x)
        if hit is not None:
            got = cache[key]
            entry = PlanEntry(fqn, m_bucket(x.shape[0]), hit, _floats(got.get("times_ms")), cached=True,
                              gpu_ms=_floats(got.get("gpu_ms")), host_ms=_floats(got.get("host_ms")),
                              speedup=_floats(got.get("speedup")), spread=_pairs(got.get("spread")),
                              dropped=_strings(got.get("dropped")))
        else:
            entry = _measure(fqn, mod, x, margin, rep, cuda_graphs, budget_s)
            cache[key] = entry.to_json()
        mod.set_plan(entry.bucket, Backend(entry.chosen))  # also frees the losing candidates' prepared state
        decisions.append(entry)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        tmp.replace(path)
    return decisions
