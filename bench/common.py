"""Shared benchmark plumbing: environment record, timing, result tables.

Every row carries device, torch and triton versions, git commit and date. On CUDA, timing uses
``triton.testing.do_bench`` (median of many runs, L2 flushed); on CPU a warmed-up median of
``time.perf_counter`` runs. Tables go to ``bench/results/<name>_<device-slug>.{csv,md}``.
"""
from __future__ import annotations

import csv
import datetime as _dt
import platform
import re
import subprocess
from pathlib import Path
from typing import Iterable

import torch

from sparsecore.timing import time_ms  # noqa: F401  (re-exported for the benchmarks)

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


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
    """The columns every result row carries."""
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
