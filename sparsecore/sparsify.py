"""``sparsify``: prune (or take given masks), pack, and swap linear-like and Conv2d modules in place.

Which layers qualify, and why the others stay dense, is ``sparsecore.layers``; what happened to each layer
is in ``sparsecore.last_report(model)``.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

from . import layers, report
from .config import SparsityConfig
from .masks import check_channel, check_mask
from .modules import SparseConv1D, SparseConv2d, SparseLinear
from .pruning.magnitude import FilterFn, magnitude_masks

__all__ = ["sparsify", "swap_module", "sparse_modules"]


def swap_module(model: nn.Module, fqn: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``fqn`` by ``new``."""
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not hasattr(parent, child):
        raise KeyError(f"model has no submodule {fqn!r}")
    setattr(parent, child, new)


def _check_pattern(fqn: str, mask: torch.Tensor, config: SparsityConfig) -> None:
    try:
        config.format.check_mask_pattern(mask, config)
    except ValueError as e:
        raise type(e)(f"layer {fqn!r}: {e}") from None


@torch.no_grad()
def sparsify(model: nn.Module, config: SparsityConfig, filter_fn: FilterFn | None = None,
             masks: dict[str, torch.Tensor] | None = None,
             example_inputs: tuple | None = None, progress: bool = False,
             slim: bool | None = None, round_to: int | None = None, example_kwargs: dict | None = None,
             prune_output: bool = False) -> nn.Module:
    """Swap every selected linear-like layer (``nn.Linear`` and subclasses, GPT-2 ``Conv1D``) and ``nn.Conv2d``
    of ``model`` for its sparse twin, in place.

    masks: ``{fqn: bool mask shaped like the weight}`` from any pruner; when ``None``, one-shot magnitude
        pruning under ``config`` makes them (when slimming: group by group, so that channels tied by residual
        adds, concats, depthwise convs and attention heads are scored and pruned together; see
        ``sparsecore.channel.group_channel_masks``). Layers without a mask stay dense.
    filter_fn: ``filter_fn(module, fqn) -> bool`` selects layers (only used when ``masks`` is ``None``).
    prune_output: channel pattern only: also prune the output layer (classifier, LM head), which is left
        dense by default (``sparsecore.layers``).
    example_inputs: when given, the planner times the candidate backends per layer on these inputs
        (``model(*example_inputs)``) and keeps the fastest, dense included.
    slim: channel pattern only. Physically remove pruned channels where the model graph allows it
        (weights, BatchNorm, biases and the next layers' inputs shrink; see ``sparsecore.channel``), and
        pack only the layers a residual add or concat keeps at full width. Needs ``example_inputs`` to
        trace the graph; default: on whenever the pattern is "channel" and ``example_inputs`` is given.
        ``round_to``: round kept channel counts up to a multiple (8 suits tensor cores). Transformers are
        traced with ``torch.export`` (MLP hidden channels and whole attention heads shrink); keyword inputs for
        the trace go in ``example_kwargs`` (the planner only uses ``example_inputs``).
    Returns the sparsified model: ``model`` itself, modified in place, except when slimming, which returns
    a new, smaller model (``model`` is left untouched). Always use the return value.
    Called again on a sparsified model (say 0.5, then 0.9), the sparse layers are pruned again from their
    current weights; pruned weights never come back (see ``sparsecore.resparsify``).
    ``sparsecore.last_report(result)`` lists every weight layer: sparse (format, kept fraction, planned
    backend with its speed vs dense and spread) or skipped with the reason.

    >>> model = sparsify(nn.Sequential(nn.Linear(64, 64)), SparsityConfig("nm", n=2, m=4))
    """
    if not isinstance(config, SparsityConfig):
        raise TypeError(f"config must be a SparsityConfig, got {type(config).__name__}")
    if masks is not None and not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a dict {{fqn: bool mask}}, got {type(masks).__name__}")
    already = sparse_modules(model)
    if already:
        from .resparsify import resparsify
        return resparsify(model, config, already, masks,
                          lambda m: magnitude_masks(m, config, filter_fn, prune_output=prune_output),
                          lambda m, mk: sparsify(m, config, filter_fn, mk, example_inputs, progress, slim, round_to,
                                                 example_kwargs, prune_output))
    selected, skipped = layers.select(model, config.pattern, config.m, filter_fn, prune_output)
    if masks is not None:
        _check_masked_layers(model, masks, skipped)
        skipped.update({f: (mod, "no mask given") for f, mod in selected.items() if f not in masks})
    if slim is None:
        slim = config.pattern == "channel" and example_inputs is not None
    if slim:
        model, masks = _slim(model, config, masks, example_inputs, round_to, filter_fn, example_kwargs)
    elif masks is None:
        masks = magnitude_masks(model, config, filter_fn, prune_output=prune_output)
    if not masks:
        report.record_skips(model, skipped)
        return model
    if "" in masks:  # a bare nn.Linear / nn.Conv2d: there is no parent to swap into, so return its twin
        if len(masks) != 1:
            raise ValueError("a mask for the root module ('') cannot be combined with masks for submodules")
        if example_inputs is not None or slim:
            raise ValueError("planning or slimming a bare layer: wrap it in nn.Sequential first")
        return _sparse_twin("", model, masks[""], config)
    modules = dict(model.named_modules())
    # a module reachable under several names (shared weights) is swapped at every one of them
    aliases: dict[int, list[str]] = {}
    for fqn, mod in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(mod), []).append(fqn)
    items = list(masks.items())
    if progress:
        from tqdm import tqdm
        items = tqdm(items, desc="packing", unit="layer")
    twins = {fqn: _sparse_twin(fqn, modules.get(fqn), mask, config) for fqn, mask in items}
    for fqn, new in twins.items():  # every layer packed before the first swap: a bad mask changes nothing
        for path in aliases.get(id(modules[fqn]), [fqn]):
            swap_module(model, path, new)
    report.record_skips(model, {f: s for f, s in skipped.items() if f not in masks})
    if example_inputs is not None:
        from .planner import plan
        plan(model, example_inputs)
    return model


