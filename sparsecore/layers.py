"""Which layers of a model ``sparsify`` can make sparse, and why the others stay dense.

Linear-like layers (every ``y = x @ W^T + b``):

* ``nn.Linear`` and its subclasses that keep ``nn.Linear.forward`` (e.g. ``NonDynamicallyQuantizableLinear``).
  A subclass with its own ``forward`` computes something else and is skipped.
* transformers' GPT-2 ``Conv1D``: a linear whose weight is stored ``[in, out]``. Its mask has the weight's
  own shape ``[in, out]`` (masks are always shaped like the weight); packing transposes both to ``[out, in]``.
* ``nn.Conv2d`` with zero padding (grouped and depthwise included).

Skipped, with the reason ``skip_reason`` gives: ``nn.MultiheadAttention``'s ``out_proj`` (MHA reads its
``.weight`` directly and never calls its forward, so a swapped module would be ignored) and the MHA's own
``in_proj_weight`` (a raw parameter); other convolutions (1-D, 3-D, transposed); N:M where the reduction
length K is not a multiple of m (ResNet's 7x7 stem: K = 147; depthwise 3x3: K = 9).

The *output layer* (``output_layer``: the last linear-like layer in registration order when its output
width feeds no layer, e.g. a classifier ``fc`` or an ``lm_head``) of a model with several weight layers is excluded from channel pruning unless
the caller opts in (``prune_output=True``): pruning its output channels deletes classes or vocabulary
entries (channel 0.5 on ResNet-18 zeroed 500 of its 1000 ``fc`` rows).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["is_conv1d_t", "linear_like", "weight_matrix", "mask_from_matrix", "layer_kind", "skip_reason",
           "candidate_layers", "output_layer", "MHA_SKIP"]

MHA_SKIP = "read through .weight by nn.MultiheadAttention (its forward is never called); stays dense"
_OTHER_CONVS = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def is_conv1d_t(mod: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D`` (``weight [in, out]``, ``y = x @ W + b``), recognised without importing it."""
    cls = type(mod)
    return (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")
            and isinstance(getattr(mod, "weight", None), torch.Tensor) and mod.weight.dim() == 2)


def linear_like(mod: nn.Module) -> bool:
    """``nn.Linear`` (or a subclass computing the same) or GPT-2 ``Conv1D``."""
    if is_conv1d_t(mod):
        return True
    return isinstance(mod, nn.Linear) and type(mod).forward is nn.Linear.forward


def weight_matrix(mod: nn.Module) -> torch.Tensor:
    """The layer's weight as pruners score it: ``[out, in]`` for linears (a transposed view for ``Conv1D``),
    ``[C_out, C_in/groups, kh, kw]`` for convolutions."""
    return mod.weight.t() if is_conv1d_t(mod) else mod.weight


