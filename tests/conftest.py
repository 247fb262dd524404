"""Test set-up: Triton runs on CPU through its interpreter unless a GPU is present.

TRITON_INTERPRET must be set before any kernel module (and so triton.jit) is imported, which is why
it is set here, at the top of the first file pytest loads.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from helpers import seeded  # noqa: E402,F401  (re-exported fixture)


@pytest.fixture(autouse=True)
def _private_plan_cache(monkeypatch, tmp_path_factory):
    """Plans made during tests go to a throw-away folder, never to the user's ~/.cache/sparsecore."""
    monkeypatch.setenv("SPARSECORE_CACHE_DIR", str(tmp_path_factory.mktemp("plan-cache")))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
