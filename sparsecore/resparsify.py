"""Sparsifying a model that already has sparse layers (``sparsify`` called twice, e.g. 0.5 then 0.9).

What a user gets: every already-sparse layer is pruned again from its current weights, the masked dense
weight, under the new config, exactly as a dense layer holding those weights would be (its pruned entries
are zeros, so magnitude pruning drops them first). Pruned weights never come back, since their values are
gone:

* unstructured: a new mask that keeps an entry an earlier call pruned (a lower sparsity than the layer
  has) raises ``ValueError`` instead of storing zeros as kept weights;
* N:M: the new mask is intersected with the old one (a group keeps at most n; fewer is valid N:M);
* channel: refused (channel pruning and slimming start from a dense model).

Layers the new call does not select (``filter_fn``, N:M size rules) stay as they were. On any error the
model is left as it was.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .modules import SparseConv2d, SparseLinear

__all__ = ["resparsify", "kept_mask", "dense_twin"]


def kept_mask(module: SparseLinear | SparseConv2d) -> torch.Tensor:
    """Bool mask (weight-shaped) of the entries a sparse layer stores, kept zeros included."""
    tensors, meta = module.packed.state()
    ones = dict(tensors, values=torch.ones_like(tensors["values"]))
    return type(module.packed).from_state(ones, meta).to_dense() != 0


def dense_twin(module: SparseLinear | SparseConv2d) -> nn.Module:
    """An ``nn.Linear`` / ``nn.Conv2d`` holding the sparse layer's masked dense weight and its bias."""
    weight = module.dense_weight()
    bias = module.bias
    if isinstance(module, SparseLinear):
        twin = nn.Linear(module.in_features, module.out_features, bias=bias is not None,
                         device=weight.device, dtype=weight.dtype)
    else:
        c = module.conv
        twin = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, c.stride, c.padding, c.dilation,
                         c.groups, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        twin.weight.copy_(weight)
        if bias is not None:
            twin.bias.copy_(bias)
    return twin.train(module.training)


def resparsify(model: nn.Module, config, sparse: dict[str, nn.Module], masks: dict[str, torch.Tensor] | None,
               make_masks: Callable[[nn.Module], dict[str, torch.Tensor]],
               run: Callable[[nn.Module, dict[str, torch.Tensor]], nn.Module]) -> nn.Module:
    """Re-sparsify ``model`` whose sparse layers are ``sparse`` (``{fqn: module}``) under ``config``.

    ``make_masks(model)`` prunes the densified model when ``masks`` is ``None``; ``run(model, masks)`` is
    the ordinary sparsify of a model without sparse layers. Returns ``run``'s result.
    """
    if config.pattern == "channel":
        raise ValueError(f"the model already has sparse layers {sorted(sparse)[:8]}: channel pruning (and slimming) "
                         "starts from a dense model; load or rebuild the dense model first")
    old = {fqn: kept_mask(mod) for fqn, mod in sparse.items()}
    if "" in sparse:  # a bare sparse layer: re-sparsify its dense twin and return the result
        twin = dense_twin(model)
        new_masks = make_masks(twin) if masks is None else dict(masks)
        return run(twin, _merge(new_masks, old, config.pattern)) if new_masks else model
    paths: dict[int, list[str]] = {}
    for fqn, mod in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(mod), []).append(fqn)
    originals = {path: mod for mod in sparse.values() for path in paths[id(mod)]}
    twins = {id(mod): dense_twin(mod) for mod in sparse.values()}
    _swap_all(model, {path: twins[id(mod)] for path, mod in originals.items()})
    try:
        new_masks = make_masks(model) if masks is None else dict(masks)
        new_masks = _merge(new_masks, old, config.pattern)
        result = run(model, new_masks)
    except BaseException:
        _swap_all(model, originals)
        raise
    # sparse layers the new call did not select are put back untouched
    for path, mod in originals.items():
        if result.get_submodule(path) is twins[id(mod)]:
            _swap_all(result, {path: mod})
    return result


def _merge(masks: dict[str, torch.Tensor], old: dict[str, torch.Tensor], pattern: str) -> dict[str, torch.Tensor]:
    out = dict(masks)
    for fqn, mask in masks.items():
        before = old.get(fqn)
        if before is None or not isinstance(mask, torch.Tensor) or mask.shape != before.shape:
            continue  # not an already-sparse layer, or a bad mask sparsify's own checks will name
        before = before.to(mask.device)
        revived = int((mask & ~before).sum())
        if pattern == "nm":
            out[fqn] = mask & before
        elif revived:
            raise ValueError(f"layer {fqn!r} is already sparse ({int(before.sum())} of {before.numel()} weights kept); "
                             f"the new mask keeps {revived} weights an earlier sparsify pruned, and their values are "
                             "gone: re-sparsify only to a higher sparsity, or sparsify the dense model")
    return out


def _swap_all(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    from .sparsify import swap_module

    for path, mod in modules.items():
        swap_module(model, path, mod)