def _check_some_channel_kept(masks: dict[str, torch.Tensor]) -> None:
    """Slimming needs every pruned layer to keep at least one output channel (zero would cut the graph)."""
    for fqn, mask in masks.items():
        if isinstance(mask, torch.Tensor) and mask.dim() >= 1 and mask.shape[0] and not bool(mask.any()):
            raise ValueError(f"layer {fqn!r} would keep 0 of its {mask.shape[0]} output channels, which cuts the "
                             "model apart; lower the sparsity (below 1.0) or exclude the layer with filter_fn")


def _check_masked_layers(model: nn.Module, masks: dict[str, torch.Tensor], skipped: dict[str, tuple]) -> None:
    """A mask for a layer that cannot be made sparse correctly (e.g. MHA's ``out_proj``) raises with the reason."""
    for fqn in masks:
        if fqn in skipped and skipped[fqn][1] == layers.MHA_SKIP:
            raise ValueError(f"mask for {fqn!r}: {layers.MHA_SKIP}")


def _sparse_twin(fqn: str, mod: nn.Module | None, mask: torch.Tensor, config: SparsityConfig) -> nn.Module:
    if mod is None or not (layers.linear_like(mod) or isinstance(mod, nn.Conv2d)):
        reason = layers.skip_reason(mod, config.pattern, config.m) if mod is not None else None
        raise ValueError(f"mask for {fqn!r}: expected an nn.Linear or nn.Conv2d (or GPT-2 Conv1D) there, found "
                         f"{type(mod).__name__}" + (f" ({reason})" if reason else ""))
    check_mask(mask, mod.weight)
    _check_pattern(fqn, mask.t() if layers.is_conv1d_t(mod) else mask, config)  # patterns run along K of [out, K]
    cls: Callable = SparseConv1D if layers.is_conv1d_t(mod) else SparseLinear if isinstance(mod, nn.Linear) \
        else SparseConv2d
    try:
        new = cls.from_dense(mod, mask, config, backend=config.backend)
    except (ValueError, TypeError) as e:
        raise type(e)(f"layer {fqn!r}: {e}") from None
    return new.train(mod.training)


def _slim(model: nn.Module, config: SparsityConfig, masks: dict[str, torch.Tensor] | None, example_inputs: tuple | None,
          round_to: int | None, filter_fn: FilterFn | None,
          example_kwargs: dict | None) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Physically slim a channel-pruned model; return it with block masks for the layers that stay wide.

    Without ``masks`` (layer scope), channels are chosen group by group over the traced coupling groups. The
    reasons why Linear/Conv2d layers keep their width are attached (``sparsecore.channel.slim_skipped``).
    """
    from .channel import (apply_plan, channel_weight_masks, group_channel_masks, mark_slimmed, plan_slim,
                          record_skipped, trace_channels, verify_slim)

    if config.pattern != "channel":
        raise ValueError(f"slim=True needs the 'channel' pattern, config has {config.pattern!r}")
    if not isinstance(example_inputs, tuple) or not (example_inputs or example_kwargs):
        raise ValueError("slim=True needs example_inputs=(x, ...), a tuple of the model's positional inputs "
                         "(keyword inputs go in example_kwargs), to trace the model")
    graph = trace_channels(model, example_inputs, example_kwargs)
    skipped: dict[str, str] = {}
    if masks is None and config.sparsity >= 1.0:
        raise ValueError("channel sparsity 1.0 would keep 0 of every pruned layer's output channels, which cuts the "
                         "model apart; lower the sparsity (below 1.0) or exclude layers with filter_fn")
    if masks is None and config.scope == "layer":
        channel, skipped = group_channel_masks(model, graph, config.sparsity, filter_fn)
    else:
        channel = {}
        for fqn, mask in (masks if masks is not None else magnitude_masks(model, config, filter_fn)).items():
            try:
                channel[fqn] = check_channel(mask)
            except ValueError as e:
                raise type(e)(f"layer {fqn!r}: {e}") from None
    _check_some_channel_kept(channel)
    plan = plan_slim(model, channel, example_inputs, round_to=round_to, graph=graph)
    small = apply_plan(model, plan)
    if plan.tracer == "export":
        verify_slim(model, small, plan, example_inputs, example_kwargs)
    mark_slimmed(small)  # save/load then expect narrower layers than the skeleton's
    record_skipped(small, {**skipped, **plan.skipped})
    if not plan.residual:
        return small, {}        # every pruned channel is gone: nothing left to pack
    return small, channel_weight_masks(small, plan.residual_masks, example_inputs, example_kwargs, tracer=plan.tracer)


def sparse_modules(model: nn.Module) -> dict[str, SparseLinear | SparseConv2d]:
    """The sparse modules of ``model`` by qualified name."""
    return {fqn: m for fqn, m in model.named_modules() if isinstance(m, (SparseLinear, SparseConv2d))}
