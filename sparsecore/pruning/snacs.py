"""SNACS: single-shot channel pruning by adaptive connectivity (after Ganesh et al.).

One calibration pass, no retraining in the loop:

1. Record each chain layer's output on a class-balanced batch (conv outputs averaged over H x W): ``[N, C_l]``.
   The chain is the prunable layers in registration order (or ``layers=``); consecutive layers must be
   connected (conv -> conv, conv -> flatten -> linear with C_l blocks, linear -> linear). Outputs are taken
   before the nonlinearity.
2. Connectivity of parent filter p (layer l) and child filter c (layer l+1): the conditional MI
   ``I(A_{l+1}[c]; A_l[p] | A_l[others])`` from ``mi.py`` (our formulation ``I(X;[Y,Z]) - I(X;Z)``, clipped at 0),
   median over hash shifts, times ``phi(w)`` where w is the connection's mean |weight| min-max normalised
   over the layer pair (``phi`` = identity by default).
3. A filter's score is the mean of its scaled connectivities over the next layer's filters.
4. Upper limit UL_l: a nearest-class-mean probe on layer l's outputs (fit on one half of the batch, scored
   on the other) loses filters lowest-score first; UL_l is the largest fraction (grid step 5%) before the
   probe's accuracy drops below ``low + tolerance * (full - low)`` (tolerance 0.7 as in the official code).
5. Sensitivity: importance starts uniform over the classifier's outputs and flows backwards through the
   row-normalised connectivity matrices; the top ``protect`` fraction of each layer is never pruned.
6. Global cut: the lowest pooled scores go first, a layer stops at UL_l; if the requested budget cannot be
   met under the limits, they are relaxed (with a warning) but protections never are.

The classifier (the last chain layer) is never pruned; its input columns follow the previous layer.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..masks import channel_to_weight_mask, keep_count
from .base import FilterFn
from .magnitude import prunable_layers
from .mi import auto_buckets, combine_codes, hash_codes, mi_from_codes

__all__ = ["SnacsScores", "SnacsResult", "snacs_scores", "snacs_masks", "balanced_indices", "ncm_accuracy"]


@dataclass
class SnacsScores:
    """Everything SNACS measures once; ``snacs_masks`` cuts it at any sparsity."""

    chain: list[str]                               # layer fqns in order; the last one is the classifier
    filter_scores: dict[str, torch.Tensor]         # [C_l] pooled scaled connectivity (prunable layers)
    connectivity: dict[str, torch.Tensor]          # [C_{l+1}, C_l] scaled CMI (bits)
    importance: dict[str, torch.Tensor]            # [C_l] backward-propagated sensitivity (sums to 1)
    upper_limits: dict[str, float]                 # UL_l, fraction of filters
    probe_curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # (fraction, accuracy)


@dataclass
class SnacsResult:
    masks: dict[str, torch.Tensor]          # output-channel masks, weight-shaped
    input_masks: dict[str, torch.Tensor]    # coupled input-channel masks of each next layer, weight-shaped
    channels: dict[str, torch.Tensor]       # [C_l] bool kept output channels
    protected: dict[str, torch.Tensor]      # [C_l] bool never-pruned filters
    relaxed: bool                           # True when UL limits had to be exceeded to meet the budget


def balanced_indices(y: torch.Tensor, per_class: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices of up to ``per_class`` random samples of every class in ``y [N]`` (a calibration batch)."""
    out = []
    for cls in torch.unique(y):
        idx = (y == cls).nonzero().reshape(-1)
        out.append(idx[torch.randperm(idx.numel(), generator=generator)[:per_class]])
    return torch.cat(out).sort().values


