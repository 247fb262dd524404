"""Group-wise channel selection: score each coupled channel group as one, keep the same share of every group.

A ``ChannelGroup`` (see ``trace.py``) ties the output channels of several layers (a residual add's sides, a
depthwise conv and its producer, a head's q/k/v rows). Pruning each layer on its own scores leaves the members
of a group disagreeing, and a disagreeing group keeps its full width. Here the group's importance is the sum,
over its members, of each member's per-channel score (L2 norm of the output row by default), aggregated per
unit; the top ``keep_count(n_prunable, 1 - sparsity)`` units of each group are kept, pinned units always.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..masks import as_matrix, keep_count, keep_topk
from .trace import ChannelGraph

__all__ = ["l2_channel_scores", "group_channel_masks"]


def l2_channel_scores(model: nn.Module, graph: ChannelGraph) -> dict[str, torch.Tensor]:
    """``{fqn: [out] float64}``: L2 norm of each output row of every traced conv / linear / depthwise layer."""
    return {f: as_matrix(model.get_submodule(f).weight.detach()).double().norm(dim=1).cpu()
            for f, i in graph.layers.items() if i.kind in ("conv", "linear", "dw", "grouped")}


def group_channel_masks(model: nn.Module, graph: ChannelGraph, sparsity: float,
                        filter_fn: Callable[[nn.Module, str], bool] | None = None,
                        scores: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Per-layer output-channel masks ``{fqn: bool [out]}`` chosen group by group, and ``{fqn: reason}`` skipped.

    A group is left whole (and its members reported) when ``filter_fn`` excludes one of its members (pruning the
    others alone would keep the width anyway) or when none of its units may shrink (they feed the model output
    or an op the tracer cannot see through). A group with every unit prunable keeps at least one.

    >>> masks, skipped = group_channel_masks(model, trace_channels(model, x), 0.5, lambda m, f: f != "fc")
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    scores = scores if scores is not None else l2_channel_scores(model, graph)
    masks: dict[str, torch.Tensor] = {}
    skipped: dict[str, str] = {}
    for g in graph.groups:
        excluded = [f for f in g.fqns if filter_fn is not None and not filter_fn(model.get_submodule(f), f)]
        if excluded:
            for f in g.fqns:
                skipped[f] = ("excluded by filter_fn" if f in excluded else
                              f"channels coupled with {', '.join(excluded[:3])}, which filter_fn excludes")
            continue
        n_free = int(g.prunable.sum())
        if n_free == 0:
            for f in g.fqns:
                skipped[f] = "output channels feed the model output or an op the tracer cannot see through"
            continue
        k = keep_count(n_free, float(sparsity))
        if k == 0 and n_free == g.n_units:
            k = 1  # never empty a whole group: the model would lose a path entirely
        free = g.prunable.nonzero().flatten()
        keep = ~g.prunable.clone()
        keep[free[keep_topk(g.scores(scores)[free], k)]] = True
        masks.update(g.expand(keep))
    return masks, skipped
