"""Physical channel removal ("slimming") driven by per-layer output-channel masks.

Masks are ``{fqn: bool [out]}`` for Conv2d / Linear / depthwise layers (True = keep), from any
pruning method; layers not named keep everything.

**The masked reference** (``masked_reference``), which defines what a slimmed model must compute:
a channel is *dead* when it is exactly zero. A masked layer's pruned output channels are dead; dead
channels stay dead through ReLU-like ops, pools, flatten and concat; an add is dead where both sides
are; a BatchNorm or depthwise conv fed a dead channel outputs a dead channel. The reference is the
same model with the parameters of every dead output channel zeroed (conv/linear weight rows and
bias, BN gamma, beta and running mean, which makes BN of 0 exactly 0 in eval and train mode) and
every weight column that reads a dead channel zeroed (it multiplies zeros anyway).

**Slimming** removes a unit (a set of coupled channels, see ``trace.py``) when every one of its
channels is dead and it is not pinned (model output, untraceable op): weight rows, BN parameters and
stats, biases, and the consuming layers' input columns all shrink. A residual add or concat whose
sides disagree keeps its channels: the layer keeps its width with zeroed channels, listed in
``SlimPlan.residual`` with the reason; ``SlimPlan.residual_masks`` gives its mask in the slimmed
model, ready for ``channel_weight_masks`` and the channel-sliced kernel.

**round_to=r** rounds each group's kept unit count up to a multiple of r (capped at the group's size),
so that tensor-core tiles stay full. The extra units are the highest-scoring removable ones (score:
per-unit sum of the members' output-row L2 norms, or the ``scores`` given); they are *un-pruned*
(all their members' masks become True and their weights come back), so ``plan.masks`` — not the
masks passed in — is what the slimmed model matches. Groups that cover several widths (concat
feeding an add) are rounded on their unit count.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..masks import as_matrix, keep_topk
from .heads import update_head_counts
from .trace import ChannelGraph, trace_channels

__all__ = ["record_skipped", "slim_skipped", "slimmed_shapes", "slim_residual", "SlimPlan", "plan_slim", "apply_plan", "slim", "masked_reference", "masked_model", "verify_slim",
           "channel_weight_masks", "dead_channels", "skip_reasons"]

_MEMBER_KINDS = ("conv", "linear", "dw", "grouped")


def _check_masks(graph: ChannelGraph, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for fqn, m in masks.items():
        info = graph.layers.get(fqn)
        if info is None or info.kind not in _MEMBER_KINDS:
            raise ValueError(f"mask for {fqn!r}: not a traced Conv2d/Linear layer of the model "
                             f"(known: {sorted(f for f, i in graph.layers.items() if i.kind in _MEMBER_KINDS)[:8]} ...)")
        n = info.out_atoms.numel()
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or tuple(m.shape) != (n,):
            got = f"{m.dtype} {tuple(m.shape)}" if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"mask for {fqn!r} must be a bool tensor of shape ({n},), got {got}")
        out[fqn] = m.detach().cpu().clone()
    return out


def _dead_export(graph: ChannelGraph, masks: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    # Linear layers only: pruned rows are dead; a column is dead when every row of the unit it reads is pruned.
    dead_out = {f: (~masks[f] if f in masks else torch.zeros(i.out_atoms.numel(), dtype=torch.bool))
                for f, i in graph.layers.items()}
    alive = torch.zeros(graph.unit.numel(), dtype=torch.bool)
    alive[0] = True                                   # the pinned atom is never dead
    for f, info in graph.layers.items():
        alive[graph.unit[info.out_atoms[~dead_out[f]]]] = True
    roots = torch.zeros_like(alive)
    roots[graph.unit] = True
    dead_unit = roots & ~alive
    return dead_out, {f: dead_unit[graph.unit[i.in_atoms]] for f, i in graph.layers.items()}


def dead_channels(graph: ChannelGraph, masks: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(dead_out, dead_in)``: per layer, which output channels / input columns are exactly zero.

    fx graphs follow exact zeros through the program (module docstring). Export graphs (Linear layers, any
    rank): pruned rows are dead, and a consumer's column is dead when every row of the unit it reads is pruned.
    """
    if graph.tracer == "export":
        return _dead_export(graph, masks)
    dead_out: dict[str, torch.Tensor] = {}
    dead_in: dict[str, torch.Tensor] = {}

    def pruned(s, n):
        return ~masks[s.fqn] if s.fqn in masks else torch.zeros(n, dtype=torch.bool)

    def producer(s, d_in):
        dead_in[s.fqn] = d_in
        dead_out[s.fqn] = pruned(s, s.size)
        return dead_out[s.fqn]

    def dw(s, d_in):
        dead_out[s.fqn] = d_in | pruned(s, s.size)
        return dead_out[s.fqn]

    def bn(s, d_in):
        dead_out[s.fqn] = d_in
        return d_in

    graph.interpret({
        "producer": producer, "grouped": producer, "dw": dw, "bn": bn, "pass": lambda s, d: d,
        "add": lambda s, a, b: a & b, "cat": lambda s, *parts: torch.cat(parts),
        "flatten": lambda s, d: d.repeat_interleave(s.repeat),
        "opaque": lambda s: torch.zeros(s.size, dtype=torch.bool), "sink": lambda s, *a: None,
    })
    # A grouped conv's input columns are per group, not per channel: never zero them.
    for fqn, info in graph.layers.items():
        if info.kind == "grouped":
            dead_in.pop(fqn, None)
    return dead_out, dead_in


