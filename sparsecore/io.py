"""Save and load packed models: one safetensors file plus a versioned JSON header. No pickle.

File layout: a standard safetensors file whose tensors are ``model.state_dict()`` (packed buffers of sparse
layers included, shared tensors stored once) and whose metadata holds one key, ``"sparsecore"``, a JSON
document::

    {"format": "sparsecore", "version": 1,
     "layers": {fqn: {"type": "linear"|"conv2d", "packed": <format meta>, "tensors": [names],
                      "in_channels": int, "conv": {...}, "backend": "auto"}},
     "aliases": {key: stored_key}, "slimmed": bool, "crc32": {key: int}, "config": {...} | null, "extra": {...} | null,
     "torch": "2.x", "sparsecore": "0.1.0"}

Loading needs the dense model's skeleton (same architecture, any weights): the sparse layers named in the
header replace its Linear/Conv2d modules, then every tensor is loaded strictly. Each tensor's CRC-32 is
checked, so a flipped byte names the tensor it hit.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .backends import Backend
from .channel.slim import is_slimmed, mark_slimmed, set_channel_counts
from .config import SparsityConfig
from .formats import FORMATS
from .formats.base import FormatError, PackedWeight
from .layers import is_conv1d_t, linear_like, weight_matrix
from .modules import SparseConv1D, SparseConv2d, SparseLinear
from .sparsify import sparse_modules, swap_module

__all__ = ["save", "load", "read", "packed_layer", "SavedModel", "FileFormatError", "FILE_VERSION"]

FILE_VERSION = 1
_KEY = "sparsecore"


class FileFormatError(ValueError):
    """The file is not a readable sparsecore model (foreign, truncated, corrupt or a newer version)."""


@dataclass
class SavedModel:
    """What a file holds: the parsed header and the tensors by state-dict key."""

    header: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())


def save(model: nn.Module, path: str | Path, config: SparsityConfig | None = None,
         extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (sparse layers packed) to ``path`` as safetensors + JSON header. Returns the path.

    ``extra``: JSON-able facts to keep with the weights (e.g. how to rebuild the model's skeleton).
    """
    if extra is not None:
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as e:
            raise TypeError(f"extra must be JSON-serialisable: {e}") from None
    from safetensors.torch import save_file

    layers = {}
    for fqn, mod in sparse_modules(model).items():
        entry: dict[str, Any] = {"type": mod.op, "packed": mod.format_meta, "tensors": list(mod.packed_tensor_names),
                                 "backend": mod.backend.value}
        if isinstance(mod, SparseConv2d):
            c = mod.conv
            entry["in_channels"] = mod.in_channels
            entry["conv"] = {"stride": list(c.stride), "padding": list(c.padding), "dilation": list(c.dilation),
                             "groups": c.groups}
        layers[fqn] = entry
    tensors, aliases, seen = {}, {}, {}
    for key, t in model.state_dict().items():
        t = t.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and ident in seen:  # tied tensors: store once
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.cpu().contiguous()
    header = {"format": _KEY, "version": FILE_VERSION, "layers": layers, "aliases": aliases,
              "slimmed": is_slimmed(model),
              "crc32": {k: _crc(t) for k, t in tensors.items()},
              "config": config.to_json() if config is not None else None, "extra": extra,
              "torch": torch.__version__, "sparsecore": __version__}
    path = Path(path)
    save_file(tensors, str(path), metadata={_KEY: json.dumps(header)})
    return path