def ncm_accuracy(feats: torch.Tensor, y: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    """Nearest-class-mean probe accuracy: fit on even samples, score on odd ones. ``feats [N, C]``."""
    x = feats if keep is None else feats[:, keep]
    if x.shape[1] == 0:
        return 0.0
    fit, ev = slice(0, None, 2), slice(1, None, 2)
    mu, sd = x[fit].mean(0), x[fit].std(0, correction=0).clamp(min=1e-8)
    x = (x - mu) / sd
    classes = torch.unique(y[fit])
    means = torch.stack([x[fit][y[fit] == c].mean(0) for c in classes])
    pred = classes[torch.cdist(x[ev], means).argmin(1)]
    return float((pred == y[ev]).double().mean())


@torch.no_grad()
def _record(model: nn.Module, chain: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    modules, acts, handles = dict(model.named_modules()), {}, []
    for fqn in chain:
        def hook(_mod, _inp, out, fqn=fqn):
            acts[fqn] = (out.mean(dim=(2, 3)) if out.dim() == 4 else out).detach().double().cpu()
        handles.append(modules[fqn].register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return acts


def _connection_weights(child: nn.Module, c_parent: int) -> torch.Tensor:
    """Mean |w| of each (child c, parent p) connection: ``[C_child, C_parent]``, min-max normalised."""
    w = child.weight.detach().abs().double().cpu()
    if w.dim() == 4:
        if w.shape[1] != c_parent:
            raise ValueError(f"conv expects {w.shape[1]} input channels, previous layer has {c_parent}")
        conn = w.mean(dim=(2, 3))
    elif w.shape[1] % c_parent == 0:
        # Linear after flatten of [C, H, W]: each parent channel feeds a contiguous block of in_features.
        conn = w.reshape(w.shape[0], c_parent, -1).mean(-1)
    else:
        raise ValueError(f"layer with in_features={w.shape[1]} does not follow a layer of {c_parent} channels")
    lo, hi = conn.min(), conn.max()
    return (conn - lo) / (hi - lo) if float(hi - lo) > 0 else torch.ones_like(conn)


def _standardise(z: torch.Tensor) -> torch.Tensor:
    """Standardise each row of ``[R, N]``; constant rows become 0."""
    sd = z.std(dim=1, correction=0, keepdim=True)
    return torch.where(sd > 0, (z - z.mean(dim=1, keepdim=True)) / sd.clamp(min=1e-300), torch.zeros_like(z))


def _connectivity(parent: torch.Tensor, child: torch.Tensor, shifts: int, buckets: int | None,
                  generator: torch.Generator | None) -> torch.Tensor:
    """CMI ``[C_child, C_parent]`` in bits, ``I(child_c; parent_p | parent_rest)``, clipped at 0."""
    n, c_par = parent.shape
    b = buckets or auto_buckets(n, 3)
    r = b + 2
    par = _standardise(parent.T)                                   # [C_par, N]
    w = torch.randn(c_par, generator=generator, dtype=torch.float64)
    z_all = (w[:, None] * par).sum(0)                              # projection of all parents [N]
    zy = par                                                       # each parent alone [C_par, N]
    zz = _standardise(z_all[None, :] - w[:, None] * par)           # the others, per parent [C_par, N]
    zx = _standardise(child.T)                                     # [C_child, N]
    joint, alone = [], []
    for s in torch.rand(shifts, generator=generator, dtype=torch.float64).tolist():
        cx, cy, cz = hash_codes(zx, b, s), hash_codes(zy, b, s), hash_codes(zz, b, s)
        j = torch.stack([mi_from_codes(cx, combine_codes(cy[p], cz[p], r)[None], r, r * r) for p in range(c_par)], 1)
        a = torch.stack([mi_from_codes(cx, cz[p][None], r, r) for p in range(c_par)], 1)
        joint.append(j)
        alone.append(a)
    return (torch.stack(joint).median(0).values - torch.stack(alone).median(0).values).clamp(min=0.0)


def _upper_limit(feats: torch.Tensor, y: torch.Tensor, scores: torch.Tensor, tolerance: float
                 ) -> tuple[float, list[tuple[float, float]]]:
    c = feats.shape[1]
    order = torch.sort(scores, stable=True).indices                # lowest score first
    curve = []
    for f in [i / 20 for i in range(20)] + [(c - 1) / c]:
        drop = min(c - 1, int(round(f * c)))
        keep = torch.ones(c, dtype=torch.bool)
        keep[order[:drop]] = False
        curve.append((drop / c, ncm_accuracy(feats, y, keep)))
    full, low = curve[0][1], min(a for _, a in curve)
    bar = low + tolerance * (full - low)
    limit = 0.0
    for frac, acc in curve:
        if acc < bar - 1e-12:
            break
        limit = frac
    return limit, curve


def snacs_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, layers: list[str] | None = None,
                 filter_fn: FilterFn | None = None, shifts: int = 3, buckets: int | None = None,
                 phi: Callable[[torch.Tensor], torch.Tensor] | None = None, tolerance: float = 0.7,
                 generator: torch.Generator | None = None) -> SnacsScores:
    """Measure SNACS scores from a calibration batch ``x`` with labels ``y [N]`` (class-balanced)."""
    chain = list(layers) if layers is not None else list(prunable_layers(model, filter_fn))
    if len(chain) < 2:
        raise ValueError(f"SNACS needs a chain of at least 2 layers (the last is the classifier), got {chain}")
    modules = dict(model.named_modules())
    acts = _record(model, chain, x)
    y = y.cpu()
    phi = phi or (lambda w: w)
    conn, scores, limits, curves = {}, {}, {}, {}
    for parent, child in zip(chain[:-1], chain[1:]):
        cmi = _connectivity(acts[parent], acts[child], shifts, buckets, generator)
        conn[parent] = cmi * phi(_connection_weights(modules[child], acts[parent].shape[1]))
        scores[parent] = conn[parent].mean(0).float()
        limits[parent], curves[parent] = _upper_limit(acts[parent], y, scores[parent], tolerance)
    importance, imp = {}, torch.full((acts[chain[-1]].shape[1],), 1.0 / acts[chain[-1]].shape[1], dtype=torch.float64)
    for parent in reversed(chain[:-1]):
        m = conn[parent]
        rows = m.sum(1, keepdim=True)
        m = torch.where(rows > 0, m / rows.clamp(min=1e-300), torch.full_like(m, 1.0 / m.shape[1]))
        imp = imp @ m
        importance[parent] = imp.float()
    return SnacsScores(chain, scores, conn, importance, limits, curves)


def snacs_masks(model: nn.Module, scores: SnacsScores, sparsity: float, *, protect: float = 0.1,
                respect_limits: bool = True) -> SnacsResult:
    """Cut ``scores`` at ``sparsity`` = the fraction of all output channels of the prunable chain layers.

    Exactly ``round(sparsity * total)`` channels are dropped when protections allow it.
    """
    modules = dict(model.named_modules())
    prunable = scores.chain[:-1]
    sizes = {f: scores.filter_scores[f].numel() for f in prunable}
    total = sum(sizes.values())
    target = total - keep_count(total, sparsity)
    protected = {}
    for f in prunable:
        n_prot = max(1, int(round(protect * sizes[f])))
        prot = torch.zeros(sizes[f], dtype=torch.bool)
        prot[torch.sort(scores.importance[f], descending=True, stable=True).indices[:n_prot]] = True
        protected[f] = prot
    cand = [(float(scores.filter_scores[f][i]), k, i, f) for k, f in enumerate(prunable)
            for i in range(sizes[f]) if not protected[f][i]]
    cand.sort(key=lambda t: (t[0], t[1], t[2]))
    keep = {f: torch.ones(sizes[f], dtype=torch.bool) for f in prunable}
    dropped = {f: 0 for f in prunable}
    caps = {f: int(scores.upper_limits[f] * sizes[f] + 1e-9) if respect_limits else sizes[f] for f in prunable}
    n_drop, relaxed = 0, False
    for attempt in ("limits", "relaxed"):
        for _, _, i, f in cand:
            if n_drop == target:
                break
            if keep[f][i] and dropped[f] < caps[f]:
                keep[f][i] = False
                dropped[f] += 1
                n_drop += 1
        if n_drop == target or attempt == "relaxed":
            break
        relaxed = True
        warnings.warn(f"SNACS: {sparsity:.0%} channel sparsity exceeds the probe upper limits "
                      f"{ {f: round(v, 2) for f, v in scores.upper_limits.items()} }; relaxing them")
        caps = dict(sizes)
    if n_drop < target:
        warnings.warn(f"SNACS: protections allow only {n_drop} of {target} channels to be dropped")
    masks, input_masks = {}, {}
    for f, nxt in zip(prunable, scores.chain[1:]):
        w = modules[f].weight
        masks[f] = channel_to_weight_mask(keep[f].to(w.device), w.shape)
        wn = modules[nxt].weight
        cols = keep[f].repeat_interleave(wn.shape[1] // sizes[f]) if wn.dim() == 2 else keep[f]
        view = (1, -1) + (1,) * (wn.dim() - 2)
        input_masks[nxt] = cols.to(wn.device).reshape(view).expand(wn.shape).clone()
    return SnacsResult(masks, input_masks, keep, protected, relaxed)
