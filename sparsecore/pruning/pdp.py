"""PDP: Parameter-free Differentiable Pruning (Cho et al., NeurIPS 2023).

Each forward pass, per layer and under no-grad, the threshold ``t`` is the midpoint between the k-th and the
(k+1)-th largest score (|w|; the L2 norm of each output channel for "channel"; per group of m along K with
k = n for "nm"). The layer then computes with ``m(w) * w`` where ``m(w) = sigmoid((s^2 - t^2) / tau)``, in fp32,
so gradients flow through both the mask and the weight. Targets ramp linearly after a dense warm-up:
``r(e) = min(1, eps * (e - s + 1)) * r_final`` for epoch e >= s (0 before). ``finalize()`` applies the hard
mask (the k largest scores, which is ``|w| >= t`` whenever the k-th and (k+1)-th scores differ) and removes
the parametrization, leaving a plain Linear/Conv2d with zeros.

tau (our scale-aware default): ``tau = tau_rel * t^2`` recomputed with t, so the mask depends on ``w^2/t^2``
only and is invariant to the layer's weight scale. With ``tau_rel = 0.1`` a weight 10% above the threshold
gets m = 0.89 and one 10% below gets m = 0.13. Passing an absolute ``tau`` (the third-party code uses 1e-4
or 1e-5 for weights of scale ~0.01) overrides it. For N:M the ramp moves the per-group keep count from m
down to n in whole steps.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..masks import as_matrix, from_matrix, keep_count
from .base import FilterFn, Pruner, apply_masks, check_fraction, check_pattern, select_layers
from .magnitude import magnitude_layer_mask
from .rules import rule_for
from .scores import channel_norm, magnitude

__all__ = ["pdp_threshold", "pdp_soft_mask", "pdp_target", "PDP"]


def pdp_threshold(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Midpoint of the k-th and (k+1)-th largest of ``scores`` (any shape, flattened); 0-d fp32 tensor.

    ``k`` must lie in [1, numel - 1].
    """
    flat = scores.detach().reshape(-1).float()
    n = flat.numel()
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must lie in [1, {n - 1}] for a midpoint threshold, got {k}")
    top = torch.topk(flat, k + 1, sorted=True).values
    return (top[k - 1] + top[k]) / 2


def _nm_threshold(scores: torch.Tensor, k: int, m: int) -> torch.Tensor:
    """Per group of m along K: midpoint of the k-th and (k+1)-th largest; returned weight-shaped."""
    mat = as_matrix(scores.detach().float())
    groups = mat.reshape(mat.shape[0], -1, m)
    top = torch.sort(groups, dim=-1, descending=True).values
    t = ((top[..., k - 1] + top[..., k]) / 2)[..., None].expand_as(groups)
    return from_matrix(t.reshape(mat.shape), scores.shape)


