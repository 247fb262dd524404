"""Resident bytes of a model: what it holds in memory between calls.

Parameters, buffers (persistent or not) and the sparse layers' prepared backend states (a dense copy, CSR
arrays, ...), each storage counted once however many tensors view it.

>>> sc.resident_bytes(model)   # dense model: parameters + buffers
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["resident_bytes", "object_bytes"]


def _tensor_bytes(obj: Any, seen: set[int]) -> int:
    if isinstance(obj, torch.Tensor):
        if obj.layout == torch.sparse_csr:
            return sum(_tensor_bytes(t, seen) for t in (obj.crow_indices(), obj.col_indices(), obj.values()))
        if obj.layout != torch.strided:
            raise TypeError(f"cannot count a {obj.layout} tensor's bytes")
        key = obj.untyped_storage().data_ptr()
        if key in seen or obj.untyped_storage().nbytes() == 0:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(o, seen) for o in obj.values())
    if hasattr(obj, "__dict__"):  # a packed weight or a backend's state object
        return sum(_tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def object_bytes(obj: Any) -> int:
    """Bytes of the tensors ``obj`` holds (a tensor, container, packed weight or backend state), each storage once.

    >>> object_bytes(sparse_layer.prepared(impl))   # what one backend's prepared state costs
    """
    return _tensor_bytes(obj, set())


def resident_bytes(model: nn.Module) -> int:
    """Bytes ``model`` holds: parameters, buffers and sparse layers' prepared states, shared storage once."""
    from .modules import _SparseBase

    if not isinstance(model, nn.Module):
        raise TypeError(f"resident_bytes takes an nn.Module, got {type(model).__name__}")
    seen: set[int] = set()
    total = sum(_tensor_bytes(t, seen) for t in list(model.parameters()) + list(model.buffers()))
    for mod in model.modules():
        if isinstance(mod, _SparseBase):
            total += _tensor_bytes(mod.prepared_states(), seen)
    return total
