"""Compile check for sm_90 (H100/H200), no GPU needed: ``python -m bench.compile_check``.

Compiles one representative config per kernel path with Triton's own ptxas, plus the prefill configs that
once failed to compile (``TritonGPUOptimizeDotOperands``; triton 3.6, the GPU image's) on odd shapes
(strides not divisible by 16), an error Triton's autotuner does not catch (it would have crashed a GPU
call). Checks each for spills and for tensor-core instructions where the path should have them; prints one
JSON line per case and exits 1 if any fails. ``tests/test_sm90_compile.py`` runs it in a subprocess (the
test process interprets Triton). ``python -m bench.ptx_counts`` covers every decode config.
"""
from __future__ import annotations

import json
import os
import sys

from .ptx_counts import compile_kernel, nm_spec, sell_spec, spmm_spec


def _conv(bm, bn, bk):
    import sparsecore.kernels.channel_conv as mod
    fn = mod._channel_conv_kernel.fn
    sig = {a: "i32" for a in fn.arg_names} | {"x_ptr": "*fp16", "w_ptr": "*fp16", "bias_ptr": "*fp16",
                                              "y_ptr": "*fp16", "in_idx_ptr": "*i32", "out_idx_ptr": "*i32",
                                              "fill_idx_ptr": "*i32"}
    const = dict(KH=3, KW=3, HAS_BIAS=True, DOT_FP32=False, IS_NHWC=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                 stride_xc=1, stride_wn=1)  # channels-last x, the backend's [kh, kw, n_in, n_out] weight
    aligned = ["x_ptr", "w_ptr", "bias_ptr", "y_ptr", "in_idx_ptr", "out_idx_ptr", "fill_idx_ptr", "stride_xb",
               "stride_xh", "stride_xw", "stride_wc", "stride_wr", "stride_ws", "stride_yb", "stride_yh", "stride_yw"]
    return fn, sig, const, aligned


def _nm(bm, bn, bk, even, dtype="*fp16", n=2, m=4):
    return nm_spec(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GATHER=False), n=n, m=m, even=even, dtype=dtype)


CASES = {  # name: (launch spec, warps, stages, tensor cores expected)
    "nm 2:4 prefill 64x64x64, partial tiles": (lambda: _nm(64, 64, 64, even=False), 8, 3, True),
    "nm 2:4 prefill 128x64x64 bf16, partial tiles": (lambda: _nm(128, 64, 64, False, "*bf16"), 8, 3, True),
    "nm 1:4 decode 16x32x128, whole tiles": (lambda: _nm(16, 32, 128, even=True, n=1), 4, 3, True),
    "nm 4:8 decode 16x16x128, partial tiles": (lambda: _nm(16, 16, 128, even=False, n=4, m=8), 4, 3, True),
    "spmm decode M=1, 32x128 tiles": (lambda: spmm_spec(1, 32, 128), 4, 2, False),
    "spmm tensor cores M=32, 32x128 tiles": (lambda: spmm_spec(32, 32, 128), 4, 2, True),
    "sell M=16 on x^T": (lambda: sell_spec(dict(BLOCK_M=16, BLOCK_J=32)), 8, 2, False),
    "channel_conv 3x3 64x64x32": (lambda: _conv(64, 64, 32), 4, 4, True),
}


def check(name: str) -> dict:
    """Compile case ``name``; returns its result with ``ok`` and, when not ok, ``why``."""
    spec, warps, stages, tensor_cores = CASES[name]
    try:
        res = compile_kernel(*spec(), 90, warps, stages)
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
