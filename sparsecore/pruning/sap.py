"""Sparsity-informed Adaptive Pruning (SAP, Diao et al., ICLR 2023): PQ Index budget per prune round.

One round: measure the PQ Index I of the unpruned weights in each scope unit (global: all prunable weights;
layer: one tensor; neuron: one output row), turn it into a prune count ``c`` (``pqi.sap_keep_bound`` and
``pqi.sap_prune_count``) and drop the ``c`` smallest |w| of the unit. Between rounds the user retrains
(optionally after rewinding surviving weights to their initial values, lottery-ticket style, as the
official code does). Channel pattern: I of the vector of output-channel L2 norms (RMS norms when global,
so layers of different K compare; the strongest channel of each layer is never dropped). N:M pattern: the
layer's SAP keep fraction rounded to the nearest n of m (at least 1, never growing). ``target`` is our
addition, not the paper's: it caps every unit at that sparsity so a run can stop at a chosen level.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..masks import as_matrix, channel_to_weight_mask, from_matrix, keep_n_of_m, keep_topk
from .base import (FilterFn, Pruner, apply_masks, check_fraction, check_pattern, full_masks, masks_sparsity,
                   select_layers, weight_of)
from .pqi import pq_index, sap_keep_bound, sap_prune_count
from .rules import rule_for
from .scores import channel_norm, channel_rms

__all__ = ["sap_round", "SAP", "Rewinder"]

SCOPES = ("global", "layer", "neuron")


def _budget(d: torch.Tensor, index: torch.Tensor, n_total: torch.Tensor | int, hp: dict[str, float],
            target: float | None) -> torch.Tensor:
    r = sap_keep_bound(d, index, hp["p"], hp["q"], hp["eta"])
    c = sap_prune_count(d, r, hp["gamma"], hp["beta"])
    if target is not None:
        n_total = torch.as_tensor(n_total, dtype=torch.int64)
        floor_keep = n_total - torch.round(n_total.double() * target).to(torch.int64)
        c = torch.minimum(c, (d.to(torch.int64) - floor_keep).clamp(min=0))
    return c


def _keep_ranked_rows(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per row of ``scores [R, K]`` keep the ``keep[r]`` largest (ties: lower index first)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1]).expand_as(order).contiguous())
    return ranks < keep[:, None]


def sap_round(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], *, p: float = 0.5, q: float = 1.0,
              eta: float = 0.0, gamma: float = 1.0, beta: float = 0.9, scope: str = "layer",
              pattern: str = "unstructured", m: int = 4, target: float | None = None
              ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One SAP prune round: new masks (subsets of ``masks``) and info ``{"pqi": {unit: I}, "pruned": c}``.

    ``weights``/``masks``: ``{fqn: weight}`` and ``{fqn: bool weight-shaped}`` (same keys).
    """
    rule = rule_for(check_pattern(pattern)).name  # the selection rule the pattern's masks follow
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if set(weights) != set(masks):
        raise KeyError(f"weights and masks name different layers: {sorted(set(weights) ^ set(masks))}")
    if rule != "unstructured" and scope == "neuron":
        raise ValueError("neuron scope applies to unstructured pruning only")
    if rule == "nm" and scope != "layer":
        raise ValueError("N:M budgets are per layer; use scope='layer'")
    if target is not None:
        check_fraction("target", target)
    hp = dict(p=p, q=q, eta=eta, gamma=gamma, beta=beta)
    if rule == "channel":
        return _channel_round(weights, masks, hp, scope, target)
    new, info = {}, {"pqi": {}, "pruned": 0}
    if scope == "global":
        keys = list(weights)
        score = torch.cat([weights[f].detach().abs().float().reshape(-1).cpu() for f in keys])
        mask = torch.cat([masks[f].reshape(-1).cpu() for f in keys])
        index = pq_index(score, p, q, mask)
        d = mask.sum()
        c = _budget(d, index, mask.numel(), hp, target)
        keep = keep_topk(torch.where(mask, score, torch.full_like(score, -1.0)), int(d - c))
        offset = 0
        for f in keys:
            n = masks[f].numel()
            new[f] = keep[offset: offset + n].reshape(masks[f].shape).to(masks[f].device)
            offset += n
        info["pqi"]["global"], info["pruned"] = float(index), int(c)
        return new, info
    for f, w in weights.items():
        score = as_matrix(w.detach().abs().float())
        mask = as_matrix(masks[f])
        unpruned_score = torch.where(mask, score, torch.full_like(score, -1.0))
        if scope == "neuron":
            index = pq_index(score, p, q, mask, dim=1)
            d = mask.sum(dim=1)
            c = _budget(d, index, mask.shape[1], hp, target)
            keep = _keep_ranked_rows(unpruned_score, d - c)
            info["pqi"][f] = float(index.mean())
        else:
            index = pq_index(score, p, q, mask)
            d = mask.sum()
            c = _budget(d, index, mask.numel(), hp, target)
            if rule == "nm":
                n_now = int(mask.reshape(mask.shape[0], -1, m).sum(-1).max())
                n_new = min(n_now, max(1, int((float(d - c) / mask.numel()) * m + 0.5)))
                keep = as_matrix(keep_n_of_m(from_matrix(unpruned_score, w.shape), n_new, m))
                c = d - keep.sum()
            else:
                keep = keep_topk(unpruned_score, int(d - c))
            info["pqi"][f] = float(index)
        info["pruned"] += int(c.sum())
        new[f] = from_matrix(keep, w.shape)
    return new, info


