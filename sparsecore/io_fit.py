"""Fit a read file to the user's model skeleton: validate everything first, then swap (``sparsecore.load``).

Order of work, so that a failure leaves the skeleton exactly as it was:

1. tensors move to the target device once (aliases stay one tensor);
2. each sparse layer of the header is rebuilt (its packed data validated once) and checked against the
   skeleton's module at that name: type, weight shape, bias presence, conv geometry (stride, padding,
   dilation, groups, in_channels);
3. the state dict the model will have afterwards (keys, shapes, dtype kinds) is compared with the file;
4. only then is the skeleton changed: slimmed layers narrowed, sparse layers swapped in at every name a
   shared module has, tensors assigned. Should anything still raise, a snapshot of every module's
   attributes is put back.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .channel.heads import update_head_counts
from .channel.slim import mark_slimmed, set_channel_counts
from .io import FileFormatError, SavedModel, SkeletonMismatchError, packed_layer
from .layers import is_conv1d_t, linear_like, weight_matrix
from .modules import SparseConv1D, SparseConv2d, SparseLinear, _explicit_padding
from .sparsify import swap_module

__all__ = ["fit"]

_RESIZABLE = (nn.Linear, nn.Conv2d, nn.modules.batchnorm._BatchNorm)


def fit(saved: SavedModel, model: nn.Module, device: torch.device | str | None) -> nn.Module:
    """Load ``saved`` into the skeleton ``model`` (see ``sparsecore.load``); returns the loaded model."""
    header = saved.header
    slimmed = header["slimmed"]
    param = next(iter(model.parameters()), None)
    try:
        target = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must name a torch device, got {device!r}: {e}") from None
    tensors = _to_device(saved.tensors, target)

    if "" in header["layers"]:  # one bare layer: the result is its sparse twin; the skeleton is left alone
        if len(header["layers"]) != 1:
            raise FileFormatError("a sparse root layer ('') cannot come with other sparse layers")
        new = _build_layer("", header["layers"][""], tensors, model, slimmed).train(model.training)
        _check_state(new.state_dict(keep_vars=True), tensors, {}, set(new.state_dict()))
        new.load_state_dict(_as_parameters(tensors, new.state_dict(keep_vars=True)), strict=True, assign=True)
        return new

    named = dict(model.named_modules())
    paths: dict[int, list[str]] = {}
    for fqn, mod in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(mod), []).append(fqn)
    new_layers: dict[str, nn.Module] = {}
    owner: dict[int, str] = {}
    for fqn, entry in header["layers"].items():
        if fqn not in named:
            raise SkeletonMismatchError(f"the file has sparse layer {fqn!r}, the model has no such module")
        skel = named[fqn]
        if id(skel) in owner:
            raise SkeletonMismatchError(f"layers {owner[id(skel)]!r} and {fqn!r} are one shared module in the model, "
                                        "two layers in the file")
        owner[id(skel)] = fqn
        new_layers[fqn] = _build_layer(fqn, entry, tensors, skel, slimmed).train(skel.training)

    swaps = {path: new_layers[fqn] for fqn in new_layers for path in paths[id(named[fqn])]}
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items() if k.rpartition(".")[0] not in swaps}
    sparse_keys = set()
    for path, new in swaps.items():
        for name, t in new.state_dict(keep_vars=True).items():
            expected[f"{path}.{name}"] = t
            sparse_keys.add(f"{path}.{name}")
    resize = _resize_plan(model, expected, tensors, sparse_keys) if slimmed else {}
    _check_state(expected, tensors, resize, sparse_keys)
    state = _as_parameters(tensors, expected)

    snapshot = _snapshot(model)
    try:
        _resize(model, resize, state)
        for path, new in swaps.items():
            swap_module(model, path, new)
        if slimmed:
            mark_slimmed(model)
        model.load_state_dict(state, strict=True, assign=True)
        if device is not None:
            model.to(target)  # non-persistent buffers too
    except BaseException:
        _restore(snapshot)
        raise
    return model


def _to_device(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    moved: dict[int, torch.Tensor] = {}
    out = {}
    for key, t in tensors.items():
        if id(t) not in moved:
            moved[id(t)] = t.to(device)
        out[key] = moved[id(t)]
    return out


def _check_geometry(fqn: str, entry: dict[str, Any], skel: nn.Module, slimmed: bool) -> tuple:
    """(stride, padding, dilation, groups, in_channels) from the header, validated and compared with ``skel``."""
    conv, in_channels = entry.get("conv"), entry.get("in_channels")
    pair = (lambda v, lo: isinstance(v, list) and len(v) == 2 and all(type(x) is int and x >= lo for x in v))
    if not (isinstance(conv, dict) and set(conv) == {"stride", "padding", "dilation", "groups"}
            and pair(conv["stride"], 1) and pair(conv["padding"], 0) and pair(conv["dilation"], 1)
            and type(conv["groups"]) is int and conv["groups"] >= 1 and type(in_channels) is int and in_channels >= 1):
        raise FileFormatError(f"layer {fqn!r}: conv geometry must be stride/dilation >= 1, padding >= 0 (pairs of "
                              f"ints), groups >= 1 and in_channels >= 1; got {conv!r}, in_channels {in_channels!r}")
    got = (tuple(conv["stride"]), tuple(conv["padding"]), tuple(conv["dilation"]), conv["groups"], in_channels)
    if isinstance(skel, SparseConv2d):
        c = skel.conv
        want = (tuple(c.stride), tuple(c.padding), tuple(c.dilation), c.groups, skel.in_channels)
    else:
        if skel.padding_mode != "zeros":
            raise SkeletonMismatchError(f"layer {fqn!r}: the model's conv pads with {skel.padding_mode!r}; "
                                        "sparse convs pad with zeros")
        try:
            padding = nn.modules.utils._pair(_explicit_padding(skel.padding, skel.stride, skel.dilation, skel.kernel_size))
        except ValueError as e:
            raise SkeletonMismatchError(f"layer {fqn!r}: {e}") from None
        want = (tuple(skel.stride), tuple(padding), tuple(skel.dilation), skel.groups, skel.in_channels)
    depthwise = want[3] == want[4] > 1 and got[3] == got[4]  # slimming narrows a depthwise conv's groups too
    same = got[:3] == want[:3] and (got[3] == want[3] or (slimmed and depthwise)) and \
        (got[4] == want[4] or (slimmed and got[4] <= want[4]))
    if not same:
        names = ("stride", "padding", "dilation", "groups", "in_channels")
        diff = ", ".join(f"{n} {g} (model: {w})" for n, g, w in zip(names, got, want) if g != w)
        raise SkeletonMismatchError(f"layer {fqn!r}: file conv geometry differs from the model's: {diff}")
    return got


def _build_layer(fqn: str, entry: Any, tensors: dict[str, torch.Tensor], skel: nn.Module, slimmed: bool) -> nn.Module:
    packed, _ = packed_layer(fqn, entry, tensors)
    prefix = f"{fqn}." if fqn else ""
    bias = tensors.get(f"{prefix}bias")
    kind = entry["type"]
    fits = (linear_like(skel) or isinstance(skel, SparseLinear)) if kind == "linear" else \
        isinstance(skel, (nn.Conv2d, SparseConv2d))
    if not fits:
        raise SkeletonMismatchError(f"layer {fqn!r}: the file holds a sparse {kind}, the model has {type(skel).__name__}")
    shape = tuple(weight_matrix(skel).shape if hasattr(skel, "weight") else skel.format_meta["shape"])
    # A slimmed model may have narrowed dims 0 and 1; otherwise, and always for kernel sizes, shapes match exactly.
    narrowed_ok = slimmed and len(shape) == len(packed.shape) and shape[2:] == tuple(packed.shape[2:]) and \
        all(f <= k for f, k in zip(packed.shape[:2], shape[:2]))
    if shape != tuple(packed.shape) and not narrowed_ok:
        raise SkeletonMismatchError(f"layer {fqn!r}: file weight shape {tuple(packed.shape)} does not fit model "
                                    f"weight shape {shape}")
    if (bias is None) != (getattr(skel, "bias", None) is None):
        raise SkeletonMismatchError(f"layer {fqn!r}: the file {'has' if bias is not None else 'lacks'} a bias, the model "
                                    f"{'lacks' if bias is not None else 'has'} one")
    if bias is not None and tuple(bias.shape) != (packed.shape[0],):
        raise FileFormatError(f"layer {fqn!r}: bias shape {tuple(bias.shape)} != ({packed.shape[0]},)")
    try:
        if kind == "linear":
            cls = SparseConv1D if is_conv1d_t(skel) or isinstance(skel, SparseConv1D) else SparseLinear
            return cls(packed, bias, entry.get("backend", "auto"))
        stride, padding, dilation, groups, in_channels = _check_geometry(fqn, entry, skel, slimmed)
        return SparseConv2d(packed, bias, in_channels, stride, padding, dilation, groups, entry.get("backend", "auto"))
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, FileFormatError):
            raise
        raise FileFormatError(f"layer {fqn!r}: inconsistent header entry ({type(e).__name__}: {e})") from None


def _resize_plan(model: nn.Module, expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
                 sparse_keys: set[str]) -> dict[str, torch.Size]:
    """Keys of dense Linear/Conv2d/BatchNorm tensors that a slimmed file narrows: ``{key: file shape}``."""
    plan = {}
    for key, t in tensors.items():
        cur = expected.get(key)
        if key in sparse_keys or cur is None or cur.shape == t.shape:
            continue
        owner = key.rpartition(".")[0]
        try:
            mod = model.get_submodule(owner)
        except AttributeError:
            continue
        if isinstance(mod, _RESIZABLE) and cur.dim() == t.dim() and all(f <= k for f, k in zip(t.shape, cur.shape)):
            plan[key] = t.shape
    return plan


def _check_state(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], resize: dict[str, torch.Size],
                 sparse_keys: set[str]) -> None:
    """Raise ``SkeletonMismatchError`` unless the file's tensors are exactly the keys, shapes and dtype kinds
    the model will have (sparse layers' tensors were checked when their layers were built)."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise SkeletonMismatchError(f"missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
    for key, want in expected.items():
        if key in sparse_keys:
            continue
        got = tensors[key]
        if got.shape != want.shape and key not in resize:
            raise SkeletonMismatchError(f"tensor {key!r}: file shape {tuple(got.shape)}, model shape {tuple(want.shape)}")
        if got.is_floating_point() != want.is_floating_point() or (not got.is_floating_point() and got.dtype != want.dtype):
            raise SkeletonMismatchError(f"tensor {key!r}: file dtype {got.dtype}, model dtype {want.dtype}")


def _as_parameters(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's tensors with those that land on parameters wrapped once per stored tensor, so that
    parameters the skeleton ties (one Parameter under two names) stay one Parameter."""
    wrapped: dict[tuple[int, bool], nn.Parameter] = {}
    state = {}
    for key, t in tensors.items():
        want = expected[key]
        if isinstance(want, nn.Parameter):
            ident = (id(t), want.requires_grad)
            if ident not in wrapped:
                wrapped[ident] = nn.Parameter(t, requires_grad=want.requires_grad)
            t = wrapped[ident]
        state[key] = t
    return state


def _resize(model: nn.Module, resize: dict[str, torch.Size], state: dict[str, torch.Tensor]) -> None:
    """Narrow the planned modules: put the file's tensors in place and update their size attributes."""
    resized_rows: dict[str, tuple[int, int]] = {}  # narrowed Linear -> (rows before, rows after)
    for key in resize:
        owner, _, name = key.rpartition(".")
        mod = model.get_submodule(owner)
        if name == "weight" and isinstance(mod, nn.Linear) and state[key].shape[0] != mod.out_features:
            resized_rows[owner] = (mod.out_features, int(state[key].shape[0]))
        setattr(mod, name, state[key])
        if name == "weight":
            set_channel_counts(mod, tuple(state[key].shape))
    update_head_counts(model, resized_rows)  # attention modules' head counts follow their narrowed projections


def _snapshot(model: nn.Module) -> list[tuple[nn.Module, dict, dict, dict, dict]]:
    return [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules)) for m in model.modules()]


def _restore(snapshot: list[tuple[nn.Module, dict, dict, dict, dict]]) -> None:
    """Put every module's attributes, parameters, buffers and children back as they were."""
    for mod, attrs, params, buffers, children in snapshot:
        mod.__dict__.clear()
        mod.__dict__.update(attrs)
        for live, saved in ((mod._parameters, params), (mod._buffers, buffers), (mod._modules, children)):
            live.clear()
            live.update(saved)
