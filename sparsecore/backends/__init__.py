"""Execution backends for sparse layers; see ``registry`` for the contracts."""
from .registry import (REGISTRY, Backend, BackendImpl, BackendUnavailable, ConvParams, candidates, register,
                       resolve, triton_why_not)
from . import dense, nm, unstructured, channel  # noqa: F401  (registration side effects)

__all__ = ["REGISTRY", "Backend", "BackendImpl", "BackendUnavailable", "ConvParams", "candidates", "register",
           "resolve", "triton_why_not"]
