"""Activation-aware one-shot pruning (Wanda: Sun et al., "A Simple and Effective Pruning Approach for LLMs", 2023).

Score of weight ``W[i, j]`` of a layer whose input feature ``j`` takes values ``X[:, j]`` over all
calibration tokens: ``|W[i, j]| * ||X[:, j]||_2``. A small weight on a feature with large activations
can matter more than a larger weight on a quiet feature; plain magnitude cannot see that.

Selection (the paper's per-output comparison group):

* unstructured: in every output row, keep the ``K - round(K * sparsity)`` highest scores;
* N:M: keep the ``n`` highest scores in every group of ``m`` along K;
* channel: keep the output channels with the largest activation-weighted row sum ``sum_j score[i, j]``.

Inputs are those of the *dense* model, collected in one calibration pass with forward pre-hooks (the
paper's one-pass variant; it reports the sequential, layer-by-layer variant within noise of it).
Convolutions: ``X[:, j]`` is input channel ``c``'s values over batch and positions, shared by its
``kh * kw`` weights. GPT-2 ``Conv1D`` is scored on its ``[out, in]`` view; masks come back shaped like
each layer's ``weight`` (the one hand-off type).

>>> masks = wanda_masks(model, [batch1, batch2], SparsityConfig("unstructured", 0.5))
>>> model = sparsify(model, config, masks=masks)
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from .. import layers
from ..config import SparsityConfig
from ..masks import as_matrix, channel_to_weight_mask, from_matrix, keep_channels, keep_count, keep_n_of_m
from .magnitude import FilterFn

__all__ = ["wanda_masks", "input_feature_norms", "wanda_scores", "keep_per_row"]


def _run(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, tuple):
        model(*batch)
    elif isinstance(batch, torch.Tensor):
        model(batch)
    else:
        raise TypeError(f"a calibration batch must be a tensor, a tuple of positional inputs or a dict of keyword "
                        f"inputs, got {type(batch).__name__}")


@torch.no_grad()
def input_feature_norms(model: nn.Module, calibration: Iterable[Any], mods: dict[str, nn.Module]
                        ) -> dict[str, torch.Tensor]:
    """``{fqn: ||X[:, j]||_2 per input feature}`` (float64, ``[in]`` or ``[C_in]``) over every calibration batch.

    ``calibration`` yields model inputs: a tensor, a tuple (positional) or a dict (keyword, e.g. a tokenizer's
    output). The model runs in eval mode; its training flags are restored afterwards.
    """
    sums: dict[str, torch.Tensor] = {}

    def hook_for(fqn: str, mod: nn.Module):
        def hook(module, args):
            x = args[0].detach().double()
            if isinstance(module, nn.Conv2d):
                sq = x.pow(2).sum(dim=(0, 2, 3)) if x.dim() == 4 else x.pow(2).sum(dim=(1, 2))
            else:
                sq = x.reshape(-1, x.shape[-1]).pow(2).sum(0)
            sums[fqn] = sums[fqn] + sq if fqn in sums else sq
        return hook

    hooks = [mod.register_forward_pre_hook(hook_for(f, mod)) for f, mod in mods.items()]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    batches = 0
    try:
        for batch in calibration:
            _run(model, batch)
            batches += 1
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    if batches == 0:
        raise ValueError("calibration yielded no batches; Wanda needs at least one")
    missing = sorted(set(mods) - set(sums))
    if missing:
        raise ValueError(f"calibration never reached layers {missing[:8]}; exclude them with filter_fn")
    return {f: s.sqrt() for f, s in sums.items()}


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``|W| * ||X_j||`` in float64, shaped like ``weight`` (``[out, in]`` or ``[C_out, C_in/groups, kh, kw]``).

    ``norms``: ``[in]`` or ``[C_in]``; for a grouped conv, output channel ``o`` sees input channels of group
    ``o // (C_out / groups)``.
    """
    w = weight.detach().double().abs()
    if w.dim() == 2:
        if norms.shape != (w.shape[1],):
            raise ValueError(f"norms must have shape [{w.shape[1]}], got {tuple(norms.shape)}")
        return w * norms.to(w.device).unsqueeze(0)
    c_out, c_in_g = w.shape[:2]
    if norms.shape != (c_in_g * groups,):
        raise ValueError(f"norms must have shape [{c_in_g * groups}], got {tuple(norms.shape)}")
    per_out = norms.to(w.device).reshape(groups, c_in_g).repeat_interleave(c_out // groups, dim=0)  # [C_out, C_in/g]
    return w * per_out[:, :, None, None]


def keep_per_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """In every output row of the ``[out, K]`` view keep the ``K - round(K * sparsity)`` largest scores (ties:
    lower index). Returns a bool mask of ``scores``' shape."""
    mat = as_matrix(scores)
    k = keep_count(mat.shape[1], sparsity)
    order = torch.sort(mat, dim=1, descending=True, stable=True).indices
    keep = torch.zeros_like(mat, dtype=torch.bool)
    keep.scatter_(1, order[:, :k], True)
    return from_matrix(keep, scores.shape)


def _select(scores: torch.Tensor, config: SparsityConfig) -> torch.Tensor:
    if config.pattern == "nm":
        return keep_n_of_m(scores, config.n, config.m)
    if config.pattern == "channel":
        rows = as_matrix(scores).sum(1)
        return channel_to_weight_mask(keep_channels(rows, keep_count(rows.numel(), config.sparsity)), scores.shape)
    if config.pattern == "unstructured":
        return keep_per_row(scores, config.sparsity)
    raise ValueError(f"Wanda selects 'unstructured', 'nm' or 'channel' masks, not {config.pattern!r}")


@torch.no_grad()
def wanda_masks(model: nn.Module, calibration: Iterable[Any], config: SparsityConfig,
                filter_fn: FilterFn | None = None, prune_output: bool = False) -> dict[str, torch.Tensor]:
    """Bool keep-masks ``{fqn: mask shaped like weight}`` from activation-aware scores (module docstring).

    ``calibration``: an iterable of model inputs (tensor, tuple of positional inputs, or dict of keyword
    inputs), a few dozen sequences or images usually suffice. Layers are those ``sparsify`` would choose
    (``sparsecore.layers.select``). ``config.scope`` must be ``"layer"`` (Wanda compares within rows).

    >>> masks = wanda_masks(model, [x[:16], x[16:32]], SparsityConfig("nm", n=2, m=4))
    """
    if not isinstance(config, SparsityConfig):
        raise TypeError(f"config must be a SparsityConfig, got {type(config).__name__}")
    if config.scope != "layer":
        raise ValueError(f"Wanda compares weights within each output row; scope must be 'layer', got {config.scope!r}")
    if config.pattern not in ("unstructured", "nm", "channel"):
        raise ValueError(f"Wanda selects 'unstructured', 'nm' or 'channel' masks, not {config.pattern!r}")
    mods = layers.select(model, config.pattern, config.m, filter_fn, prune_output)[0]
    if not mods:
        return {}
    norms = input_feature_norms(model, calibration, mods)
    masks = {}
    for fqn, mod in mods.items():
        scores = wanda_scores(layers.weight_matrix(mod), norms[fqn], getattr(mod, "groups", 1))
        masks[fqn] = layers.mask_from_matrix(mod, _select(scores, config))
    return masks
