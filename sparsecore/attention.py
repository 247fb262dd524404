"""Fused CPU attention for transformers models, switched on per model only where it measures faster than SDPA.

transformers (>= 4.53) calls attention through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` and builds
masks through ``ALL_MASK_ATTENTION_FUNCTIONS`` under the same name. ``use_fast_attention`` registers
``"sparsecore"`` in both (the function below, and transformers' own SDPA mask builder, so the kernel receives
exactly the boolean padding masks SDPA would), runs the model once on the example inputs to capture its attention
calls, times each distinct call shape with torch SDPA and with the fused kernel (interleaved, paired ratios),
checks that both give the same output, and switches the model to ``"sparsecore"`` only when the kernel wins
on every shape beyond the noise (the planner's rule: median under ``(1 - margin)`` x SDPA's and the lower quartile
of the paired SDPA/kernel ratios above 1). Otherwise the model keeps its implementation and the returned
``AttentionChoice`` says why.

Calls the kernel does not cover run torch SDPA unchanged: tensors that are not CPU float32 (bf16 included),
autograd (inputs that require grad), dropout, grouped-query heads, position biases, softcapping, attention sinks,
``output_attentions``, causal attention over a key cache longer than the queries.

>>> import sparsecore as sc
>>> choice = sc.use_fast_attention(model, (input_ids,), {"attention_mask": attention_mask})
>>> choice.chosen, choice.speedup        # ("sparsecore", 1.4) or the previous implementation and the reason
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from .timing import interleaved_samples_ms, quantiles

__all__ = ["ATTENTION_NAME", "AttentionChoice", "sparsecore_attention_forward", "register_attention",
           "use_fast_attention"]

ATTENTION_NAME = "sparsecore"
_CAPTURE_NAME = "sparsecore_capture"
_MAX_SHAPES = 4
_AGREE = dict(atol=1e-4, rtol=1e-3)  # fp32: the kernel's error against float64 is ~1e-6


@dataclass(frozen=True)
class AttentionChoice:
    """What ``use_fast_attention`` did: ``chosen`` is the model's attention implementation afterwards."""

    chosen: str
    previous: str
    reason: str
    times_ms: dict[str, float] = field(default_factory=dict)   # median per call, summed over the shapes timed
    speedup: Optional[float] = None                             # SDPA median / kernel median (summed)
    spread: Optional[tuple[float, float]] = None                # q25, q75 of paired ratios (worst shape)
    shapes: tuple[tuple[int, ...], ...] = ()                    # query shapes [B, H, Sq, D] timed


def _sdpa() -> Callable[..., Any]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward


def _kernel_misfit(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: Optional[torch.Tensor], dropout: float, is_causal: bool,
                   kwargs: dict[str, Any]) -> bool:
    """True where the fused kernel does not apply and SDPA runs instead (see the module docstring)."""
    tensors = (query, key, value)
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return True
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return True
    if dropout or kwargs.get("output_attentions") or kwargs.get("softcap") is not None:
        return True
    if kwargs.get("position_bias") is not None or kwargs.get("s_aux") is not None:
        return True
    if key.shape[1] != query.shape[1] or value.shape[1] != query.shape[1]:
        return True
    if is_causal and key.shape[2] != query.shape[2]:
        return True
    return attention_mask is not None and attention_mask.dtype not in (torch.bool, torch.float32)


