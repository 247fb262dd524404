"""Selection rules: how a layer's scores become a bool keep-mask, one table entry per mask rule.

A format declares which rule makes its masks (``PackedWeight.mask_rule``): ``"unstructured"`` keeps the
``k`` best entries, ``"nm"`` keeps ``n`` of every ``m`` along K, ``"channel"`` keeps the ``k`` best output
channels. Pruners look the rule up here (``rule_for(pattern)``) instead of branching on the pattern, so a new
format with an existing rule needs no change in ``pruning/``. Selection itself is ``sparsecore.masks``
(one tie rule: lower flat index first).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..masks import as_matrix, channel_to_weight_mask, keep_channels, keep_count, keep_n_of_m, keep_topk
from .scores import channel_norm, channel_rms, magnitude

__all__ = ["SelectionRule", "RULES", "rule_for"]


@dataclass(frozen=True)
class SelectionRule:
    """One rule: the magnitude scores it ranks, its budget and how its selection becomes a weight mask."""

    name: str
    layer_score: Callable[[torch.Tensor], torch.Tensor]    # weight -> scores ranked within one layer
    global_score: Callable[[torch.Tensor], torch.Tensor]   # weight -> 1-D scores comparable across layers
    units: Callable[[torch.Tensor], int]                   # weight -> how many entries the budget counts
    select: Callable[[torch.Tensor, int, int, int], torch.Tensor]  # (scores, keep, n, m) -> selection
    to_weight_mask: Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor]  # selection -> weight-shaped bool
    fits: Callable[[nn.Module, int], bool]                 # (layer, m) -> can this layer follow the rule

    def layer_mask(self, weight: torch.Tensor, sparsity: float, n: int = 2, m: int = 4) -> torch.Tensor:
        """One layer's magnitude mask (weight-shaped bool) at ``sparsity`` (N:M: ``n`` of every ``m``)."""
        keep = keep_count(self.units(weight), sparsity)
        return self.to_weight_mask(self.select(self.layer_score(weight), keep, n, m), tuple(weight.shape))


def _any_layer(mod: nn.Module, m: int) -> bool:
    return True


def _nm_fits(mod: nn.Module, m: int) -> bool:
    # K of the [out, K] view: a grouped conv's K runs over its own group's inputs, N:M along it is well defined.
    from ..layers import weight_matrix
    return as_matrix(weight_matrix(mod)).shape[1] % m == 0


def _reshape(selection: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return selection.reshape(shape)


RULES: dict[str, SelectionRule] = {
    "unstructured": SelectionRule("unstructured", magnitude, lambda w: magnitude(w).reshape(-1), torch.Tensor.numel,
                                  lambda s, keep, n, m: keep_topk(s, keep), _reshape, _any_layer),
    "nm": SelectionRule("nm", magnitude, lambda w: magnitude(w).reshape(-1), torch.Tensor.numel,
                        lambda s, keep, n, m: keep_n_of_m(s, n, m), _reshape, _nm_fits),
    "channel": SelectionRule("channel", channel_norm, channel_rms, lambda w: w.shape[0],
                             lambda s, keep, n, m: keep_channels(s, keep), channel_to_weight_mask, _any_layer),
}


def rule_for(pattern: str) -> SelectionRule:
    """The selection rule of ``pattern``: a registered format kind (its ``mask_rule``) or a rule name."""
    from ..formats import FORMATS

    name = FORMATS[pattern].mask_rule if pattern in FORMATS else pattern
    if name not in RULES:
        raise ValueError(f"pattern must be one of {tuple(FORMATS)}, got {pattern!r}")
    return RULES[name]
