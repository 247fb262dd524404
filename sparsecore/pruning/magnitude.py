"""One-shot magnitude pruning: |w| scores plus the config's selection rule, layer-wise or global."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .. import layers
from ..config import SparsityConfig
from ..masks import keep_count, keep_topk
from .rules import rule_for

FilterFn = Callable[[nn.Module, str], bool]

__all__ = ["prunable_layers", "select_layers", "magnitude_layer_mask", "magnitude_masks", "FilterFn"]


def prunable_layers(model: nn.Module, filter_fn: FilterFn | None = None) -> dict[str, nn.Module]:
    """Linear-like and Conv2d modules of ``model`` by qualified name (``sparsecore.layers``), filtered by
    ``filter_fn(module, fqn)``."""
    return layers.select(model, "unstructured", filter_fn=filter_fn)[0]


def select_layers(model: nn.Module, pattern: str, m: int = 4, filter_fn: FilterFn | None = None,
                  prune_output: bool = False) -> dict[str, nn.Module]:
    """Prunable layers for ``pattern`` (``sparsecore.layers.select``: e.g. for N:M only layers whose K is a
    multiple of ``m``; for channels not the output layer unless ``prune_output``). GPT-2 ``Conv1D`` layers
    (weight ``[in, out]``) are left to the one-shot pruners, which score their ``[out, in]`` view."""
    chosen = layers.select(model, pattern, m, filter_fn, prune_output)[0]
    return {fqn: mod for fqn, mod in chosen.items() if not layers.is_conv1d_t(mod)}


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
def magnitude_masks(model: nn.Module, config: SparsityConfig, filter_fn: FilterFn | None = None,
                    prune_output: bool = False) -> dict[str, torch.Tensor]:
    """Bool keep-masks ``{fqn: mask shaped like weight}`` for every prunable layer.

    Layer scope prunes each layer to ``config.sparsity`` (N:M: n of every m along K); global scope ranks all
    layers together (channels by RMS norm so that layers of different K compare). Layers whose K is not a
    multiple of m are skipped for N:M (they stay dense), and for channels the output layer unless
    ``prune_output``; ``sparsecore.layers.select`` names every skipped layer with its reason. Masks are shaped
    like each layer's ``weight`` (``[in, out]`` for GPT-2 ``Conv1D``).

    >>> masks = magnitude_masks(nn.Linear(8, 4), SparsityConfig("unstructured", 0.5))
    """
    mods = layers.select(model, config.pattern, config.m, filter_fn, prune_output)[0]
    weights = {fqn: layers.weight_matrix(mod) for fqn, mod in mods.items()}
    if not weights:
        return {}
    if config.scope == "global":
        masks = _global_masks(weights, config)
    else:
        masks = {fqn: magnitude_layer_mask(w, config.pattern, config.sparsity, config.n, config.m)
                 for fqn, w in weights.items()}
    return {fqn: layers.mask_from_matrix(mods[fqn], mask) for fqn, mask in masks.items()}
