"""Host cost per call of each layer path: ``python -m bench.bench_overhead [--quick]``.

At decode sizes a GPU kernel can finish before Python has issued the next one; an eager model then runs
at the speed of its host code, and a sparse kernel's GPU-time gain is lost. This table says, per path,
how long one call takes to *issue* (``host_us``: ``sparsecore.timing.host_ms``, the GPU kept busy so
that no call waits; best of 5 round-robin medians) next to its GPU time (``gpu_us``: ``time_ms``, do_bench); ``launch_bound`` marks
rows where issuing takes longer than running. The planner weighs both the same way (eager:
``max(gpu, host)``; ``plan(..., cuda_graphs=True)``: GPU time alone).

Providers: ``nn.Linear`` / ``nn.Conv2d`` (dense, the yardstick), ``SparseLinear[<backend>]`` /
``SparseConv2d[<backend>]`` (a forced backend through the module: checks, dispatch, launch), and the
kernel functions called directly (``nm_matmul``, ``spmm``: their full argument checks included).

On a CPU the Triton kernels cannot be timed (the interpreter is a test vehicle), so the runs go through
``sparsecore.kernels._host.dry_launches``: each launch only evaluates its grid, and ``host_us`` is
sparsecore's own Python per call, *without* Triton's launcher; ``gpu_us`` is empty. CUDA rows include
everything.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable

import torch
from torch import nn

import sparsecore as sc
from sparsecore.kernels._host import dry_launches
from sparsecore.masks import keep_n_of_m
from sparsecore.timing import host_ms, time_ms

from .common import ERROR, Table, bench_parser, env_info, error_row

# (out, in, M) for linears; (C_in = C_out, H = W, batch) for the 3x3 conv. GPU: decode shapes.
GPU_LINEAR, GPU_CONV = (4096, 4096, 1), (256, 14, 1)
CPU_LINEAR, CPU_CONV = (256, 256, 1), (16, 8, 1)


def _linear_providers(n_out: int, k: int, dtype: torch.dtype, device: torch.device, g: torch.Generator
                      ) -> dict[str, tuple[nn.Module | Callable, str]]:
    from sparsecore.kernels.nm_matmul import nm_matmul
    from sparsecore.kernels.spmm import spmm

    lin = nn.Linear(k, n_out).to(dtype)  # stays on CPU: every provider below is built from it, then moved
    nm_mask = keep_n_of_m(torch.rand(n_out, k, generator=g), 2, 4)
    un_mask = torch.rand(n_out, k, generator=g) < 0.1
    out: dict[str, tuple] = {"nn.Linear": (copy.deepcopy(lin).to(device), "dense")}  # .to() moves in place
    backends = [("nm", nm_mask, "dense"), ("nm", nm_mask, "triton_nm"), ("unstructured", un_mask, "triton_spmm"),
                ("unstructured", un_mask, "triton_sell")]
    if device.type == "cuda":
        backends.append(("nm", nm_mask, "cusparselt"))
    for pattern, mask, backend in backends:
        mod = sc.SparseLinear.from_dense(lin, mask, pattern, backend=backend).to(device)
        out[f"SparseLinear[{backend}]"] = (mod, "2:4" if pattern == "nm" else "unstructured 90%")
    nm = sc.SparseLinear.from_dense(lin, nm_mask, "nm").to(device).packed
    un = sc.SparseLinear.from_dense(lin, un_mask, "unstructured").to(device).packed
    out["nm_matmul()"] = (lambda x: nm_matmul(x, nm.values, nm.positions, 2, 4), "2:4")
    out["spmm()"] = (lambda x: spmm(x, un.bitmap, un.values, un.tile_offsets, un.n, k=k), "unstructured 90%")
    return out


def _conv_providers(c: int, dtype: torch.dtype, device: torch.device, g: torch.Generator) -> dict[str, tuple]:
    conv = nn.Conv2d(c, c, 3, padding=1).to(dtype)
    keep_out = torch.randperm(c, generator=g) < c // 2
    keep_in = torch.randperm(c, generator=g) < c // 2
    mask = (keep_out[:, None] & keep_in[None, :])[:, :, None, None].expand_as(conv.weight).contiguous()
    out: dict[str, tuple] = {"nn.Conv2d": (copy.deepcopy(conv).to(device), "dense")}
    for backend in ("sliced_dense", "triton_channel"):
        mod = sc.SparseConv2d.from_dense(conv, mask, "channel", backend=backend).to(device)
        out[f"SparseConv2d[{backend}]"] = (mod, "channel 50%")
    return out


def run(device: torch.device, rep: int, table: Table | None = None) -> list[dict]:
    """Rows per (case, provider); each case is added to ``table`` once measured; a provider whose first call
    raises gets a row with the reason in ``error``."""
    g = torch.Generator().manual_seed(0)
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    (n_out, k, m_rows), (c, hw, batch) = (GPU_LINEAR, GPU_CONV) if cuda else (CPU_LINEAR, CPU_CONV)
    cases = [("linear", f"{n_out}x{k} M={m_rows}", _linear_providers(n_out, k, dtype, device, g),
              torch.randn(m_rows, k, generator=g).to(dtype).to(device)),
             ("conv3x3", f"{c}->{c} {hw}x{hw} batch={batch}", _conv_providers(c, dtype, device, g),
              torch.randn(batch, c, hw, hw, generator=g).to(dtype).to(device))]
    env, rows = env_info(device), []
    stubs = contextlib.nullcontext() if cuda else dry_launches()
    with torch.no_grad(), stubs:
        for op, shape, providers, x in cases:
            calls, case_rows, errors = {}, [], []
            for name, (fn, _) in providers.items():
                try:
                    fn(x)  # first call: compile / autotune / prepare, not timed
                    calls[name] = (lambda fn=fn: fn(x))
                except Exception as e:  # noqa: BLE001  (one provider's failure is one row, not a lost run)
                    print(f"  !! {op} {shape} {name}: {type(e).__name__}: {e}")
                    errors.append(error_row({"op": op, "shape": shape}, name, e, env))
            # Round-robin rounds, best median per provider: a noisy stretch of the machine hits all alike.
            host_rounds = [{name: host_ms(call, device, rep=rep) for name, call in calls.items()} for _ in range(5)]
            for name, (fn, sparsity) in providers.items():
                if name not in calls:
                    continue
                call = calls[name]
                host = min(r[name] for r in host_rounds) * 1e3
                gpu = time_ms(call, device) * 1e3 if cuda else None
                case_rows.append({"op": op, "shape": shape, "provider": name, "sparsity": sparsity,
                                  "dtype": str(dtype)[6:], "host_us": host, "gpu_us": gpu if gpu is not None else "",
                                  "launch_bound": "" if gpu is None else ("yes" if host > gpu else "no"),
                                  "triton_launch": "included" if cuda else "stubbed (CPU)", **env})
                print(f"  {op:8s} {shape:24s} {name:30s} host {host:8.1f} us"
                      + (f"  gpu {gpu:8.1f} us" if gpu is not None else ""))
            rows += case_rows + errors
            if table is not None:
                table.add(case_rows + errors)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser("bench.bench_overhead", __doc__.splitlines()[0], "fewer repetitions")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        print("no CUDA device: Triton launches are stubbed; host_us is sparsecore's own Python per call")
    table = Table("overhead", device, args.out_dir)
    rows = run(device, rep=30 if args.quick else 100, table=table)
    print(f"wrote {table.path}")
    return 1 if any(r.get(ERROR) for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
