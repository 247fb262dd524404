"""The kernels compile for sm_90 (H100/H200) with Triton's own ptxas, no GPU needed: CI catches what the
interpreter cannot (a config that fails in a compiler pass, spills, no tensor cores). The compile runs in a
subprocess (``sparsecore.compile_check``) because this process may have imported the kernels interpreted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsecore.compile_check import CASES, loop_bodies, opcode

ROOT = Path(__file__).resolve().parents[1]  # the checkout under test, first on the child's sys.path


def test_ptx_loop_parser_finds_the_loop_body():
    ptx = """
    mov.u32 %r1, 0;
$L__BB0_2:                              // =>This Inner Loop Header: Depth=1
    ld.global.v4.b32 {%r2, %r3, %r4, %r5}, [%rd1];
    fma.rn.f32 %f1, %f2, %f3, %f1;
    @%p1 bra $L__BB0_4;
    add.s32 %r1, %r1, 1;
    setp.lt.s32 %p2, %r1, %r9;
    @%p2 bra 	$L__BB0_2;
$L__BB0_4:
    ret;
"""
    (body,) = loop_bodies(ptx)
    assert [opcode(x) for x in body] == ["ld", "fma", "bra", "add", "setp"]


try:
    from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    HAVE_PTXAS = True
except ImportError:  # a Triton build without the NVIDIA backend
    HAVE_PTXAS = False
needs_ptxas = pytest.mark.skipif(not HAVE_PTXAS, reason="Triton's NVIDIA backend (ptxas) is not installed")


@pytest.fixture(scope="module")
def results() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "sparsecore.compile_check"], capture_output=True, text=True,
                          env=env, timeout=600, cwd=ROOT)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"compile_check printed nothing (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return {r["case"]: r for r in lines}


@needs_ptxas
@pytest.mark.parametrize("name", list(CASES))
def test_compiles_for_sm90_without_spills(results, name):
    r = results[name]
    assert r["ok"], f"{name}: {r['why']}"
    assert r["loop_instr"] > 0


@needs_ptxas
def test_compile_kernel_counts_a_sell_config():
    """In a child process: this one imported the kernels under TRITON_INTERPRET=1, which cannot compile."""
    script = """
import json
from sparsecore.compile_check import compile_kernel
from sparsecore.kernels.sell_matmul import compile_spec
fn, sig, const, aligned = compile_spec(dict(BLOCK_M=1, BLOCK_J=32))
print(json.dumps(compile_kernel(fn, sig, {**const, "HAS_BIAS": False}, aligned, 90, 2, 2)))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                         cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    assert res["loop_instr"] > 10 and res["regs"] and res["spill_bytes"] == 0
