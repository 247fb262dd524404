"""Shared benchmark plumbing: column vocabulary, environment record, timing, result tables.

Every row carries device, torch and triton versions, git commit and date. On CUDA, timing uses
``triton.testing.do_bench`` (median of many runs, L2 flushed); on CPU a warmed-up median of
``time.perf_counter`` runs. Tables go to ``bench/results/<name>_<device-slug>.{csv,md}``.

Column vocabulary, the same in every kernel and model table (``bench.plots`` reads only these names):

* ``provider``               what was timed: a kernel provider (``dense``, ``torch_csr``, ...) or a model
                             variant (``dense``, ``2:4``, ``slimmed``, ...);
* ``time_ms``                its median latency in milliseconds;
* ``best_dense_time_ms``     the fastest dense provider of the same case, measured in the same run;
* ``speedup_vs_best_dense``  ``best_dense_time_ms / time_ms`` (> 1: faster than every dense baseline);
  a speedup against another baseline carries that baseline in its name
  (e.g. ``speedup_vs_dense_same_layout``);
* ``M``                      activation rows of a matmul (tokens x batch); ``batch`` for models and convs;
* ``sparsity_pct``           percent of weights pruned (nominal for a model variant: the config's share;
                             N:M gives ``100 * (1 - n/m)``; channel pruning the share of output channels);
* ``GB_per_s``, ``TFLOP_per_s``  bytes moved / time and dense-equivalent ``2 * M * N * K`` / time (kernels);
* ``max_abs_err``            against a dense reference of higher precision (the table's docstring says which);
* ``device``, ``torch``, ``triton``, ``commit``, ``date``  from ``env_info`` (``ENV_COLUMNS``).
"""
from __future__ import annotations

import argparse
import csv
import os
import datetime as _dt
import platform
import re
import subprocess
from pathlib import Path
from typing import Iterable, Sequence

import torch

from sparsecore.timing import time_ms  # noqa: F401  (re-exported for the benchmarks)

RESULTS = Path(__file__).resolve().parent / "results"

PROVIDER = "provider"
TIME_MS = "time_ms"
BEST_DENSE_MS = "best_dense_time_ms"
SPEEDUP = "speedup_vs_best_dense"
M_ROWS = "M"
BATCH = "batch"
SPARSITY_PCT = "sparsity_pct"
ENV_COLUMNS = ("device", "torch", "triton", "commit", "date")


def bench_parser(module: str, description: str, quick_help: str) -> argparse.ArgumentParser:
    """The options every bench takes, ``--quick`` and ``--out-dir DIR``; the bench adds its own."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out-dir", type=Path, default=None, help="where the tables go (default bench/results)")
    return parser


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def cpu_info() -> dict[str, object]:
    """``cpu`` (model name from /proc/cpuinfo, else the platform's), ``cores`` (usable by this process), ``threads``
    (torch's intra-op threads now): the CPU columns of a CPU table, beside ``env_info``'s."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return {"cpu": model, "cores": cores, "threads": torch.get_num_threads()}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def env_info(device: torch.device | str) -> dict[str, str]:
    """The columns every result row carries (``ENV_COLUMNS``)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
    }


def best_dense_ms(times: dict[str, float], dense: Sequence[str]) -> float:
    """The fastest of the dense providers in ``times`` (``{provider: ms}``); raises when none was timed."""
    measured = [times[d] for d in dense if d in times]
    if not measured:
        raise ValueError(f"no dense baseline among {sorted(times)} (expected one of {list(dense)})")
    return min(measured)


def speedup_columns(ms: float, best_dense: float) -> dict[str, float]:
    """``time_ms``, ``best_dense_time_ms`` and ``speedup_vs_best_dense`` of a provider that took ``ms``."""
    return {TIME_MS: ms, BEST_DENSE_MS: best_dense, SPEEDUP: best_dense / ms}


def kernel_row(case: dict, provider: str, ms: float, best_dense: float, *, moved_bytes: int,
               dense_flop: float, max_abs_err: float, env: dict[str, str], **extra: object) -> dict:
    """One kernel-table row: ``case`` columns (shape, ``M``, dtype, ...), then the shared vocabulary.

    ``moved_bytes``: weight bytes as this provider stores them plus activations in and out, so
    ``GB_per_s`` is the achieved bandwidth; ``dense_flop``: ``2 * M * N * K`` whatever the sparsity, so
    ``TFLOP_per_s`` is comparable across providers. ``extra`` columns go before the env columns.
    """
    return {**case, PROVIDER: provider, **speedup_columns(ms, best_dense),
            "GB_per_s": moved_bytes / ms / 1e6, "TFLOP_per_s": dense_flop / ms / 1e9,
            "max_abs_err": max_abs_err, **extra, **env}


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def write_table(name: str, rows: Iterable[dict], device: torch.device | str, out_dir: Path | None = None) -> Path:
    """Write rows to ``<out_dir>/<name>_<device-slug>.csv`` and ``.md``; returns the markdown path."""
    rows = list(rows)
    if not rows:
        raise ValueError(f"no rows to write for {name}")
    out_dir = Path(out_dir) if out_dir is not None else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{name}_{slug(device_name(device))[:40]}"
    cols = list(rows[0].keys())
    for r in rows[1:]:
        cols += [c for c in r if c not in cols]
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    md = stem.with_suffix(".md")
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    md.write_text("\n".join(lines) + "\n")
    return md
