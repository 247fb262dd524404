"""Execution backends for sparse layers; see ``registry`` for the declaration and the contracts.

Every module of this package other than ``registry`` is a backend file and is imported by ``discover``
(``pkgutil``): adding a backend is adding one file that calls ``register(BackendImpl(...))``.
"""
from __future__ import annotations

import importlib
import pkgutil

from .registry import (ALL_FORMATS, AUTO, REGISTRY, Backend, BackendImpl, BackendUnavailable, ConvParams,
                       backend_names, candidates, implementations, register, resolve, triton_why_not,
                       unregister)

__all__ = ["ALL_FORMATS", "AUTO", "REGISTRY", "Backend", "BackendImpl", "BackendUnavailable", "ConvParams",
           "backend_names", "candidates", "discover", "implementations", "register", "resolve", "triton_why_not",
           "unregister"]

_discovered = False


def discover() -> None:
    """Import every backend module of this package once (their ``register`` calls declare them)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name != "registry" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


discover()
