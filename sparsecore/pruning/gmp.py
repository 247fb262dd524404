"""Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune").

Schedule: ``s(t) = s_f + (s_i - s_f) * (1 - p)^3`` with ``p = clamp((t - t0) / (n * dt), 0, 1)``. Masks are
recomputed only at the grid steps ``t0, t0 + dt, ..., t0 + n*dt`` and frozen afterwards; every layer keeps its
own largest |w| (layer-wise budget: exactly ``round(n_l * s)`` zeros, i.e. ``n_l - round(n_l * s)`` kept, see
``masks.keep_count``; this equals the paper's ``round(n_l * (1 - s))`` kept except at exact .5 ties, where
the zero count is the one we pin), with per-layer final targets where ``per_layer`` gives them. N:M is chosen once (at ``t0``) and held; channel pruning applies the same
cubic schedule to the count of output channels ranked by their L2 norm.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import FilterFn, Pruner, check_fraction, check_pattern, full_masks, select_layers, weight_of
from .magnitude import magnitude_layer_mask
from .rules import rule_for

__all__ = ["gmp_sparsity", "GMP"]


def gmp_sparsity(t: float, s_f: float, t0: int, n: int, dt: int, s_i: float = 0.0, power: int = 3) -> float:
    """Target sparsity at step ``t`` of the cubic schedule.

    >>> gmp_sparsity(0, 0.9, t0=0, n=10, dt=100)
    0.0
    >>> gmp_sparsity(1000, 0.9, t0=0, n=10, dt=100)
    0.9
    """
    if n < 1 or dt < 1:
        raise ValueError(f"GMP needs n >= 1 and dt >= 1, got n={n}, dt={dt}")
    p = min(max((t - t0) / (n * dt), 0.0), 1.0)
    if p == 0.0 or p == 1.0:  # the end points exactly, free of rounding in the formula
        return float(s_i) if p == 0.0 else float(s_f)
    return s_f + (s_i - s_f) * (1.0 - p) ** power


class GMP(Pruner):
    """Gradual magnitude pruner; call ``step()`` once per optimiser step (``training.attach`` does it).

    Args:
        model: any module with Linear/Conv2d layers.
        sparsity: final sparsity ``s_f`` (pruned fraction of weights, or of output channels for "channel").
        t0, n, dt: the window starts at step ``t0`` and has ``n`` updates ``dt`` steps apart.
        s_i: initial sparsity (usually 0). power: schedule exponent (3 in the paper).
        pattern: "unstructured", "nm" (``nm=(n, m)``, chosen once at ``t0``) or "channel".
        per_layer: optional ``{fqn: final sparsity}`` overriding ``sparsity`` for those layers.
        filter_fn: ``filter_fn(module, fqn) -> bool`` selects the layers to prune.

    >>> pruner = GMP(model, 0.9, t0=0, n=10, dt=100)
    >>> for t in range(2000): ...; optimizer.step(); pruner.step(); pruner.apply()
    """

    def __init__(self, model: nn.Module, sparsity: float, *, t0: int = 0, n: int = 10, dt: int = 100,
                 s_i: float = 0.0, power: int = 3, pattern: str = "unstructured", nm: tuple[int, int] = (2, 4),
                 per_layer: dict[str, float] | None = None, filter_fn: FilterFn | None = None) -> None:
        super().__init__(model)
        self.pattern = check_pattern(pattern)
        self.rule = rule_for(pattern).name  # the selection rule the pattern's masks follow
        self.s_f = check_fraction("sparsity", sparsity)
        self.s_i = check_fraction("s_i", s_i)
        if n < 1 or dt < 1 or t0 < 0:
            raise ValueError(f"GMP needs t0 >= 0, n >= 1, dt >= 1; got t0={t0}, n={n}, dt={dt}")
        self.t0, self.n, self.dt, self.power = int(t0), int(n), int(dt), int(power)
        self.nm = (int(nm[0]), int(nm[1]))
        self.layers = select_layers(model, pattern, self.nm[1], filter_fn)
        self.per_layer = {f: check_fraction(f"per_layer[{f!r}]", s) for f, s in (per_layer or {}).items()}
        unknown = set(self.per_layer) - set(self.layers)
        if unknown:
            raise KeyError(f"per_layer names layers that are not pruned: {sorted(unknown)}")
        self.zero_bias = self.rule == "channel"
        self.masks = full_masks(self.layers)
        self.t = 0                       # the step the next ``step()`` call stands for
        self._last_index: int | None = None  # grid index of the last update (None: none yet)

    def sparsity_at(self, t: float, fqn: str | None = None) -> float:
        """Scheduled sparsity of layer ``fqn`` (or the default target) at step ``t``."""
        s_f = self.per_layer.get(fqn, self.s_f) if fqn is not None else self.s_f
        return gmp_sparsity(t, s_f, self.t0, self.n, self.dt, self.s_i, self.power)

    @property
    def frozen(self) -> bool:
        """True once the last update of the window has happened."""
        return self._last_index == self.n or (self.rule == "nm" and self._last_index is not None)

    @torch.no_grad()
    def step(self, t: int | None = None) -> bool:
        """Advance to step ``t`` (default: the internal counter) and update masks on grid steps.

        Returns True when the masks were recomputed. Steps skipped by the caller are caught up: an update
        happens whenever ``t`` falls in a grid interval not yet seen, at the sparsity of that grid point.
        """
        t = self.t if t is None else int(t)
        self.t = t + 1
        if t < self.t0 or self.frozen:
            return False
        index = min(self.n, (t - self.t0) // self.dt)
        if index == self._last_index:
            return False
        self._last_index = index
        t_grid = self.t0 + index * self.dt
        self.masks = {f: self._layer_mask(f, mod, self.sparsity_at(t_grid, f)) for f, mod in self.layers.items()}
        return True

    def _layer_mask(self, fqn: str, mod: nn.Module, s: float) -> torch.Tensor:
        # Already-pruned weights are zero, so (unstructured) they stay pruned while the target only grows.
        return magnitude_layer_mask(weight_of(mod), self.pattern, s, *self.nm)

    def after_step(self) -> None:
        self.step()