def sparsecore_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                                 scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                                 **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: q/k/v ``[B, H, S, D]`` -> ``([B, Sq, H, Dv]`` contiguous, None).

    Same causal rule as transformers' SDPA function: causal only without a mask and for more than one query.
    """
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(query.shape[2] > 1 and attention_mask is None and causal)
    if _kernel_misfit(query, key, value, attention_mask, dropout, causal, kwargs):
        return _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                       is_causal=is_causal, **kwargs)
    from .kernels.cpu.attention import attention_bshd
    return attention_bshd(query, key, value, attention_mask, scaling, causal), None


def _interfaces() -> tuple[Any, Any, Callable[..., Any]]:
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        from transformers.modeling_utils import AttentionInterface
    except ImportError as e:
        raise RuntimeError(f"transformers with AttentionInterface and AttentionMaskInterface (>= 4.53) is needed: {e}")
    return AttentionInterface, AttentionMaskInterface, sdpa_mask


def register_attention() -> None:
    """Register ``"sparsecore"`` with transformers (idempotent); ``model.set_attn_implementation("sparsecore")`` then
    forces the kernel without timing it (it raises ``CpuKernelsUnavailable`` where the kernel cannot be built)."""
    attn, masks, sdpa_mask = _interfaces()
    attn.register(ATTENTION_NAME, sparsecore_attention_forward)
    masks.register(ATTENTION_NAME, sdpa_mask)


@dataclass
class _Call:
    module: nn.Module
    args: tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]
    kwargs: dict[str, Any]


_recorder: list[dict[tuple, _Call]] = []  # the capture in progress, if any


def _capture_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Optional[torch.Tensor], **kwargs: Any) -> tuple[torch.Tensor, None]:
    if _recorder:
        m = attention_mask
        sig = (tuple(query.shape), tuple(key.shape), tuple(value.shape), query.stride(), key.stride(),
               None if m is None else (tuple(m.shape), m.dtype),
               tuple(sorted((n, a if isinstance(a, (bool, int, float, str, type(None))) else type(a).__name__)
                            for n, a in kwargs.items())))
        calls = _recorder[-1]
        if sig not in calls and len(calls) < _MAX_SHAPES:
            calls[sig] = _Call(module, (query, key, value, attention_mask), dict(kwargs))
    return _sdpa()(module, query, key, value, attention_mask, **kwargs)


@contextmanager
def _implementation(model: nn.Module, name: str) -> Iterator[None]:
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def _capture(model: nn.Module, example_inputs: tuple, example_kwargs: dict[str, Any]) -> list[_Call]:
    attn, masks, sdpa_mask = _interfaces()
    attn.register(_CAPTURE_NAME, _capture_forward)
    masks.register(_CAPTURE_NAME, sdpa_mask)
    _recorder.append({})
    try:
        with _implementation(model, _CAPTURE_NAME), torch.no_grad():
            model(*example_inputs, **example_kwargs)
        return list(_recorder[-1].values())
    finally:
        _recorder.pop()


def _measure(call: _Call, rounds: int) -> tuple[dict[str, list[float]], Optional[str]]:
    """Interleaved samples of SDPA and the kernel on one captured call; a reason when their outputs disagree."""
    sdpa = _sdpa()
    q, k, v, mask = call.args
    fns = {"sdpa": lambda: sdpa(call.module, q, k, v, mask, **call.kwargs),
           ATTENTION_NAME: lambda: sparsecore_attention_forward(call.module, q, k, v, mask, **call.kwargs)}
    with torch.no_grad():
        want, got = fns["sdpa"]()[0], fns[ATTENTION_NAME]()[0]
        if got.shape != want.shape or not torch.allclose(got, want, **_AGREE):
            err = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
            return {}, f"the kernel's output differs from SDPA's on q {tuple(q.shape)} (max abs error {err:.3g})"
        return interleaved_samples_ms(fns, warmup=2, rounds=rounds), None


def use_fast_attention(model: nn.Module, example_inputs: tuple = (), example_kwargs: Optional[dict[str, Any]] = None,
                       *, rounds: int = 30, margin: float = 0.05) -> AttentionChoice:
    """Switch a transformers model to the fused CPU attention where it is faster than SDPA on the model's shapes.

    ``model(*example_inputs, **example_kwargs)`` runs once (no grad) to capture its attention calls, at the batch
    size and sequence length it will serve; each distinct call is timed ``rounds`` times per contender. Returns what
    was chosen, the times and the reason; the model is left on its previous implementation unless the kernel wins.

    >>> choice = use_fast_attention(bert, (ids,), {"attention_mask": am})   # ids, am: [B, S]
    """
    from .kernels.cpu.attention import why_unavailable

    config = getattr(model, "config", None)
    if not hasattr(model, "set_attn_implementation") or not hasattr(config, "_attn_implementation"):
        raise TypeError(f"use_fast_attention takes a transformers PreTrainedModel, got {type(model).__name__}")
    if rounds < 5:
        raise ValueError(f"rounds must be >= 5, got {rounds}")
    previous = config._attn_implementation
    keep = previous if previous != ATTENTION_NAME else "sdpa"

    def stay(reason: str, **kw: Any) -> AttentionChoice:
        if model.config._attn_implementation != keep:
            model.set_attn_implementation(keep)
        return AttentionChoice(chosen=keep, previous=previous, reason=reason, **kw)

    why = why_unavailable()
    if why is not None:
        return stay(why)
    if not model._can_set_attn_implementation():
        return stay(f"{type(model).__name__} does not call attention through transformers' AttentionInterface")
    register_attention()
    calls = _capture(model, tuple(example_inputs), dict(example_kwargs or {}))
    if not calls:
        return stay("the example forward made no attention call")
    totals = {"sdpa": 0.0, ATTENTION_NAME: 0.0}
    worst: Optional[tuple[float, float]] = None
    shapes = tuple(tuple(c.args[0].shape) for c in calls)
    wins = True
    for call in calls:
        samples, disagree = _measure(call, rounds)
        if disagree is not None:
            return stay(disagree, shapes=shapes)
        med = {name: quantiles(s)[1] for name, s in samples.items()}
        for name in totals:
            totals[name] += med[name]
        q25, _, q75 = quantiles([a / max(b, 1e-9) for a, b in zip(samples["sdpa"], samples[ATTENTION_NAME])])
        worst = (q25, q75) if worst is None or q25 < worst[0] else worst
        wins = wins and med[ATTENTION_NAME] < (1.0 - margin) * med["sdpa"] and q25 > 1.0
    speedup = totals["sdpa"] / max(totals[ATTENTION_NAME], 1e-9)
    stats = dict(times_ms=totals, speedup=speedup, spread=worst, shapes=shapes)
    if not wins:
        return stay(f"{keep} kept: the fused kernel is not faster than SDPA beyond the noise on every shape "
                    f"({speedup:.2f}x)", **stats)
    model.set_attn_implementation(ATTENTION_NAME)
    return AttentionChoice(chosen=ATTENTION_NAME, previous=previous, reason=f"{speedup:.2f}x SDPA", **stats)
