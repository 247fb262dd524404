"""CPU benchmark of issue #12: sparse linear layers against dense and every CPU sparse peer, plus end to end.

    python -m bench.bench_cpu [--quick | --full] [--shapes 4096x4096,...] [--sparsities 50,70,90,95,2:4]
                              [--M 1,8,16] [--dtypes float32,bfloat16] [--reps 20] [--repeats 3]
                              [--sections kernels,csr,e2e] [--threads N] [--tag NAME] [--out-dir DIR]

Kernels (``cpu_kernels_*.{csv,md}``): ``y [M, N] = x [M, K] @ W^T`` with ``W`` magnitude-pruned (unstructured
at a sparsity, or 2:4). Providers (``bench.cpu_providers``): dense ``F.linear`` in the case's dtype (the
baseline), torch CSR / BSR, scipy CSR, sparse_dot_mkl, and sparsecore: every registered CPU-capable linear
backend of the format through ``SparseLinear`` with the backend forced (``sc_<backend>``) and the planner's
choice (``sc_auto``). Timing (``bench.cpu_stats``): per case, all providers round-robin, ``--repeats``
repeats of ``--reps`` samples, the median of the repeat medians with their min-max spread; threads = all
usable cores unless ``--threads``. Every row: ratio vs dense and vs the best peer, the weight bytes the
provider reads, the byte ceiling ``dense bytes / those bytes`` and the share of it reached
(``speedup_vs_best_dense / byte_ceiling``), CPU, cores, threads, torch, commit, date. Tables are rewritten
after each case, so a cut run keeps its rows; providers that cannot run are rows with the reason.

Presets: default, the headline set (M = 1 on the three shapes in fp32, 11008x4096 in bf16, M = 8/16 on
4096x4096 at 50-90%; about 8 minutes on 2 quiet cores with every section); ``--quick``: a few cases and small
models (minutes); ``--full``: every shape x sparsity x M x dtype (long: hours on 2 cores).
Sections ``csr`` (``bench.cpu_csr_overhead``) and ``e2e`` (``bench.cpu_e2e``) have their own tables.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

import sparsecore as sc
from sparsecore.pruning.magnitude import magnitude_layer_mask

from .common import BEST_DENSE_MS, PROVIDER, SPARSITY_PCT, SPEEDUP, TIME_MS, bench_parser, cpu_info, env_info, \
    slug, write_table
from .cpu_providers import Provider, all_providers
from .cpu_stats import Timing, time_repeated

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
SPARSITIES = ("50", "70", "90", "95", "2:4")


@dataclass(frozen=True)
class Case:
    n: int
    k: int
    m: int
    sparsity: str        # percent pruned ("70") or "n:m"
    dtype: torch.dtype

    @property
    def pattern(self) -> str:
        return "nm" if ":" in self.sparsity else "unstructured"

    @property
    def sparsity_pct(self) -> int:
        if self.pattern == "nm":
            n, m = (int(v) for v in self.sparsity.split(":"))
            return round(100 * (1 - n / m))
        return int(self.sparsity)

    def columns(self) -> dict:
        return {"N": self.n, "K": self.k, "M": self.m, "pattern": self.sparsity if self.pattern == "nm" else
                "unstructured", SPARSITY_PCT: self.sparsity_pct, "dtype": str(self.dtype).replace("torch.", "")}


def preset_cases(preset: str) -> list[Case]:
    """The cases of ``preset`` ("default", "quick", "full"); see the module docstring."""
    f32, bf16 = torch.float32, torch.bfloat16
    if preset == "quick":
        return ([Case(4096, 4096, 1, s, f32) for s in ("70", "90", "2:4")] + [Case(4096, 4096, 8, "70", f32)]
                + [Case(4096, 4096, 1, s, bf16) for s in ("70", "2:4")])
    if preset == "full":
        return grid(SHAPES, SPARSITIES, (1, 8, 16), (f32, bf16))
    return (grid(SHAPES, SPARSITIES, (1,), (f32,)) + grid(((11008, 4096),), SPARSITIES, (1,), (bf16,))
            + grid(((4096, 4096),), ("50", "70", "90"), (8, 16), (f32,)))


def grid(shapes, sparsities, ms, dtypes) -> list[Case]:
    return [Case(n, k, m, s, dt) for dt in dtypes for m in ms for (n, k) in shapes for s in sparsities]


def make_weight(case: Case, seed: int = 0) -> tuple[torch.Tensor, sc.PackedWeight]:
    """(masked dense weight, packed weight) for ``case``: a Gaussian weight, magnitude-pruned."""
    g = torch.Generator().manual_seed(seed + case.n * 7 + case.k)
    w = torch.randn(case.n, case.k, generator=g).to(case.dtype)
    if case.pattern == "nm":
        n, m = (int(v) for v in case.sparsity.split(":"))
        mask = magnitude_layer_mask(w, "nm", 0.0, n, m)
        packed = sc.pack(w, mask, "nm", n, m)
    else:
        mask = magnitude_layer_mask(w, "unstructured", case.sparsity_pct / 100)
        packed = sc.pack(w, mask, "unstructured")
    return packed.to_dense(), packed


def case_rows(case: Case, providers: Sequence[Provider], timings: dict[str, Timing], errors: dict[str, float],
              skipped: dict[str, str], env: dict) -> list[dict]:
    """One row per provider (timed ones, then the skipped ones with their reason); ratios from ``timings``."""
    dense_ms = min(timings[p.name].median_ms for p in providers if p.group == "dense")
    dense_bytes = next(p.nbytes for p in providers if p.group == "dense")
    peers = {p.name: timings[p.name].median_ms for p in providers if p.group == "peer"}
    best_peer = min(peers, key=peers.get) if peers else ""
    rows = []
    for p in providers:
        t = timings[p.name]
        speedup = dense_ms / t.median_ms
        ceiling = dense_bytes / p.nbytes
        rows.append({**case.columns(), PROVIDER: p.name, "group": p.group,
                     TIME_MS: t.median_ms, "time_min_ms": t.min_ms, "time_max_ms": t.max_ms,
                     "spread_pct": t.spread_pct, "repeats": len(t.medians_ms), "reps": t.reps,
                     BEST_DENSE_MS: dense_ms, SPEEDUP: speedup,
                     "best_peer": best_peer, "best_peer_time_ms": peers.get(best_peer, ""),
                     "speedup_vs_best_peer": peers[best_peer] / t.median_ms if best_peer else "",
                     "weight_bytes": p.nbytes, "dense_bytes": dense_bytes, "byte_ceiling": ceiling,
                     "pct_of_ceiling": 100 * speedup / ceiling, "max_abs_err": errors.get(p.name, ""),
                     "detail": p.detail, "note": t.note, **env})
    for name, reason in skipped.items():
        rows.append({**case.columns(), PROVIDER: name, "group": "skipped", "note": f"skipped: {reason}", **env})
    return rows


def run_case(case: Case, env: dict, *, reps: int, repeats: int, cap: float | None, plan_rep: int,
             log: Callable[[str], None] = print) -> list[dict]:
    """Build every provider for ``case``, check its output, time them interleaved; the case's rows."""
    w, packed = make_weight(case)
    x = torch.randn(case.m, case.k, generator=torch.Generator().manual_seed(case.m)).to(case.dtype)
    providers, skipped = all_providers(w, packed, x, plan_rep=plan_rep)
    ref = x.double() @ w.double().t()
    errors = {p.name: float((p.fn().double() - ref).abs().max()) for p in providers}
    for name, reason in skipped.items():
        log(f"    skip {name}: {reason}")
    timings = time_repeated({p.name: p.fn for p in providers}, repeats=repeats, reps=reps, cap=cap)
    rows = case_rows(case, providers, timings, errors, skipped, env)
    for r in rows:
        if r["group"] != "skipped":
            peer = r["speedup_vs_best_peer"]
            log(f"    {r[PROVIDER]:24s} {r[TIME_MS]:9.3f} ms [{r['time_min_ms']:.3f}-{r['time_max_ms']:.3f}]  "
                f"x{r[SPEEDUP]:5.2f} dense  " + (f"x{peer:5.2f} best peer  " if peer != "" else "")
                + f"{r['pct_of_ceiling']:5.1f}% of {r['byte_ceiling']:.2f}x ceiling  {r['detail']} {r['note']}")
    return rows


