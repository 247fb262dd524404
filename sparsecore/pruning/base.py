"""Shared pieces of the pruners: pattern checks, per-pattern selection, mask application, the Pruner base.

Every pruner in this package is a score function plus a budget rule and ends in the one hand-off type:
``{fqn: bool mask shaped like the layer's weight}`` of one kind (unstructured, N:M along K, channel).
Selection itself is always delegated to ``sparsecore.masks`` (keep_topk / keep_n_of_m / keep_channels) so
the tie rule (lower flat index first) holds everywhere.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..masks import as_matrix, channel_to_weight_mask, check_mask
from .magnitude import FilterFn, prunable_layers, select_layers  # noqa: F401  (re-exported)

from ..config import patterns
from .rules import rule_for

__all__ = ["Pruner", "FixedMasks", "check_pattern", "select_layers", "select_mask", "apply_masks", "masked_copy",
           "masks_sparsity", "weight_of"]


def check_pattern(pattern: str, allowed: tuple[str, ...] | None = None) -> str:
    """Validate a pattern name against ``allowed`` (default: every registered format kind); returns it."""
    allowed = patterns() if allowed is None else allowed
    if pattern not in allowed:
        raise ValueError(f"pattern must be one of {allowed}, got {pattern!r}")
    return pattern


def check_fraction(name: str, value: float, *, upper_open: bool = False) -> float:
    """Validate a fraction in [0, 1] (or [0, 1) with ``upper_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    hi_ok = value < 1.0 if upper_open else value <= 1.0
    if not (0.0 <= value and hi_ok):
        raise ValueError(f"{name} must lie in [0, 1{')' if upper_open else ']'}, got {value!r}")
    return float(value)


def weight_of(module: nn.Module) -> torch.Tensor:
    """The layer's trainable weight tensor (the original one when a parametrization is registered)."""
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and "weight" in parametrizations:
        return parametrizations["weight"].original
    return module.weight


def select_mask(scores: torch.Tensor, pattern: str, keep: int, n: int = 2, m: int = 4) -> torch.Tensor:
    """Mask for one layer from scores (weight-shaped; ``[out]`` for channel): keep ``keep`` entries/channels.

    For ``nm`` ``keep`` is ignored (``n`` of every ``m`` along K). Returns a weight-shaped bool mask except
    for channel, which returns the ``[out]`` channel mask (broadcast it with ``channel_to_weight_mask``).
    """
    return rule_for(pattern).select(scores, keep, n, m)


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor], *, zero_bias: bool = False) -> None:
    """Zero the pruned weights of ``model`` in place (``weight[~mask] = 0``).

    With ``zero_bias`` the bias of every output channel whose mask row is entirely False is zeroed too, so a
    channel-pruned layer behaves like the physically sliced one (a dropped channel then emits exactly 0).
    """
    modules = dict(model.named_modules())
    for fqn, mask in masks.items():
        if fqn not in modules:
            raise KeyError(f"mask for {fqn!r} but the model has no such module")
        mod = modules[fqn]
        weight = weight_of(mod)
        check_mask(mask, weight)
        weight.masked_fill_(~mask, 0)
        if zero_bias and getattr(mod, "bias", None) is not None:
            dropped = ~as_matrix(mask).any(dim=1)
            mod.bias.masked_fill_(dropped, 0)


@torch.no_grad()
def masked_copy(model: nn.Module, masks: dict[str, torch.Tensor], dtype: torch.dtype = torch.float64) -> nn.Module:
    """A deep copy of ``model`` cast to ``dtype`` whose pruned weights are exactly +0; ``model`` is untouched.

    The masked dense reference a sparse model must reproduce: ``torch.where(mask, weight, 0)``, so a NaN,
    inf or -0 in a pruned position becomes +0 (multiplying by the mask would keep NaN and -0). ``masks``:
    ``{fqn: bool weight-shaped}`` on any device. Example::

        ref = masked_copy(dense, magnitude_masks(dense, SparsityConfig("nm")))
        err = (sparse(x).double() - ref(x.double())).abs().max()
    """
    ref = copy.deepcopy(model).to(dtype)
    modules = dict(ref.named_modules())
    for fqn, mask in masks.items():
        if fqn not in modules:
            raise KeyError(f"mask for {fqn!r} but the model has no such module")
        weight = weight_of(modules[fqn])
        mask = mask.to(weight.device)
        check_mask(mask, weight)
        weight.copy_(torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device)))
    return ref


def masks_sparsity(masks: dict[str, torch.Tensor]) -> float:
    """Fraction of pruned weights over all masks together (0.0 when empty)."""
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return 0.0 if total == 0 else 1.0 - kept / total


def channel_sparsity(masks: dict[str, torch.Tensor]) -> float:
    """Fraction of output channels dropped (rows entirely False) over all masks together."""
    total = sum(m.shape[0] for m in masks.values())
    dropped = sum(int((~as_matrix(m).any(dim=1)).sum()) for m in masks.values())
    return 0.0 if total == 0 else dropped / total


def full_masks(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """All-True masks for ``layers`` (nothing pruned yet)."""
    return {f: torch.ones_like(weight_of(mod), dtype=torch.bool) for f, mod in layers.items()}


def broadcast_channels(channel_masks: dict[str, torch.Tensor], layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``{fqn: [out] bool}`` -> ``{fqn: weight-shaped bool}``."""
    return {f: channel_to_weight_mask(cm, weight_of(layers[f]).shape) for f, cm in channel_masks.items()}


class Pruner:
    """What ``sparsecore.pruning.training`` needs from a pruner that runs inside a training loop.

    ``masks``: the current hard masks ``{fqn: bool weight-shaped}``. ``zero_after_step``: re-zero pruned
    weights after every optimiser step (hard pruning; False for soft methods such as PDP and PSAP).
    Hooks: ``before_step`` runs when gradients exist and before the optimiser updates weights,
    ``after_step`` after the update, ``on_epoch_end(epoch)`` after each epoch, ``finalize()`` once at the end
    and returns the final hard masks (and leaves the model's pruned weights at zero).
    """

    zero_after_step: bool = True
    zero_bias: bool = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.masks: dict[str, torch.Tensor] = {}

    def before_step(self) -> None:
        """Called with gradients populated, before the optimiser step."""

    def after_step(self) -> None:
        """Called after each optimiser step (before pruned weights are re-zeroed)."""

    def on_epoch_end(self, epoch: int) -> None:
        """Called after epoch ``epoch`` (0-based) has finished."""

    def apply(self) -> None:
        """Zero the pruned weights of the model according to ``masks``."""
        apply_masks(self.model, self.masks, zero_bias=self.zero_bias)

    def finalize(self) -> dict[str, torch.Tensor]:
        """Final hard masks; the model's pruned weights are zero afterwards."""
        self.apply()
        return self.masks


class FixedMasks(Pruner):
    """Hold given masks during (re)training: pruned weights are re-zeroed after every optimiser step.

    Use it to fine-tune after a one-shot method (magnitude, SNACS). ``zero_bias`` also zeroes the bias of
    dropped channels (set it for channel masks).
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor], *, zero_bias: bool = False) -> None:
        super().__init__(model)
        self.masks = dict(masks)
        self.zero_bias = zero_bias
        self.apply()