def pdp_soft_mask(score: torch.Tensor, t: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """``sigmoid((score^2 - t^2) / tau)`` in fp32 (the sigmoid form: the softmax form overflows)."""
    s = score.float()
    return torch.sigmoid((s * s - t.float() * t.float()) / tau)


def pdp_target(epoch: int, final: float, warmup: int = 0, eps: float = 0.015) -> float:
    """Linear ramp: 0 before ``warmup``, then ``min(1, eps * (epoch - warmup + 1)) * final``."""
    if epoch < warmup:
        return 0.0
    return min(1.0, eps * (epoch - warmup + 1)) * final


class _SoftMask(nn.Module):
    """The parametrization: weight -> m(weight) * weight, with m recomputed from the weight each call."""

    def __init__(self, owner: "PDP", fqn: str) -> None:
        super().__init__()
        self.fqn = fqn
        self._owner = [owner]  # a list, so nn.Module does not register the owner as a submodule

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        owner = self._owner[0]
        score, t = owner.threshold(self.fqn, w)
        if t is None:
            return w
        tau = owner.tau if owner.tau is not None else owner.tau_rel * t.detach() ** 2 + 1e-30
        if owner.rule == "channel":
            m = pdp_soft_mask(score, t, tau)
            view = (-1,) + (1,) * (w.dim() - 1)
            return (m.reshape(view) * w.float()).to(w.dtype)
        return (pdp_soft_mask(w, t, tau) * w.float()).to(w.dtype)


class PDP(Pruner):
    """Parameter-free differentiable pruning through a ``torch.nn.utils.parametrize`` soft mask.

    Args:
        model: any module with Linear/Conv2d layers (parametrizations are registered on its layers).
        sparsity: final target r_final (unstructured: fraction of weights; channel: fraction of output
            channels); ignored for "nm" (``nm=(n, m)`` fixes it).
        warmup, eps: the schedule of ``pdp_target``; call ``set_epoch`` (``training.train`` does it).
        tau: absolute temperature, or None for the scale-aware ``tau_rel * t^2``.

    >>> pdp = PDP(model, 0.9, warmup=1, eps=0.25)
    >>> train(model, loader, epochs=6, pruner=pdp); masks = pdp.finalize()
    """

    zero_after_step = False

    def __init__(self, model: nn.Module, sparsity: float = 0.5, *, pattern: str = "unstructured",
                 nm: tuple[int, int] = (2, 4), warmup: int = 0, eps: float = 0.015, tau: float | None = None,
                 tau_rel: float = 0.1, filter_fn: FilterFn | None = None) -> None:
        super().__init__(model)
        self.pattern = check_pattern(pattern)
        self.rule = rule_for(pattern).name  # the selection rule the pattern's masks follow
        self.r_final = check_fraction("sparsity", sparsity, upper_open=True)
        if tau is not None and tau <= 0 or tau_rel <= 0 or eps <= 0:
            raise ValueError(f"tau, tau_rel and eps must be > 0, got tau={tau}, tau_rel={tau_rel}, eps={eps}")
        self.nm, self.warmup, self.eps, self.tau, self.tau_rel = (int(nm[0]), int(nm[1])), warmup, eps, tau, tau_rel
        self.zero_bias = self.rule == "channel"
        self.layers = select_layers(model, pattern, self.nm[1], filter_fn)
        self.epoch = 0
        for fqn, mod in self.layers.items():
            parametrize.register_parametrization(mod, "weight", _SoftMask(self, fqn))
        self._attached = True

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def on_epoch_end(self, epoch: int) -> None:
        self.set_epoch(epoch + 1)

    def progress(self) -> float:
        """Fraction of the ramp done at the current epoch (0 during warm-up, 1 at the end)."""
        return pdp_target(self.epoch, 1.0, self.warmup, self.eps)

    def _keep(self, fqn: str, w: torch.Tensor, frac: float) -> int:
        if self.rule == "nm":
            n, m = self.nm
            return m - int(round(frac * (m - n)))   # per-group keep count, from m down to n
        total = w.shape[0] if self.rule == "channel" else w.numel()
        return keep_count(total, frac * self.r_final)

    @torch.no_grad()
    def threshold(self, fqn: str, w: torch.Tensor, frac: float | None = None
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(score, t) of layer ``fqn`` at ramp fraction ``frac`` (default: now); t None when nothing is pruned.

        ``score`` is returned with autograd intact for channel norms (computed outside no-grad).
        """
        frac = self.progress() if frac is None else frac
        keep = self._keep(fqn, w, frac)
        if self.rule == "nm":
            m = self.nm[1]
            return (None, None) if keep >= m else (None, _nm_threshold(magnitude(w), keep, m))
        if self.rule == "channel":
            if keep >= w.shape[0]:
                return None, None
            t = pdp_threshold(channel_norm(w), keep)
            with torch.enable_grad():
                score = torch.linalg.vector_norm(as_matrix(w).float(), dim=1)
            return score, t
        if keep >= w.numel():
            return None, None
        return None, pdp_threshold(magnitude(w), keep)

    @torch.no_grad()
    def hard_masks(self) -> dict[str, torch.Tensor]:
        """The hard masks at the final target: exactly ``round(r_final * n)`` zeros (n:m for N:M)."""
        masks = {}
        for fqn, mod in self.layers.items():
            w = mod.parametrizations.weight.original if self._attached else mod.weight
            masks[fqn] = magnitude_layer_mask(w, self.pattern, self.r_final, *self.nm)
        return masks

    def finalize(self) -> dict[str, torch.Tensor]:
        """Hard-mask the raw weights, remove the parametrizations, return the masks (idempotent)."""
        self.masks = self.hard_masks()
        if self._attached:
            for mod in self.layers.values():
                parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
            self._attached = False
        self.zero_after_step = True  # from now on PDP behaves as a plain hard-masked model
        apply_masks(self.model, self.masks, zero_bias=self.zero_bias)
        return self.masks