@dataclass
class SlimPlan:
    """What ``apply_plan`` does to a model, and why some pruned channels stay.

    ``masks``: effective masks (after rounding). ``dead_out``/``dead_in``: zero channels of the masked
    reference. ``keep_out``/``keep_in``: physically kept output channels / input columns of the layers
    that shrink. ``residual``: layers whose dead channels stay (fqn -> reason). ``skipped``: Linear/Conv2d
    layers whose output channels can never shrink, with the reason (fqn -> reason), for reports.
    """

    masks: dict[str, torch.Tensor]
    dead_out: dict[str, torch.Tensor]
    dead_in: dict[str, torch.Tensor]
    keep_out: dict[str, torch.Tensor]
    keep_in: dict[str, torch.Tensor]
    residual: dict[str, str]
    params_before: int
    params_after: int
    skipped: dict[str, str] = field(default_factory=dict)
    tracer: str = "fx"

    @property
    def residual_masks(self) -> dict[str, torch.Tensor]:
        """Output-channel masks of the residual layers in the *slimmed* model's coordinates."""
        out = {}
        for fqn in self.residual:
            dead = self.dead_out[fqn]
            keep = self.keep_out.get(fqn, torch.ones_like(dead))
            out[fqn] = ~dead[keep]
        return out

    def summary(self) -> str:
        lines = [f"params {self.params_before} -> {self.params_after} "
                 f"({100.0 * (1 - self.params_after / max(self.params_before, 1)):.1f}% removed); "
                 f"{len(self.keep_out)} layers narrowed, {len(self.residual)} keep zeroed channels"]
        lines += [f"  {fqn}: {why}" for fqn, why in self.residual.items()]
        return "\n".join(lines)


def _removed_units(graph: ChannelGraph, dead_out: dict[str, torch.Tensor]) -> torch.Tensor:
    alive = torch.zeros(graph.unit.numel(), dtype=torch.bool)
    for fqn, info in graph.layers.items():
        if info.kind in _MEMBER_KINDS:
            alive[graph.unit[info.out_atoms][~dead_out[fqn]]] = True
    roots = torch.zeros_like(alive)
    roots[graph.unit] = True
    return roots & ~alive & ~graph.pinned_unit


def _default_scores(model: nn.Module, graph: ChannelGraph) -> dict[str, torch.Tensor]:
    return {f: as_matrix(model.get_submodule(f).weight.detach()).double().norm(dim=1).cpu()
            for f, i in graph.layers.items() if i.kind in _MEMBER_KINDS}


