"""Compile check for sm_90 (H100/H200), no GPU needed: ``python -m bench.compile_check``.

The check lives in the library (``sparsecore.compile_check``, with each kernel's launch spec beside the
kernel); this entry point runs it from the benchmark folder like the other offline kernel tools.
"""
from sparsecore.compile_check import CASES, check, main

__all__ = ["CASES", "check", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
