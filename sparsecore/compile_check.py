"""Compile check for NVIDIA targets with Triton's own ptxas, no GPU needed: ``python -m sparsecore.compile_check``.

Compiles one representative config per kernel path for sm_90 (H100/H200), plus prefill configs on odd shapes
(strides not divisible by 16) where Triton's ``TritonGPUOptimizeDotOperands`` pass can fail, an error the
autotuner does not catch. Checks each for spills and for tensor-core instructions where the path should have
them; prints one JSON line per case and exits 1 if any fails. Each kernel's launch spec (``compile_spec``)
sits beside the kernel in ``sparsecore/kernels/``; ``compile_kernel`` is also what ``bench.ptx_counts``
counts loop instructions with. Run it without ``TRITON_INTERPRET`` (it compiles, it does not interpret);
``tests/test_sm90_compile.py`` runs it in a subprocess for that reason.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from typing import Callable

__all__ = ["CASES", "check", "compile_kernel", "loop_bodies", "opcode", "main"]

_ALIGNED = "tt.divisibility"


def compile_kernel(fn, signature: dict[str, str], constexprs: dict, aligned: list[str], arch: int,
                   num_warps: int, num_stages: int) -> dict:
    """Compile ``fn`` (a JITFunction) for ``sm_<arch>``; returns registers, spills and the main loop's counts."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not isinstance(fn, triton.runtime.JITFunction):  # imported under TRITON_INTERPRET=1: recompile its source
        fn = triton.runtime.JITFunction(fn.fn)
    names = fn.arg_names
    sig = {n: ("constexpr" if n in constexprs else signature[n]) for n in names}
    attrs = {(names.index(n),): [[_ALIGNED, 16]] for n in aligned}
    log = io.StringIO()
    # ptxas -v prints registers and spills, and only when it runs: compile into a fresh cache every time.
    env = {"TRITON_DUMP_PTXAS_LOG": "1", "TRITON_CACHE_DIR": tempfile.mkdtemp(prefix="compile_check_")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                                      target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": num_warps, "num_stages": num_stages})
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(env["TRITON_CACHE_DIR"], ignore_errors=True)
    text = log.getvalue()
    regs = re.findall(r"Used (\d+) registers", text)
    spill = re.findall(r"(\d+) bytes spill stores", text)
    ptx = compiled.asm["ptx"]
    loop = max(loop_bodies(ptx), key=len, default=[])
    kinds = Counter(opcode(line) for line in loop)
    return {"regs": int(regs[-1]) if regs else "", "spill_bytes": int(spill[-1]) if spill else "",
            "loop_instr": len(loop), "loop_int": sum(map(is_integer_op, loop)),
            "tensor_core": bool(re.search(r"\b(w?gmma|mma)\.", ptx)),
            "top_ops": " ".join(f"{k}:{v}" for k, v in kinds.most_common(6))}


_INT_OPS = {"add", "sub", "mul", "mad", "and", "or", "xor", "not", "shl", "shr", "setp", "selp", "min", "max", "popc",
            "bfe", "bfi", "prmt", "lop3", "neg", "abs"}


def is_integer_op(line: str) -> bool:
    """An integer/logic/compare/select instruction: on H100 these share 64 lanes per SM per clock (FP32 has 128)."""
    parts = line.split()
    full = parts[1] if parts[0].startswith("@") and len(parts) > 1 else parts[0]
    op, *suffixes = full.split(".")
    return op in _INT_OPS and not any(t in ("f16", "f16x2", "bf16", "bf16x2", "f32", "f64") for t in suffixes)


def opcode(line: str) -> str:
    """The PTX opcode of an instruction line, predicate and type suffixes dropped."""
    parts = line.split()
    op = parts[1] if parts[0].startswith("@") and len(parts) > 1 else parts[0]
    return op.split(".")[0]


def loop_bodies(ptx: str) -> list[list[str]]:
    """Instruction lines between a label and a later branch back to it."""
    lines = [line.strip() for line in ptx.splitlines()]
    labels = {line.split(":")[0]: i for i, line in enumerate(lines) if re.match(r"^\$L__\w+:", line)}
    bodies = []
    for i, line in enumerate(lines):
        m = re.match(r"^(@%p\d+\s+)?bra(\.uni)?\s+(\$L__\w+);", line)
        if m and labels.get(m.group(3), i) < i:
            bodies.append([x for x in lines[labels[m.group(3)]:i]
                           if x and not x.startswith(("$", "//", "{", "}", "."))])
    return bodies


def _nm(bm: int, bn: int, bk: int, even: bool, dtype: str = "*fp16", n: int = 2, m: int = 4) -> tuple:
    from .kernels.nm_matmul import compile_spec
    return compile_spec(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GATHER=False), n=n, m=m, even=even, dtype=dtype)