def _round(graph: ChannelGraph, masks: dict[str, torch.Tensor], removed: torch.Tensor, round_to: int,
           scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    masks = {f: m.clone() for f, m in masks.items()}
    for g in graph.groups:
        rem = removed[g.units]
        kept = g.n_units - int(rem.sum())
        need = min(g.n_units, math.ceil(kept / round_to) * round_to) - kept
        if need <= 0:
            continue
        unit_scores = g.scores(scores)
        cand = rem.nonzero().flatten()               # only removed units can come back
        restore = torch.zeros(g.n_units, dtype=torch.bool)
        restore[cand[keep_topk(unit_scores[cand], need)]] = True
        for f in g.fqns:
            m = masks.setdefault(f, torch.ones(g.unit_of[f].numel(), dtype=torch.bool))
            m |= restore[g.unit_of[f]]
    return masks


def _param_count(model: nn.Module, keep_out: dict[str, torch.Tensor], keep_in: dict[str, torch.Tensor]) -> int:
    total = 0
    for name, mod in model.named_modules():
        own = list(mod.named_parameters(recurse=False))
        if name not in keep_out and name not in keep_in:
            total += sum(p.numel() for _, p in own)
            continue
        for pname, p in own:
            shape = list(p.shape)
            if name in keep_out:
                shape[0] = int(keep_out[name].sum())
            if pname == "weight" and p.dim() >= 2 and name in keep_in:
                shape[1] = int(keep_in[name].sum())
            total += math.prod(shape)
    return total


def _residual_reasons(graph: ChannelGraph, plan_dead: dict[str, torch.Tensor], removed: torch.Tensor) -> dict[str, str]:
    reasons = {}
    for g in graph.groups:
        for f in g.fqns:
            units = graph.unit[graph.layers[f].out_atoms]
            stuck = plan_dead[f] & ~removed[units]
            if not bool(stuck.any()):
                continue
            stuck_units = set(units[stuck].tolist())
            if bool(graph.pinned_unit[units[stuck]].any()):
                reasons[f] = (f"{int(stuck.sum())} pruned channels feed the model output or an op the tracer cannot "
                              "see through; width kept, channels zeroed")
                continue
            keepers = [o for o in g.fqns if o != f and any(
                u in stuck_units for u in graph.unit[graph.layers[o].out_atoms][~plan_dead[o]].tolist())]
            reasons[f] = (f"{int(stuck.sum())} pruned channels are coupled (residual add / concat) with "
                          f"{', '.join(keepers[:4])}{' ...' if len(keepers) > 4 else ''}, which keep them; width kept, channels zeroed")
    return reasons


def skip_reasons(model: nn.Module, graph: ChannelGraph) -> dict[str, str]:
    """``{fqn: reason}`` for every Linear / Conv2d of ``model`` whose output channels can never be removed."""
    out = {}
    for fqn, mod in model.named_modules():
        if type(mod) not in (nn.Linear, nn.Conv2d):
            continue
        info = graph.layers.get(fqn)
        if info is None:
            out[fqn] = ("not a channel layer of the traced graph (called more than once, on a tensor whose channels "
                        "the tracer does not follow, or not called)")
            continue
        units = graph.unit[info.out_atoms]
        if bool(graph.pinned_unit[units].all()):
            why = next((graph.pin_reasons[u] for u in units.tolist() if u in graph.pin_reasons), None)
            out[fqn] = f"output channels pinned: {why or 'they feed the model output or an op the tracer cannot see through'}"
    return out


def plan_slim(model: nn.Module, masks: dict[str, torch.Tensor], example_input: torch.Tensor | tuple, *,
              round_to: int | None = None, scores: dict[str, torch.Tensor] | None = None,
              example_kwargs: dict | None = None, tracer: str = "auto", graph: ChannelGraph | None = None) -> SlimPlan:
    """Decide what slimming ``model`` under ``masks`` removes, traced on ``model(*example_input, **example_kwargs)``.

    ``example_input``: one tensor (``[B, C, H, W]`` for conv nets) or a tuple of positional inputs; ``tracer``
    as in ``trace_channels``; ``graph``: an existing trace of ``model`` (skips tracing).
    """
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive int or None, got {round_to!r}")
    if graph is None:
        graph = trace_channels(model, example_input, example_kwargs, tracer=tracer)
    masks = _check_masks(graph, masks)
    dead_out, dead_in = dead_channels(graph, masks)
    removed = _removed_units(graph, dead_out)
    if round_to is not None and round_to > 1:
        masks = _round(graph, masks, removed, round_to, scores if scores is not None else _default_scores(model, graph))
        dead_out, dead_in = dead_channels(graph, masks)
        removed = _removed_units(graph, dead_out)
    keep_out, keep_in = {}, {}
    for fqn, info in graph.layers.items():
        k = ~removed[graph.unit[info.out_atoms]]
        if not bool(k.all()):
            keep_out[fqn] = k
        if info.kind in ("conv", "linear"):
            k = ~removed[graph.unit[info.in_atoms]]
            if not bool(k.all()):
                keep_in[fqn] = k
    before = sum(p.numel() for p in model.parameters())
    return SlimPlan(masks, dead_out, dead_in, keep_out, keep_in, _residual_reasons(graph, dead_out, removed),
                    before, _param_count(model, keep_out, keep_in), skip_reasons(model, graph), graph.tracer)


@torch.no_grad()
def _zero_dead_(model: nn.Module, dead_out: dict[str, torch.Tensor], dead_in: dict[str, torch.Tensor]) -> None:
    for fqn, dead in dead_out.items():
        mod = model.get_submodule(fqn)
        if not bool(dead.any()):
            continue
        d = dead.to(mod.weight.device if mod.weight is not None else "cpu")
        for name in ("weight", "bias", "running_mean"):
            t = getattr(mod, name, None)
            if isinstance(t, torch.Tensor):
                t[d] = 0
    for fqn, dead in dead_in.items():
        if bool(dead.any()):
            w = model.get_submodule(fqn).weight
            w[:, dead.to(w.device)] = 0


def _index(t: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    return t.index_select(dim, keep.nonzero().flatten().to(t.device)).contiguous()


@torch.no_grad()
def _slice_(mod: nn.Module, keep_out: torch.Tensor | None, keep_in: torch.Tensor | None) -> None:
    def set_param(name: str, value: torch.Tensor) -> None:
        old = getattr(mod, name)
        setattr(mod, name, nn.Parameter(value, requires_grad=old.requires_grad))

    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        for name in ("weight", "bias"):
            if getattr(mod, name) is not None:
                set_param(name, _index(getattr(mod, name), keep_out, 0))
        for name in ("running_mean", "running_var"):
            if getattr(mod, name) is not None:
                setattr(mod, name, _index(getattr(mod, name), keep_out, 0))
        set_channel_counts(mod, (int(keep_out.sum()),))
        return
    w = mod.weight
    if keep_out is not None:
        w = _index(w, keep_out, 0)
        if mod.bias is not None:
            set_param("bias", _index(mod.bias, keep_out, 0))
    if keep_in is not None:
        w = _index(w, keep_in, 1)
    set_param("weight", w)
    set_channel_counts(mod, tuple(w.shape))


def set_channel_counts(mod: nn.Module, weight_shape: tuple[int, ...]) -> None:
    """Make a narrowed layer's size attributes match its new ``weight_shape`` (``[out, ...]``; BatchNorm:
    ``(num_features,)``): Linear ``out/in_features``; Conv2d ``out/in_channels`` (``in = shape[1] * groups``; a
    depthwise conv stays depthwise, its ``groups`` following the channel count); BatchNorm ``num_features``.
    The one narrowing rule of slimming (``apply_plan``) and of loading a slimmed file (``sparsecore.io``)."""
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        mod.num_features = int(weight_shape[0])
    elif isinstance(mod, nn.Conv2d):
        if mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels:
            mod.in_channels = mod.out_channels = mod.groups = int(weight_shape[0])
        else:
            mod.out_channels, mod.in_channels = int(weight_shape[0]), int(weight_shape[1]) * mod.groups
    elif isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = int(weight_shape[0]), int(weight_shape[1])
    else:
        raise TypeError(f"cannot narrow a {type(mod).__name__}: Linear, Conv2d and BatchNorm only")


def apply_plan(model: nn.Module, plan: SlimPlan) -> nn.Module:
    """A slimmed deep copy of ``model``: dead channels zeroed, removable ones cut out."""
    model = copy.deepcopy(model)
    _zero_dead_(model, plan.dead_out, plan.dead_in)
    resized, before = {}, {}
    for fqn in set(plan.keep_out) | set(plan.keep_in):
        mod = model.get_submodule(fqn)
        before[fqn] = mod.weight.shape
        old = mod.weight.shape[0]
        _slice_(mod, plan.keep_out.get(fqn), plan.keep_in.get(fqn))
        if isinstance(mod, nn.Linear) and mod.weight.shape[0] != old:
            resized[fqn] = (old, mod.weight.shape[0])
    update_head_counts(model, resized)
    _record_shapes(model, {f: (tuple(before[f]), tuple(model.get_submodule(f).weight.shape)) for f in before})
    setattr(model, _RESIDUAL_ATTR, dict(plan.residual))
    return model


def masked_model(model: nn.Module, plan: SlimPlan) -> nn.Module:
    """A deep copy of ``model`` with the plan's dead channels zeroed: what ``apply_plan(model, plan)`` computes."""
    model = copy.deepcopy(model)
    _zero_dead_(model, plan.dead_out, plan.dead_in)
    return model


@torch.no_grad()
def verify_slim(model: nn.Module, small: nn.Module, plan: SlimPlan, example_input: torch.Tensor | tuple,
                example_kwargs: dict | None = None) -> float:
    """Run ``small`` and the masked ``model`` on the example inputs; raise ``ValueError`` unless they agree.

    Returns the largest absolute difference relative to the reference output's largest magnitude. Catches
    modules that read head counts or widths the slimming could not update (``heads.py``).
    """
    from .export_trace import output_tensors

    args = example_input if isinstance(example_input, tuple) else (example_input,)
    ref = masked_model(model, plan)
    modes = [(m, m.training) for m in list(ref.modules()) + list(small.modules())]
    ref.eval(), small.eval()
    try:
        y_ref = output_tensors(ref(*args, **(example_kwargs or {})))
        try:
            y = output_tensors(small(*args, **(example_kwargs or {})))
        except Exception as e:
            raise ValueError(f"the slimmed model fails to run ({type(e).__name__}: {e}); a module probably reads a "
                             "head count or width that slimming could not update") from e
    finally:
        for m, training in modes:
            m.training = training
    worst = 0.0
    for a, b in zip(y, y_ref):
        if not b.is_floating_point():
            continue
        if a.shape != b.shape:
            raise ValueError(f"the slimmed model's output has shape {tuple(a.shape)}, the masked model's {tuple(b.shape)}")
        scale = float(b.abs().max().clamp_min(1e-30))
        err = float((a.double() - b.double()).abs().max()) / scale
        tol = 1e-4 if b.dtype in (torch.float32, torch.float64) else 2e-2
        if not err <= tol:
            raise ValueError(f"the slimmed model differs from the masked model by {err:.3g} (relative; tolerance {tol}); "
                             "a module probably reads a head count or width that slimming could not update")
        worst = max(worst, err)
    return worst


def slim(model: nn.Module, masks: dict[str, torch.Tensor], example_input: torch.Tensor | tuple, *,
         round_to: int | None = None, scores: dict[str, torch.Tensor] | None = None,
         example_kwargs: dict | None = None, tracer: str = "auto") -> nn.Module:
    """Physically remove masked channels where the graph allows; returns a new model.

    ``masks``: ``{fqn: bool [out]}``. ``example_input``: one input batch for tracing (shapes only).
    The result computes ``masked_reference(model, plan.masks, x)`` (fp32 rounding aside); use
    ``plan_slim`` first to see what shrinks and which layers keep zeroed channels.

    >>> small = slim(resnet50(), {"layer1.0.conv1": keep}, torch.randn(1, 3, 224, 224), round_to=8)
    """
    plan = plan_slim(model, masks, example_input, round_to=round_to, scores=scores, example_kwargs=example_kwargs,
                     tracer=tracer)
    small = apply_plan(model, plan)
    if plan.tracer == "export":
        verify_slim(model, small, plan, example_input, example_kwargs)
    return small


def masked_reference(model: nn.Module, masks: dict[str, torch.Tensor], example_input: torch.Tensor | tuple,
                     example_kwargs: dict | None = None, *, tracer: str = "auto") -> nn.Module:
    """A deep copy of ``model`` with every dead channel's parameters zeroed (see module docstring)."""
    graph = trace_channels(model, example_input, example_kwargs, tracer=tracer)
    dead_out, dead_in = dead_channels(graph, _check_masks(graph, masks))
    model = copy.deepcopy(model)
    _zero_dead_(model, dead_out, dead_in)
    return model


def channel_weight_masks(model: nn.Module, masks: dict[str, torch.Tensor], example_input: torch.Tensor | tuple,
                         example_kwargs: dict | None = None, *, tracer: str = "auto") -> dict[str, torch.Tensor]:
    """Block weight masks for ``ChannelWeight``: ``{fqn: bool weight-shaped}`` = kept rows x live input columns.

    Covers every Conv2d / Linear with a dead output channel or a dead input column. The masks describe
    exactly the zeros of ``masked_reference(model, masks, x)``, so packing that model's weights with
    them is lossless. Depthwise / grouped convs get row masks (their dim 1 is per group).
    """
    graph = trace_channels(model, example_input, example_kwargs, tracer=tracer)
    dead_out, dead_in = dead_channels(graph, _check_masks(graph, masks))
    out = {}
    for fqn, info in graph.layers.items():
        if info.kind not in _MEMBER_KINDS:
            continue
        w = model.get_submodule(fqn).weight
        rows = ~dead_out[fqn]
        cols = ~dead_in[fqn] if fqn in dead_in else torch.ones(w.shape[1], dtype=torch.bool)
        if bool(rows.all()) and bool(cols.all()):
            continue
        block = rows[:, None] & cols[None, :]
        out[fqn] = block.reshape(block.shape + (1,) * (w.dim() - 2)).expand(w.shape).to(w.device).contiguous()
    return out


_SLIMMED_ATTR = "sparsecore_slimmed"


def mark_slimmed(model: nn.Module) -> None:
    """Record that ``model`` was physically slimmed: its layers may be narrower than a fresh skeleton's, so
    ``sparsecore.io.load`` resizes the skeleton's layers to the file's shapes. The mark travels with the
    model object (and ``copy.deepcopy``) and is saved in the file header."""
    setattr(model, _SLIMMED_ATTR, True)


def is_slimmed(model: nn.Module) -> bool:
    """True when ``mark_slimmed`` was applied to ``model`` (by ``sparsify(..., slim=True)`` or ``load``)."""
    return getattr(model, _SLIMMED_ATTR, False) is True


_SKIPPED_ATTR = "sparsecore_slim_skipped"


def record_skipped(model: nn.Module, reasons: dict[str, str]) -> None:
    """Attach ``{fqn: reason}`` for the layers slimming could not narrow (read back with ``slim_skipped``)."""
    setattr(model, _SKIPPED_ATTR, dict(reasons))


def slim_skipped(model: nn.Module) -> dict[str, str]:
    """``{fqn: reason}`` for the Linear / Conv2d layers of a slimmed model that kept their output width.

    >>> small = sparsify(model, SparsityConfig("channel", 0.5), example_inputs=(x,))
    >>> slim_skipped(small)["fc"]
    'output channels pinned: feeds the model output'
    """
    return dict(getattr(model, _SKIPPED_ATTR, {}))


_SHAPES_ATTR = "sparsecore_slim_shapes"
_RESIDUAL_ATTR = "sparsecore_slim_residual"


def _record_shapes(model: nn.Module, shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
    setattr(model, _SHAPES_ATTR, {f: s for f, s in shapes.items() if s[0] != s[1]})


def slimmed_shapes(model: nn.Module) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """``{fqn: (weight shape before, after)}`` for the layers (and BatchNorms) ``apply_plan`` narrowed.

    >>> slimmed_shapes(small)["layer1.0.conv1"]
    ((64, 64, 3, 3), (32, 64, 3, 3))
    """
    return dict(getattr(model, _SHAPES_ATTR, {}))


def slim_residual(model: nn.Module) -> dict[str, str]:
    """``{fqn: reason}`` for the layers of a slimmed model that keep zeroed channels at full width (a residual
    add or concat, or the model output, holds them); they run packed with the channel format."""
    return dict(getattr(model, _RESIDUAL_ATTR, {}))
