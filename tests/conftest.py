"""Test set-up: Triton runs on CPU through its interpreter unless a GPU is present.

TRITON_INTERPRET must be set before any kernel module (and so triton.jit) is imported, which is why
it is set here, at the top of the first file pytest loads. It is process-wide, so one run either
interprets or compiles: tests marked ``interpreter`` (Triton kernels on CPU tensors) run where it is
set, i.e. on CPU-only machines and in CI; tests marked ``gpu`` (compiled kernels on CUDA tensors) run
where a GPU is present and it is not. On a GPU machine, ``TRITON_INTERPRET=1 python -m pytest -q``
runs the interpreter half.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from helpers import poisoned, seeded  # noqa: E402,F401  (re-exported fixtures)


@pytest.fixture(autouse=True)
def _private_plan_cache(monkeypatch, tmp_path_factory):
    """Plans made during tests go to a throw-away folder, never to the user's ~/.cache/sparsecore."""
    monkeypatch.setenv("SPARSECORE_CACHE_DIR", str(tmp_path_factory.mktemp("plan-cache")))


def pytest_collection_modifyitems(config, items):
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU and compiled kernels (TRITON_INTERPRET unset)")
    skip_interp = pytest.mark.skip(reason="runs Triton on CPU tensors: needs TRITON_INTERPRET=1 "
                                          "(set automatically without a GPU)")
    for item in items:
        if "gpu" in item.keywords:
            if interpreted or not torch.cuda.is_available():
                item.add_marker(skip_gpu)
        elif "interpreter" in item.keywords and not interpreted:
            item.add_marker(skip_interp)