def _channel_round(weights, masks, hp, scope, target):
    new, info = {}, {"pqi": {}, "pruned": 0}
    ch_masks = {f: as_matrix(masks[f]).any(dim=1) for f in weights}
    if scope == "global":
        keys = list(weights)
        per = [channel_rms(weights[f]).cpu() for f in keys]
        # The strongest channel of each layer gets +inf so no layer can vanish entirely.
        for s in per:
            s[int(torch.argmax(s))] = float("inf")
        score = torch.cat(per)
        mask = torch.cat([ch_masks[f].cpu() for f in keys])
        finite = torch.where(torch.isinf(score), torch.zeros_like(score), score)
        index = pq_index(torch.where(torch.isinf(score), finite.max(), score), hp["p"], hp["q"], mask)
        d = mask.sum()
        c = _budget(d, index, mask.numel(), hp, target)
        ranked = torch.where(mask, torch.where(torch.isinf(score), finite.max() + 1.0, score), torch.full_like(score, -1.0))
        keep = keep_topk(ranked, int(d - c))
        offset = 0
        for f, s in zip(keys, per):
            new[f] = channel_to_weight_mask(keep[offset: offset + s.numel()].to(masks[f].device), weights[f].shape)
            offset += s.numel()
        info["pqi"]["global"], info["pruned"] = float(index), int(c)
        return new, info
    for f, w in weights.items():
        norms = channel_norm(w)
        mask = ch_masks[f]
        index = pq_index(norms, hp["p"], hp["q"], mask)
        d = mask.sum()
        c = torch.minimum(_budget(d, index, mask.numel(), hp, target), (d - 1).clamp(min=0))
        keep = keep_topk(torch.where(mask, norms, torch.full_like(norms, -1.0)), int(d - c))
        new[f] = channel_to_weight_mask(keep, w.shape)
        info["pqi"][f], info["pruned"] = float(index), info["pruned"] + int(c)
    return new, info


class Rewinder:
    """Remembers a model's initial state and rewinds survivors to it (lottery-ticket style)."""

    def __init__(self, model: nn.Module) -> None:
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def rewind(self, model: nn.Module, masks: dict[str, torch.Tensor], *, zero_bias: bool = False) -> None:
        """Load the stored initial state, then zero what ``masks`` prunes."""
        model.load_state_dict(self.state)
        apply_masks(model, masks, zero_bias=zero_bias)


class SAP(Pruner):
    """SAP as a stateful pruner: ``prune_round()`` between retraining phases; masks enforced in between.

    Defaults follow the official code: p=0.5, q=1, eta=0, gamma=1, beta=0.9, layer scope.
    ``history`` holds one dict per round: round, pqi (model-level I over all unpruned prunable weights,
    or over channel RMS norms for "channel", before pruning), pqi_units (per scope unit), sparsity (after).

    >>> sap = SAP(model, rewind=True)
    >>> for _ in range(30): sap.prune_round(); train(model, loader, epochs=2, pruner=sap)
    """

    def __init__(self, model: nn.Module, *, p: float = 0.5, q: float = 1.0, eta: float = 0.0, gamma: float = 1.0,
                 beta: float = 0.9, scope: str = "layer", pattern: str = "unstructured", m: int = 4,
                 target: float | None = None, rewind: bool = False, filter_fn: FilterFn | None = None) -> None:
        super().__init__(model)
        self.hp = dict(p=p, q=q, eta=eta, gamma=gamma, beta=beta, scope=scope, pattern=pattern, m=m, target=target)
        self.pattern = pattern
        self.rule = rule_for(check_pattern(pattern)).name
        self.layers = select_layers(model, pattern, m, filter_fn)
        self.masks = full_masks(self.layers)
        self.zero_bias = self.rule == "channel"
        self.rewinder = Rewinder(model) if rewind else None
        self.history: list[dict[str, Any]] = []

    def model_pqi(self) -> float:
        """Model-level PQ Index of the unpruned weights (channel: of the unpruned channels' RMS norms)."""
        p, q = self.hp["p"], self.hp["q"]
        if self.rule == "channel":
            v = torch.cat([channel_rms(weight_of(mod)).cpu() for mod in self.layers.values()])
            m = torch.cat([as_matrix(self.masks[f]).any(dim=1).cpu() for f in self.layers])
        else:
            v = torch.cat([weight_of(mod).detach().reshape(-1).cpu() for mod in self.layers.values()])
            m = torch.cat([self.masks[f].reshape(-1).cpu() for f in self.layers])
        return float(pq_index(v, p, q, m))

    def prune_round(self) -> dict[str, torch.Tensor]:
        """Prune once from the current weights and masks; zero (or rewind) the model; return the new masks."""
        weights = {f: weight_of(mod) for f, mod in self.layers.items()}
        pqi = self.model_pqi()
        self.masks, info = sap_round(weights, self.masks, **self.hp)
        if self.rewinder is not None:
            self.rewinder.rewind(self.model, self.masks, zero_bias=self.zero_bias)
        else:
            self.apply()
        self.history.append({"round": len(self.history), "pqi": pqi, "pqi_units": info["pqi"],
                             "pruned": info["pruned"], "sparsity": masks_sparsity(self.masks)})
        return self.masks

    def sparsity(self) -> float:
        return masks_sparsity(self.masks)
