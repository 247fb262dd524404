"""PSAP, Protective Self-Adaptive Pruning: OUR INTERPRETATION of Li & Zhao (2023).

The paper publishes no code and no formulas; this module implements the reading in ALGORITHMS.md:

* Iterative prune-train at filter (output-channel) level with soft pruning: a prune step zeroes the chosen
  filters, but they stay trainable and may grow back before the next step (``zero_after_step`` is False).
* Self-adaptive ratio: before each step, each layer's weight sparsity ratio ``rho_l`` is measured as the
  fraction of its filters whose L2 norm is below ``delta`` times the layer's largest filter norm. A layer
  gets pruning weight ``1 + rho_l`` (sparser layers take a larger share); ratios ``target * (1 + rho_l)``
  are rescaled so that the total count of pruned filters equals ``round(target * total)`` exactly (largest
  remainder rounding, at least one filter kept per layer).
* Protective reconstruction: gradient norms of every filter are accumulated between prune steps
  (``before_step``). A currently zeroed filter whose gradient norm exceeds the median gradient norm of the
  kept filters of its layer is restored: it is not pruned this step; the layer's next-lowest filter that is
  not protected takes its place, so the budget holds while a layer has enough unprotected filters (when it
  has not, fewer filters are pruned this step: protection wins over the budget).
* ``finalize()`` turns the last step's choice into hard channel masks (pruned filters and their biases
  zeroed; from then on they are re-zeroed after every optimiser step).
"""
from __future__ import annotations

import torch
from torch import nn

from ..masks import as_matrix, channel_to_weight_mask, keep_count
from .base import FilterFn, Pruner, apply_masks, check_fraction, full_masks, select_layers, weight_of
from .scores import channel_norm

__all__ = ["PSAP", "psap_layer_counts", "weight_sparsity_ratio"]


def weight_sparsity_ratio(weight: torch.Tensor, delta: float = 0.05) -> float:
    """Fraction of output channels whose L2 norm is below ``delta`` times the largest one."""
    norms = channel_norm(weight)
    top = float(norms.max())
    return 0.0 if top == 0.0 else float((norms < delta * top).double().mean())


def psap_layer_counts(sizes: list[int], rho: list[float], target: float) -> list[int]:
    """Filters to prune per layer: weights ``1 + rho``, total exactly ``round(target * sum(sizes))``.

    Each layer keeps at least one filter. Ratios are rescaled (and capped) until they sum to the budget;
    integer counts use largest-remainder rounding, ties to the earlier layer.
    """
    check_fraction("target", target)
    total = sum(sizes)
    budget = min(total - keep_count(total, target), total - len(sizes))
    caps = [s - 1 for s in sizes]
    weights = [1.0 + r for r in rho]
    share = [0.0] * len(sizes)
    free, left = set(range(len(sizes))), float(budget)
    while free and left > 1e-9:
        # Water-fill: distribute what is left over uncapped layers in proportion to weight * size.
        denom = sum(weights[i] * sizes[i] for i in free)
        add = {i: left * weights[i] * sizes[i] / denom for i in free}
        over = [i for i in free if share[i] + add[i] >= caps[i]]
        if not over:
            for i in free:
                share[i] += add[i]
            break
        for i in over:
            left -= caps[i] - share[i]
            share[i] = float(caps[i])
            free.discard(i)
    counts = [int(s) for s in share]
    rem = budget - sum(counts)
    for i in sorted(range(len(sizes)), key=lambda i: (-(share[i] - counts[i]), i)):
        if rem <= 0:
            break
        if counts[i] < caps[i]:
            counts[i] += 1
            rem -= 1
    return counts


class PSAP(Pruner):
    """Protective self-adaptive soft filter pruning (interpretation, see the module docstring).

    Call ``prune_step(target)`` between training phases (``on_epoch_end`` does it on the schedule
    ``targets[epoch]`` when given) and ``finalize()`` at the end.

    >>> psap = PSAP(model, targets=[0.2, 0.35, 0.5])
    >>> train(model, loader, epochs=3, pruner=psap); masks = psap.finalize()
    """

    zero_after_step = False
    zero_bias = True

    def __init__(self, model: nn.Module, *, targets: list[float] | None = None, delta: float = 0.05,
                 filter_fn: FilterFn | None = None) -> None:
        super().__init__(model)
        self.layers = select_layers(model, "channel", filter_fn=filter_fn)
        self.delta, self.targets = delta, list(targets or [])
        self.masks = full_masks(self.layers)
        self.grad_sq = {f: torch.zeros(weight_of(m).shape[0], dtype=torch.float64) for f, m in self.layers.items()}
        self.restored: dict[str, list[int]] = {}
        self.history: list[dict] = []

    def channels(self) -> dict[str, torch.Tensor]:
        """``{fqn: [C_out] bool}`` kept filters of the last step."""
        return {f: as_matrix(m).any(dim=1) for f, m in self.masks.items()}

    @torch.no_grad()
    def before_step(self) -> None:
        for f, mod in self.layers.items():
            g = weight_of(mod).grad
            if g is not None:
                self.grad_sq[f] += as_matrix(g).double().pow(2).sum(1).cpu()

    def on_epoch_end(self, epoch: int) -> None:
        if epoch < len(self.targets):
            self.prune_step(self.targets[epoch])

    @torch.no_grad()
    def prune_step(self, target: float) -> dict[str, torch.Tensor]:
        """Soft-prune to a global filter ``target`` fraction; returns the new (weight-shaped) masks."""
        names = list(self.layers)
        weights = [weight_of(self.layers[f]) for f in names]
        rho = [weight_sparsity_ratio(w, self.delta) for w in weights]
        counts = psap_layer_counts([w.shape[0] for w in weights], rho, target)
        old = self.channels()
        self.restored = {}
        for f, w, count in zip(names, weights, counts):
            norms = channel_norm(w).cpu()
            grad = self.grad_sq[f].sqrt()
            kept_grad = grad[old[f].cpu()]
            bar = float(kept_grad.median()) if kept_grad.numel() else float("inf")
            protect = (~old[f].cpu()) & (grad > bar)   # zeroed last step, yet the loss wants it back
            order = [int(i) for i in torch.sort(norms, stable=True).indices if not protect[i]]
            keep = torch.ones_like(old[f].cpu())
            keep[order[:count]] = False
            self.restored[f] = [int(i) for i in protect.nonzero().reshape(-1)]
            self.masks[f] = channel_to_weight_mask(keep.to(w.device), w.shape)
            self.grad_sq[f].zero_()
        apply_masks(self.model, self.masks, zero_bias=True)
        self.history.append({"target": target, "rho": dict(zip(names, rho)), "counts": dict(zip(names, counts)),
                             "restored": {f: len(v) for f, v in self.restored.items()}})
        return self.masks

    def finalize(self) -> dict[str, torch.Tensor]:
        """Freeze the last step's masks as hard masks (no more prune steps; re-zeroed after every step)."""
        self.targets = []
        self.zero_after_step = True
        self.apply()
        return self.masks
