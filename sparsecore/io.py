"""Save and load packed models: one safetensors file plus a versioned JSON header. No pickle.

File layout (version 2): a standard safetensors file whose tensors are ``model.state_dict()`` (packed
buffers of sparse layers included, shared tensors stored once) and whose metadata holds two keys:
``"sparsecore"``, a JSON document::

    {"format": "sparsecore", "version": 2,
     "layers": {fqn: {"type": "linear"|"conv2d", "packed": <format meta>, "tensors": [names],
                      "backend": "auto", and for conv2d "in_channels": int,
                      "conv": {"stride": [h, w], "padding": [h, w], "dilation": [h, w], "groups": int}}},
     "aliases": {key: stored_key}, "slimmed": bool, "crc32": {key: int}, "config": {...} | null,
     "extra": <JSON> | null, "torch": "2.x", "sparsecore": "0.1.0"}

and ``"sparsecore_header_crc32"``, the decimal CRC-32 of that document's exact UTF-8 bytes. Each tensor's
CRC-32 covers its dtype and shape (the text ``"<dtype>:<shape list>"``) followed by its bytes, so every
byte of the file is checked: the safetensors header by its own parser plus the tensor CRCs, the sparsecore
header by its CRC, the data by the tensor CRCs. A corrupt file raises ``FileFormatError`` naming what
failed. Version 1 files (no header CRC, tensor CRCs over bytes only) are still read.

Loading needs the dense model's skeleton (same architecture, any weights); ``sparsecore.io_fit`` checks the
file against it (layer types, shapes, conv geometry, every state-dict key) before the skeleton is touched.
"""
from __future__ import annotations

import json
import os
import re
import stat
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .backends import Backend
from .channel.slim import is_slimmed
from .config import SparsityConfig
from .formats import FORMATS
from .formats.base import FormatError, PackedWeight, dtype_name
from .modules import SparseConv2d
from .sparsify import sparse_modules

__all__ = ["save", "load", "read", "packed_layer", "header_metadata", "SavedModel", "FileFormatError", "SkeletonMismatchError",
           "FILE_VERSION"]

FILE_VERSION = 2
READABLE_VERSIONS = (1, 2)
_KEY = "sparsecore"
_HEADER_CRC_KEY = "sparsecore_header_crc32"
_FIELDS = ("format", "version", "layers", "aliases", "slimmed", "crc32", "config", "extra", "torch", "sparsecore")
_VERSION_RE = re.compile(r"\d+(\.\d+)*[0-9A-Za-z.+_-]*")


class FileFormatError(ValueError):
    """The file is not a readable sparsecore model (foreign, truncated, corrupt or a newer version)."""


class SkeletonMismatchError(FileFormatError):
    """The file is sound but does not fit the model it is loaded into (another architecture or geometry)."""


@dataclass
class SavedModel:
    """What a file holds: the parsed header and the tensors by state-dict key."""

    header: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def _crc(t: torch.Tensor, version: int = FILE_VERSION) -> int:
    data = t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()
    if version == 1:
        return zlib.crc32(data)
    return zlib.crc32(data, zlib.crc32(f"{dtype_name(t.dtype)}:{list(t.shape)}".encode()))


