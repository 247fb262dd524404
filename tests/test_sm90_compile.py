"""The kernels compile for sm_90 (H100/H200) with Triton's own ptxas, no GPU needed: CI catches what the
interpreter cannot (a config that fails in a compiler pass, spills, no tensor cores). The compile runs in a
subprocess (``bench.compile_check``) because this process may have imported the kernels interpreted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.compile_check import CASES

try:
    from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
except ImportError:  # a Triton build without the NVIDIA backend
    pytest.skip("Triton's NVIDIA backend (ptxas) is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def results() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.compile_check"], capture_output=True, text=True, env=env,
                          timeout=600, cwd=Path(__file__).resolve().parents[1])  # `bench` lives at the repo root
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"compile_check printed nothing (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return {r["case"]: r for r in lines}


@pytest.mark.parametrize("name", list(CASES))
def test_compiles_for_sm90_without_spills(results, name):
    r = results[name]
    assert r["ok"], f"{name}: {r['why']}"
    assert r["loop_instr"] > 0