def read(path: str | Path) -> SavedModel:
    """Read and validate a file without a model: header checks, CRCs, tensors on CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FileFormatError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    if _KEY not in meta:
        raise FileFormatError(f"{path} is a safetensors file but not a sparsecore model (no {_KEY!r} header)")
    try:
        header = json.loads(meta[_KEY])
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{path}: sparsecore header is not valid JSON: {e}") from None
    if not isinstance(header, dict) or header.get("format") != _KEY:
        raise FileFormatError(f"{path}: header does not declare format {_KEY!r}")
    if header.get("version") != FILE_VERSION:
        raise FileFormatError(f"{path}: file version {header.get('version')!r}, this sparsecore reads version {FILE_VERSION}")
    for field, kind in (("layers", dict), ("aliases", dict), ("crc32", dict)):
        if not isinstance(header.get(field), kind):
            raise FileFormatError(f"{path}: header field {field!r} missing or not a {kind.__name__}")
    if set(header["crc32"]) != set(tensors):
        raise FileFormatError(f"{path}: tensors {sorted(set(tensors) ^ set(header['crc32']))} disagree with the header")
    for key, t in tensors.items():
        if _crc(t) != header["crc32"][key]:
            raise FileFormatError(f"{path}: tensor {key!r} fails its CRC-32 check (corrupt data)")
    for key, target in header["aliases"].items():
        if target not in tensors:
            raise FileFormatError(f"{path}: alias {key!r} points to missing tensor {target!r}")
        tensors[key] = tensors[target]
    return SavedModel(header, tensors)


def packed_layer(fqn: str, entry: Any, tensors: dict[str, torch.Tensor]) -> tuple[PackedWeight, list[str]]:
    """Validate one header layer entry and rebuild its packed weight; also returns the state-dict keys it used."""
    if not isinstance(entry, dict) or not isinstance(entry.get("packed"), dict):
        raise FileFormatError(f"layer {fqn!r}: header entry must be an object with a 'packed' object")
    if entry.get("type") not in ("linear", "conv2d"):
        raise FileFormatError(f"layer {fqn!r}: type must be 'linear' or 'conv2d', got {entry.get('type')!r}")
    if entry.get("backend", "auto") not in {b.value for b in Backend}:
        raise FileFormatError(f"layer {fqn!r}: unknown backend {entry.get('backend')!r}")
    kind = entry["packed"].get("kind")
    if kind not in FORMATS:
        raise FileFormatError(f"layer {fqn!r}: unknown packed format {kind!r}; known {sorted(FORMATS)}")
    names = entry.get("tensors")
    if not isinstance(names, list):
        raise FileFormatError(f"layer {fqn!r}: header lacks its tensor list")
    keys = [f"{fqn}.packed_{n}" if fqn else f"packed_{n}" for n in names]
    try:
        packed_tensors = {n: tensors[k] for n, k in zip(names, keys)}
    except KeyError as e:
        raise FileFormatError(f"layer {fqn!r}: missing tensor {e}") from None
    try:
        return FORMATS[kind].from_state(packed_tensors, entry["packed"]), keys
    except FormatError as e:
        raise FileFormatError(f"layer {fqn!r}: {e}") from None


def _build_layer(fqn: str, entry: Any, tensors: dict[str, torch.Tensor], skeleton: nn.Module,
                 slimmed: bool) -> nn.Module:
    packed, _ = packed_layer(fqn, entry, tensors)
    bias = tensors.get(f"{fqn}.bias")
    linear = entry.get("type") == "linear"
    fits = (linear_like(skeleton) or isinstance(skeleton, SparseLinear)) if linear else \
        isinstance(skeleton, (nn.Conv2d, SparseConv2d))
    if not fits:
        raise ValueError(f"layer {fqn!r}: the file holds a sparse {entry.get('type')}, the model has {type(skeleton).__name__}")
    shape = tuple(weight_matrix(skeleton).shape if hasattr(skeleton, "weight") else skeleton.format_meta["shape"])
    # A slimmed model may have narrowed dims 0 and 1; otherwise, and always for kernel sizes, shapes match exactly.
    narrowed_ok = slimmed and len(shape) == len(packed.shape) and shape[2:] == tuple(packed.shape[2:]) and \
        all(f <= k for f, k in zip(packed.shape[:2], shape[:2]))
    if shape != tuple(packed.shape) and not narrowed_ok:
        raise ValueError(f"layer {fqn!r}: file weight shape {tuple(packed.shape)} does not fit model weight shape {shape}")
    if bias is not None and tuple(bias.shape) != (packed.shape[0],):
        raise FileFormatError(f"layer {fqn!r}: bias shape {tuple(bias.shape)} != ({packed.shape[0]},)")
    try:
        if entry["type"] == "linear":
            cls = SparseConv1D if is_conv1d_t(skeleton) or isinstance(skeleton, SparseConv1D) else SparseLinear
            return cls(packed, bias, entry.get("backend", "auto"))
        c = entry["conv"]
        return SparseConv2d(packed, bias, int(entry["in_channels"]), tuple(c["stride"]), tuple(c["padding"]),
                            tuple(c["dilation"]), int(c["groups"]), entry.get("backend", "auto"))
    except (KeyError, TypeError, ValueError) as e:
        raise FileFormatError(f"layer {fqn!r}: inconsistent header entry ({type(e).__name__}: {e})") from None


_RESIZABLE = (nn.Linear, nn.Conv2d, nn.modules.batchnorm._BatchNorm)


def _resize_like_file(model: nn.Module, tensors: dict[str, torch.Tensor], sparse: set[str]) -> None:
    """Narrow the skeleton's dense Linear/Conv2d/BatchNorm layers to the file's shapes (channel slimming).

    A physically slimmed model keeps its module classes with fewer channels; the shapes in the file say by
    how much. Any other shape difference is left for ``load_state_dict`` to report.
    """
    for key, t in tensors.items():
        owner, _, name = key.rpartition(".")
        if owner in sparse:
            continue
        try:
            mod = model.get_submodule(owner)
        except AttributeError:
            continue
        cur = getattr(mod, name, None)
        if not isinstance(mod, _RESIZABLE) or not isinstance(cur, torch.Tensor) or cur.shape == t.shape:
            continue
        if isinstance(cur, nn.Parameter):
            setattr(mod, name, nn.Parameter(torch.empty_like(t), requires_grad=cur.requires_grad))
        else:
            setattr(mod, name, torch.empty_like(t))
        if name == "weight":
            set_channel_counts(mod, tuple(t.shape))


def load(path: str | Path, model: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """Load a file written by ``save`` into ``model``, a skeleton of the same dense architecture.

    The skeleton's Linear/Conv2d layers named in the file become sparse. For a file written from a
    channel-slimmed model (header ``"slimmed": true``), dense Linear/Conv2d/BatchNorm layers are narrowed to
    the file's shapes, so it loads into the unpruned skeleton; otherwise every shape must match. Every
    tensor is loaded strictly (a missing or unexpected key raises). ``device`` moves the result (default:
    the skeleton's device).

    >>> model = load("model.sparsecore.safetensors", MyModel())
    """
    saved = read(path)
    modules = dict(model.named_modules())
    slimmed = saved.header.get("slimmed") is True
    if slimmed:
        _resize_like_file(model, saved.tensors, set(saved.header["layers"]))
    for fqn, entry in saved.header["layers"].items():
        if fqn not in modules:
            raise ValueError(f"the file has sparse layer {fqn!r}, the model has no such module")
        layer = _build_layer(fqn, entry, saved.tensors, modules[fqn], slimmed)
        swap_module(model, fqn, layer.train(modules[fqn].training))
    if slimmed:
        mark_slimmed(model)
    param = next(iter(model.parameters()), None)
    target = param.device if param is not None else torch.device("cpu")
    model.to("cpu")
    # assign=True keeps the file's dtypes (a float16 file loads as float16, whatever the skeleton's dtype).
    missing, unexpected = model.load_state_dict(saved.tensors, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this model: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
    return model.to(device if device is not None else target)