def run_kernels(cases: Sequence[Case], args: argparse.Namespace, log: Callable[[str], None] = print) -> list[dict]:
    env = {**cpu_info(), **env_info("cpu")}
    rows: list[dict] = []
    t0 = time.perf_counter()
    for i, case in enumerate(cases, 1):
        log(f"[{i}/{len(cases)} {time.perf_counter() - t0:6.0f}s] {case.n}x{case.k} M={case.m} {case.sparsity}"
            f"{'%' if case.pattern == 'unstructured' else ''} {case.columns()['dtype']}")
        rows += run_case(case, env, reps=args.reps, repeats=args.repeats, cap=args.cap, plan_rep=args.plan_rep,
                         log=log)
        path = write_table("cpu_kernels" + args.suffix, rows, "cpu", args.out_dir)  # after each case
    if cases:
        log(f"wrote {path}")
    return rows


def _parse_cases(args: argparse.Namespace, p: argparse.ArgumentParser) -> list[Case]:
    preset = "quick" if args.quick else ("full" if args.full else "default")
    if not (args.shapes or args.sparsities or args.M or args.dtypes):
        return preset_cases(preset)
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")] if args.shapes \
            else list(SHAPES)
        sparsities = args.sparsities.split(",") if args.sparsities else list(SPARSITIES)
        ms = [int(v) for v in args.M.split(",")] if args.M else [1]
        dtypes = [getattr(torch, d) for d in args.dtypes.split(",")] if args.dtypes else [torch.float32]
    except (ValueError, AttributeError) as e:
        p.error(f"bad --shapes/--sparsities/--M/--dtypes: {e}")
    for s in sparsities:
        if not (s.isdigit() and 0 < int(s) < 100) and not (":" in s and all(v.isdigit() for v in s.split(":"))):
            p.error(f"--sparsities takes percents (0-100 exclusive) or n:m, got {s!r}")
    return grid(shapes, sparsities, ms, dtypes)