def _spmm(block_m: int, tile_n: int, tile_k: int) -> tuple:
    from .kernels.spmm import compile_spec
    return compile_spec(block_m, tile_n, tile_k)


def _sell(block_m: int, block_j: int) -> tuple:
    from .kernels.sell_matmul import compile_spec
    return compile_spec(dict(BLOCK_M=block_m, BLOCK_J=block_j))


def _conv(bm: int, bn: int, bk: int) -> tuple:
    from .kernels.channel_conv import compile_spec
    return compile_spec(bm, bn, bk)


CASES: dict[str, tuple[Callable[[], tuple], int, int, bool]] = {  # name: (spec, warps, stages, tensor cores)
    "nm 2:4 prefill 64x64x64, partial tiles": (lambda: _nm(64, 64, 64, even=False), 8, 3, True),
    "nm 2:4 prefill 128x64x64 bf16, partial tiles": (lambda: _nm(128, 64, 64, False, "*bf16"), 8, 3, True),
    "nm 1:4 decode 16x32x128, whole tiles": (lambda: _nm(16, 32, 128, even=True, n=1), 4, 3, True),
    "nm 4:8 decode 16x16x128, partial tiles": (lambda: _nm(16, 16, 128, even=False, n=4, m=8), 4, 3, True),
    "spmm decode M=1, 32x128 tiles": (lambda: _spmm(1, 32, 128), 4, 2, False),
    "spmm tensor cores M=32, 32x128 tiles": (lambda: _spmm(32, 32, 128), 4, 2, True),
    "sell M=16 on x^T": (lambda: _sell(16, 32), 8, 2, False),
    "channel_conv 3x3 64x64x32": (lambda: _conv(64, 64, 32), 4, 4, True),
}


def check(name: str, arch: int = 90) -> dict:
    """Compile case ``name`` for ``sm_<arch>``; returns its result with ``ok`` and, when not ok, ``why``."""
    spec, warps, stages, tensor_cores = CASES[name]
    try:
        res = compile_kernel(*spec(), arch, warps, stages)
    except Exception as e:  # noqa: BLE001 -- a compiler failure is the finding
        return {"case": name, "ok": False, "why": f"{type(e).__name__}: {str(e).splitlines()[-1][:300]}"}
    why = []
    if res["spill_bytes"] not in (0, ""):
        why.append(f"{res['spill_bytes']} B spilled")
    if res["tensor_core"] != tensor_cores:
        why.append(f"tensor cores {res['tensor_core']}, expected {tensor_cores}")
    return {"case": name, "ok": not why, "why": "; ".join(why), "regs": res["regs"],
            "loop_instr": res["loop_instr"]}


def main(argv: list[str] | None = None) -> int:
    """Run the named cases (all by default); one JSON line each; exit status 1 if any fails."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: this compiles the kernels, it does not interpret them", file=sys.stderr)
        return 2
    names = (argv if argv is not None else sys.argv[1:]) or list(CASES)
    results = [check(n) for n in names]
    for r in results:
        print(json.dumps(r))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
