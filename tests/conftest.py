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


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