def save(model: nn.Module, path: str | Path, config: SparsityConfig | None = None,
         extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (sparse layers packed) to ``path`` as safetensors + JSON header. Returns the path.

    ``config``: the ``SparsityConfig`` the model was sparsified with (kept in the header), or ``None``.
    ``extra``: JSON-able facts to keep with the weights (e.g. how to rebuild the model's skeleton).
    The file is written next to ``path`` under a temporary name and renamed into place, so a failed save
    leaves no partial file and any existing file intact. A new file gets the mode the umask gives
    (like any file the user writes); an overwritten file keeps its mode.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if config is not None and not isinstance(config, SparsityConfig):
        raise TypeError(f"config must be a SparsityConfig or None, got {type(config).__name__}"
                        + (" (build one with SparsityConfig(**d))" if isinstance(config, dict) else ""))
    if extra is not None:
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as e:
            raise TypeError(f"extra must be JSON-serialisable: {e}") from None
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot save to {path}: it is a directory; give a file name")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save to {path}: directory {path.parent} does not exist")

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
    _write_atomic(tensors, header_metadata(header), path)
    return path


def header_metadata(header: dict[str, Any]) -> dict[str, str]:
    """The safetensors metadata that stores ``header``: its JSON text and that text's CRC-32."""
    text = json.dumps(header)
    return {_KEY: text, _HEADER_CRC_KEY: str(zlib.crc32(text.encode()))}


def _write_atomic(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    """Write to a temporary file beside ``path``, then rename it over ``path``; errors name ``path``."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mode: 0o666 less the umask
        mode = stat.S_IMODE((path if path.is_file() else tmp).stat().st_mode)
        save_file(tensors, str(tmp), metadata=metadata)  # it writes a private (0600) file of its own and renames it
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None:
            raise type(e)(e.errno, f"cannot save to {path}: {e.strerror}") from None
        if isinstance(e, Exception):
            raise OSError(f"cannot save to {path}: {e}") from None
        raise


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
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise FileFormatError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    if _KEY not in meta:
        raise FileFormatError(f"{path} is a safetensors file but not a sparsecore model (no {_KEY!r} header)")
    text = meta[_KEY]
    if _HEADER_CRC_KEY in meta and meta[_HEADER_CRC_KEY] != str(zlib.crc32(text.encode())):
        raise FileFormatError(f"{path}: the sparsecore header fails its CRC-32 check (corrupt header)")
    try:
        header = json.loads(text)
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{path}: sparsecore header is not valid JSON: {e}") from None
    try:
        _check_header(header, _HEADER_CRC_KEY in meta)
    except FileFormatError as e:
        raise FileFormatError(f"{path}: {e}") from None
    version = header["version"]
    if set(header["crc32"]) != set(tensors):
        raise FileFormatError(f"{path}: tensors {sorted(set(tensors) ^ set(header['crc32']))[:8]} disagree with the header")
    for key, t in tensors.items():
        if _crc(t, version) != header["crc32"][key]:
            raise FileFormatError(f"{path}: tensor {key!r} fails its CRC-32 check (corrupt data, dtype or shape)")
    for key, target in header["aliases"].items():
        if target not in tensors or key in tensors:
            raise FileFormatError(f"{path}: alias {key!r} -> {target!r} does not point from a new key to a stored tensor")
        tensors[key] = tensors[target]
    return SavedModel(header, tensors)


def _check_header(header: Any, signed: bool) -> None:
    """Raise ``FileFormatError`` unless ``header`` has exactly the documented fields with valid values."""
    if not isinstance(header, dict) or header.get("format") != _KEY:
        raise FileFormatError(f"header does not declare format {_KEY!r}")
    version = header.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise FileFormatError(f"file version {version!r}, this sparsecore reads versions {list(READABLE_VERSIONS)}")
    if version >= 2 and not signed:
        raise FileFormatError(f"version {version} header lacks its CRC-32 ({_HEADER_CRC_KEY!r})")
    if set(header) != set(_FIELDS):
        raise FileFormatError(f"header fields {sorted(set(header) ^ set(_FIELDS))} missing or unknown")
    if not isinstance(header["layers"], dict):  # each entry is checked, naming its layer, by ``packed_layer``
        raise FileFormatError("header field 'layers' must be an object")
    for field, value_kind in (("aliases", str), ("crc32", int)):
        if not (isinstance(header[field], dict) and all(type(v) is value_kind for v in header[field].values())):
            raise FileFormatError(f"header field {field!r} must map names to {value_kind.__name__}")
    if type(header["slimmed"]) is not bool:
        raise FileFormatError(f"header field 'slimmed' must be true or false, got {header['slimmed']!r}")
    for field in ("torch", "sparsecore"):
        if not (isinstance(header[field], str) and _VERSION_RE.fullmatch(header[field])):
            raise FileFormatError(f"header field {field!r} must be a version string, got {header[field]!r}")
    config = header["config"]
    if config is not None:
        if version == 1 and isinstance(config, dict) and config.get("pattern") == "nm":
            config = {k: v for k, v in config.items() if k != "sparsity"}  # version 1 stored an unused 0.5
        try:
            SparsityConfig.from_json(config)
        except (TypeError, ValueError) as e:
            raise FileFormatError(f"header field 'config' is not a valid SparsityConfig: {e}") from None


def packed_layer(fqn: str, entry: Any, tensors: dict[str, torch.Tensor]) -> tuple[PackedWeight, list[str]]:
    """Validate one header layer entry and rebuild its packed weight; also returns the state-dict keys it used."""
    if not isinstance(entry, dict) or not isinstance(entry.get("packed"), dict):
        raise FileFormatError(f"layer {fqn!r}: header entry must be an object with a 'packed' object")
    if entry.get("type") not in ("linear", "conv2d"):
        raise FileFormatError(f"layer {fqn!r}: type must be 'linear' or 'conv2d', got {entry.get('type')!r}")
    allowed = {"type", "packed", "tensors", "backend"} | ({"in_channels", "conv"} if entry["type"] == "conv2d" else set())
    if set(entry) - allowed:
        raise FileFormatError(f"layer {fqn!r}: unknown header entry fields {sorted(set(entry) - allowed)}")
    if entry.get("backend", "auto") not in {b.value for b in Backend}:
        raise FileFormatError(f"layer {fqn!r}: unknown backend {entry.get('backend')!r}")
    kind = entry["packed"].get("kind")
    if kind not in FORMATS:
        raise FileFormatError(f"layer {fqn!r}: unknown packed format {kind!r}; known {sorted(FORMATS)}")
    names = entry.get("tensors")
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names) and len(set(names)) == len(names)):
        raise FileFormatError(f"layer {fqn!r}: header lacks its list of distinct tensor names")
    keys = [f"{fqn}.packed_{n}" if fqn else f"packed_{n}" for n in names]
    try:
        packed_tensors = {n: tensors[k] for n, k in zip(names, keys)}
    except KeyError as e:
        raise FileFormatError(f"layer {fqn!r}: missing tensor {e}") from None
    try:
        return FORMATS[kind].from_state(packed_tensors, entry["packed"]), keys
    except FormatError as e:
        raise FileFormatError(f"layer {fqn!r}: {e}") from None


def load(path: str | Path, model: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """Load a file written by ``save`` into ``model``, a skeleton of the same dense architecture.

    The skeleton's Linear/Conv2d layers named in the file become sparse (at every name a shared module
    has). For a file written from a channel-slimmed model (header ``"slimmed": true``), dense
    Linear/Conv2d/BatchNorm layers are narrowed to the file's shapes, so it loads into the unpruned
    skeleton; otherwise every shape must match. Layer types, shapes, conv geometry (stride, padding,
    dilation, groups) and every state-dict key are checked before the skeleton is touched: any failure
    raises ``FileFormatError`` (``SkeletonMismatchError`` when the file is sound but another
    architecture) and leaves ``model`` exactly as it was. Tied parameters of the skeleton stay tied.
    ``device``: where the result lives (default: the skeleton's device). Returns the loaded model
    (``model`` itself, or the sparse layer when the file holds one bare layer).

    >>> model = load("model.sparsecore.safetensors", MyModel())
    """
    from .io_fit import fit

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module skeleton, got {type(model).__name__}")
    saved = read(path)
    try:
        return fit(saved, model, device)
    except SkeletonMismatchError as e:
        raise SkeletonMismatchError(f"{path} does not fit this model: {e}") from None
    except FileFormatError as e:
        raise FileFormatError(f"{path}: {e}") from None