def mask_from_matrix(mod: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """Inverse of ``weight_matrix`` for a mask: the mask shaped like ``mod.weight`` itself."""
    return mask.t().contiguous() if is_conv1d_t(mod) else mask


def layer_kind(mod: nn.Module) -> str:
    """Short class name for reports (``"Linear"``, ``"Conv1D"``, ``"Conv2d"``, ...)."""
    return type(mod).__name__


def _mha_children(model: nn.Module) -> dict[str, str]:
    """``{fqn: reason}`` for layers a MultiheadAttention reads without calling them."""
    out = {}
    for fqn, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            prefix = f"{fqn}." if fqn else ""
            out[f"{prefix}out_proj"] = MHA_SKIP
    return out


def skip_reason(mod: nn.Module, pattern: str, m: int = 4) -> str | None:
    """Why ``mod`` cannot be made sparse under ``pattern`` (``None``: it can). Context-free checks only;
    ``candidate_layers`` adds those that depend on the parent module."""
    from .masks import as_matrix

    if isinstance(mod, nn.Linear) and not linear_like(mod):
        return f"{type(mod).__name__} overrides nn.Linear.forward; its computation is unknown"
    if isinstance(mod, _OTHER_CONVS):
        return f"{type(mod).__name__} has no sparse twin (Linear, GPT-2 Conv1D and Conv2d do)"
    if isinstance(mod, nn.Conv2d) and mod.padding_mode != "zeros":
        return f"padding_mode={mod.padding_mode!r}; only 'zeros' is supported"
    if pattern == "nm" and (linear_like(mod) or isinstance(mod, nn.Conv2d)):
        k = as_matrix(weight_matrix(mod)).shape[1]
        if k % m:
            return f"N:M needs K % {m} == 0; K = {k}"
    return None


def candidate_layers(model: nn.Module, pattern: str, m: int = 4) -> tuple[dict[str, nn.Module], dict[str, tuple[nn.Module, str]]]:
    """Split the model's weight layers into ``(supported {fqn: module}, skipped {fqn: (module, reason)})``.

    Every linear-like layer, ``nn.Conv*`` and ``nn.MultiheadAttention`` appears in exactly one of the two.
    """
    mha = _mha_children(model)
    ok: dict[str, nn.Module] = {}
    skipped: dict[str, tuple[nn.Module, str]] = {}
    for fqn, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            skipped[fqn] = (mod, "in_proj weights are raw parameters of nn.MultiheadAttention; stay dense")
            continue
        if not (isinstance(mod, (nn.Linear, nn.Conv2d) + _OTHER_CONVS) or is_conv1d_t(mod)):
            continue
        reason = mha.get(fqn) or skip_reason(mod, pattern, m)
        if reason is None:
            ok[fqn] = mod
        else:
            skipped[fqn] = (mod, reason)
    return ok, skipped


def _widths(mod: nn.Module) -> tuple[int, int]:
    if isinstance(mod, nn.Conv2d):
        return mod.in_channels, mod.out_channels
    out, k = weight_matrix(mod).shape
    return k, out


def output_layer(model: nn.Module) -> str | None:
    """The model's head, if it has one: the last linear-like or Conv2d layer in registration order, provided
    its output width is the input width of no layer of the model (it maps into label or vocabulary space,
    as a classifier ``fc`` or an ``lm_head`` does; a residual block's last projection does not)."""
    found = [(fqn, mod) for fqn, mod in model.named_modules() if linear_like(mod) or isinstance(mod, nn.Conv2d)]
    if not found:
        return None
    fqn, last = found[-1]
    consumed = {_widths(mod)[0] for _, mod in found}
    return None if _widths(last)[1] in consumed else fqn


OUTPUT_SKIP = "output layer: excluded from channel pruning (pass prune_output=True to include it)"


def select(model: nn.Module, pattern: str, m: int = 4, filter_fn=None, prune_output: bool = False
           ) -> tuple[dict[str, nn.Module], dict[str, tuple[nn.Module, str]]]:
    """The layers a pruner should mask, and every other weight layer with the reason it stays dense.

    ``filter_fn(module, fqn) -> bool`` narrows the selection; for the channel pattern the output layer is
    left out unless ``prune_output``.
    """
    from .pruning.rules import rule_for

    ok, skipped = candidate_layers(model, pattern, m)
    fits = rule_for(pattern).fits
    for fqn in [f for f, mod in ok.items() if not fits(mod, m)]:
        skipped[fqn] = (ok.pop(fqn), f"does not fit the {pattern!r} selection rule")
    # a lone layer is the user's explicit target, not a head to protect
    head = output_layer(model) if pattern == "channel" and not prune_output and len(ok) > 1 else None
    selected = {}
    for fqn, mod in ok.items():
        if fqn == head:
            skipped[fqn] = (mod, OUTPUT_SKIP)
        elif filter_fn is not None and not filter_fn(mod, fqn):
            skipped[fqn] = (mod, "excluded by filter_fn")
        else:
            selected[fqn] = mod
    return selected, skipped