def parser() -> argparse.ArgumentParser:
    p = bench_parser("bench.bench_cpu", __doc__.split("\n")[0], "a few cases and small models (minutes)")
    p.add_argument("--full", action="store_true", help="every shape x sparsity x M (1, 8, 16) x dtype (hours)")
    p.add_argument("--shapes", help="NxK list, e.g. 4096x4096,11008x4096 (overrides the preset's cases)")
    p.add_argument("--sparsities", help="e.g. 50,70,90,95,2:4")
    p.add_argument("--M", help="activation rows, e.g. 1,8,16")
    p.add_argument("--dtypes", help="float32,bfloat16")
    p.add_argument("--reps", type=int, default=20, help="samples per provider per repeat (default 20)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats per case (default 3)")
    p.add_argument("--cap", type=float, default=4.0,
                   help="providers slower than CAP x dense after repeat 1 skip the other repeats (0: never)")
    p.add_argument("--plan-rep", type=int, default=20, help="the planner's timing repetitions for sc_auto")
    p.add_argument("--sections", default="kernels,csr,e2e", help="any of kernels, csr, e2e")
    p.add_argument("--threads", type=int, help="torch threads (default: every usable core)")
    p.add_argument("--e2e-models", default="decoder_block,minilm", help="end-to-end models (decoder_block, minilm)")
    p.add_argument("--no-e2e-compile", dest="e2e_compile", action="store_false",
                   help="end-to-end rows: skip the torch.compile (inductor) rows of dense and sparse models")
    p.add_argument("--tag", default="", help="appended to the table names (keeps several runs' tables apart)")
    p.add_argument("--deepsparse-python", default="/work/venv-deepsparse/bin/python",
                   help="python of a venv with deepsparse==1.8.0 (optional peer; skipped with a row when absent)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if sections - {"kernels", "csr", "e2e"} or not sections:
        p.error(f"--sections takes kernels, csr, e2e; got {args.sections!r}")
    if args.reps < 1 or args.repeats < 1:
        p.error("--reps and --repeats must be >= 1")
    args.cap = args.cap or None
    args.suffix = ("_quick" if args.quick else "") + (f"_{slug(args.tag)}" if args.tag else "")
    cases = _parse_cases(args, p)
    os.environ.pop("TRITON_INTERPRET", None)  # Triton backends on CPU would time the interpreter: skipped
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or cpu_info()["cores"])
    print(f"CPU bench: {cpu_info()}; torch {torch.__version__}; {len(cases)} kernel cases; sections {sorted(sections)}")
    try:
        t0 = time.perf_counter()
        if "kernels" in sections:
            run_kernels(cases, args)
        if "csr" in sections:
            from .cpu_csr_overhead import run as run_csr
            run_csr(args)
        if "e2e" in sections:
            from .cpu_e2e import run as run_e2e
            run_e2e(args)
        print(f"done in {time.perf_counter() - t0:.0f} s")
    finally:
        torch.set_num_threads(threads)  # main() may run inside another process (tests)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
