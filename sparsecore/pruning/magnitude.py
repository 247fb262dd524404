"""One-shot magnitude pruning: |w| scores plus the config's selection rule, layer-wise or global."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..config import SparsityConfig
from ..masks import keep_count, keep_topk
from .rules import rule_for

FilterFn = Callable[[nn.Module, str], bool]

__all__ = ["prunable_layers", "select_layers", "magnitude_layer_mask", "magnitude_masks", "FilterFn"]


def prunable_layers(model: nn.Module, filter_fn: FilterFn | None = None) -> dict[str, nn.Module]:
    """Linear and Conv2d modules of ``model`` by qualified name, filtered by ``filter_fn(module, fqn)``."""
    layers = {}
    for fqn, mod in model.named_modules():
        if type(mod) in (nn.Linear, nn.Conv2d) and (filter_fn is None or filter_fn(mod, fqn)):
            layers[fqn] = mod
    return layers


def select_layers(model: nn.Module, pattern: str, m: int = 4, filter_fn: FilterFn | None = None) -> dict[str, nn.Module]:
    """Prunable Linear/Conv2d layers for ``pattern``; for N:M only layers whose K is a multiple of ``m``.

    Grouped convolutions are skipped for N:M (their K runs over one group); nothing else is skipped.
    """
    fits = rule_for(pattern).fits
    return {f: mod for f, mod in prunable_layers(model, filter_fn).items() if fits(mod, m)}


def magnitude_layer_mask(weight: torch.Tensor, pattern: str, sparsity: float, n: int = 2, m: int = 4) -> torch.Tensor:
    """One layer's magnitude mask (weight-shaped bool): n of every m along K, the ``round(sparsity * out)``
    lowest-L2 output channels pruned, or the ``round(sparsity * numel)`` smallest |w| pruned (the pattern's
    selection rule, ``sparsecore.pruning.rules``)."""
    return rule_for(pattern).layer_mask(weight, sparsity, n, m)


def _global_masks(weights: dict[str, torch.Tensor], config: SparsityConfig) -> dict[str, torch.Tensor]:
    rule = rule_for(config.pattern)
    scores = [rule.global_score(w) for w in weights.values()]
    flat = torch.cat([s.cpu() for s in scores])
    keep = keep_topk(flat, keep_count(flat.numel(), config.sparsity))
    masks, offset = {}, 0
    for (fqn, w), s in zip(weights.items(), scores):
        part = keep[offset: offset + s.numel()].to(w.device)
        offset += s.numel()
        masks[fqn] = rule.to_weight_mask(part, tuple(w.shape))
    return masks


@torch.no_grad()
def magnitude_masks(model: nn.Module, config: SparsityConfig, filter_fn: FilterFn | None = None) -> dict[str, torch.Tensor]:
    """Bool keep-masks ``{fqn: mask shaped like weight}`` for every prunable layer.

    Layer scope prunes each layer to ``config.sparsity`` (N:M: n of every m along K); global scope ranks all
    layers together (channels by RMS norm so that layers of different K compare). Layers whose K is not a
    multiple of m are skipped for N:M (they stay dense); nothing else is skipped silently.

    >>> masks = magnitude_masks(nn.Linear(8, 4), SparsityConfig("unstructured", 0.5))
    """
    weights = {fqn: mod.weight for fqn, mod in select_layers(model, config.pattern, config.m, filter_fn).items()}
    if not weights:
        return {}
    if config.scope == "global":
        return _global_masks(weights, config)
    return {fqn: magnitude_layer_mask(w, config.pattern, config.sparsity, config.n, config.m)
            for fqn, w in weights.items()}
