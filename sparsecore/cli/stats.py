"""Per-layer statistics of packed weights and of saved files: format, pattern, sparsity, bytes."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch


def kept(p) -> int:
    """Stored (kept) weight entries of a PackedWeight, from its structure (other formats: non-zeros)."""
    if hasattr(p, "nnz"):
        return int(p.nnz)
    numel = math.prod(p.shape)
    if p.kind == "nm":
        return numel // p.m * p.n
    if p.kind == "channel":
        return p.n_out * p.n_in * math.prod(p.shape[2:])
    return int(torch.count_nonzero(p.to_dense()))


def pattern(p) -> str:
    """The pattern of a PackedWeight in words: ``2:4``, ``out 8/16 in 4/8``; other formats: their kind."""
    if p.kind == "nm":
        return f"{p.n}:{p.m}"
    if p.kind == "channel":
        return f"out {p.n_out}/{p.shape[0]} in {p.n_in}/{p.shape[1]}"
    return p.kind


def layer_stats(fqn: str, op: str, p) -> dict[str, Any]:
    """One row of the per-layer report for PackedWeight ``p``."""
    from ..formats.base import dtype_name

    numel = math.prod(p.shape)
    return {"layer": fqn, "type": op, "format": p.kind, "pattern": pattern(p), "shape": list(p.shape),
            "dtype": dtype_name(p.dtype), "sparsity": 1.0 - kept(p) / numel if numel else 0.0,
            "packed_bytes": int(p.nbytes), "dense_bytes": int(p.dense_nbytes),
            "ratio": p.dense_nbytes / p.nbytes if p.nbytes else float("inf")}


def file_report(path: str | Path) -> dict[str, Any]:
    """Per-layer and total statistics of a saved file, from the file alone (no model needed)."""
    from ..io import FileFormatError, packed_layer, read

    saved = read(path)
    layers, packed_keys = [], set()
    for fqn, entry in saved.header["layers"].items():
        try:
            packed, keys = packed_layer(fqn, entry, saved.tensors)
        except FileFormatError as e:
            raise FileFormatError(f"{path}: {e}") from None
        packed_keys.update(keys)
        layers.append(layer_stats(fqn, entry["type"], packed))
    aliases = saved.header["aliases"]
    other = sum(t.numel() * t.element_size() for k, t in saved.tensors.items()
                if k not in packed_keys and k not in aliases)
    packed_total = sum(r["packed_bytes"] for r in layers)
    dense_total = sum(r["dense_bytes"] for r in layers)
    return {"file": str(path), "config": saved.header.get("config"), "extra": saved.header.get("extra"),
            "layers": layers,
            "totals": {"sparse_layers": len(layers), "packed_bytes": packed_total, "dense_bytes": dense_total,
                       "ratio": dense_total / packed_total if packed_total else float("nan"),
                       "other_bytes": other, "model_bytes": packed_total + other,
                       "dense_model_bytes": dense_total + other}}
