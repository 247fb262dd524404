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
* ``error``                  empty, or why this provider has no timing in this case (``error_row``: it raised,
                             or ``not run: <reason>`` where it does not apply);
* ``device``, ``torch``, ``triton``, ``commit``, ``date``  from ``env_info`` (``ENV_COLUMNS``, always last).

Tables are rewritten after every case (``Table``), so a run cut off by a time limit keeps what finished.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import functools
import hashlib
import io
import os
import platform
import re
import subprocess
import sys
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
ERROR = "error"
NOT_RUN = "not run: "  # prefix of an ``error`` that says why a provider does not apply (not a failure)


def bench_parser(module: str, description: str, quick_help: str) -> argparse.ArgumentParser:
    """The options every bench takes, ``--quick`` and ``--out-dir DIR``; the bench adds its own."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out-dir", type=Path, default=None, help="where the tables go (default bench/results)")
    return parser


def shapes_arg(text: str) -> list[tuple[int, int]]:
    """``"4096x4096,11008x4096"`` -> ``[(4096, 4096), (11008, 4096)]`` (N x K, i.e. out x in)."""
    try:
        shapes = [tuple(int(v) for v in part.lower().split("x")) for part in text.split(",") if part.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected shapes as NxK[,NxK...] with positive sizes, got {text!r}")
    return shapes  # type: ignore[return-value]


def ints_arg(text: str) -> list[int]:
    """``"1,4,16"`` -> ``[1, 4, 16]`` (positive integers)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,4,16, got {text!r}")
    return values


def sparsities_arg(text: str) -> list[float]:
    """``"50,70,90"`` (percent) or ``"0.5,0.9"`` (fractions) -> ``[0.5, 0.7, 0.9]``."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    values = [v / 100 if v > 1 else v for v in values]
    if not values or not all(0 <= v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected sparsities in [0, 100) percent, like 50,90, got {text!r}")
    return values


def names_arg(choices: Sequence[str]):
    """An argparse type for a comma-separated subset of ``choices``."""
    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        bad = [n for n in names if n not in choices]
        if not names or bad:
            raise argparse.ArgumentTypeError(f"unknown {bad or text!r}; choose from {', '.join(choices)}")
        return names
    return parse


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


# Source files whose content names the code when there is no git repository (e.g. a working-tree copy).
_SOURCE_GLOBS = ("pyproject.toml", "sparsecore/**/*.py", "kernels/**/*.py", "kernels/**/*.cpp", "kernels/**/*.h",
                 "bench/*.py", "bench/*.sh")


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10)


def source_digest(root: Path | None = None) -> str:
    """``files-<12 hex>``: sha256 over the relative paths and bytes of the sources (``_SOURCE_GLOBS``)."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted({f for g in _SOURCE_GLOBS for f in root.glob(g) if f.is_file()}):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return "files-" + h.hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    """The code a row was measured with: ``$SPARSECORE_COMMIT`` if set (a copy without ``.git``, such as the
    device tool's, is told the commit this way), else ``git rev-parse --short HEAD`` (``-dirty`` with
    uncommitted changes to tracked files), else ``source_digest()`` with a warning on stderr saying so."""
    override = os.environ.get("SPARSECORE_COMMIT", "").strip()
    if override:
        return override
    try:
        head = _git("rev-parse", "--short", "HEAD")
        if head.returncode == 0:
            dirty = _git("status", "--porcelain", "--untracked-files=no").stdout.strip()
            return head.stdout.strip() + ("-dirty" if dirty else "")
        why = (head.stderr.strip().splitlines() or ["git failed"])[-1]
    except (OSError, subprocess.SubprocessError) as e:
        why = f"{type(e).__name__}: {e}"
    digest = source_digest()
    print(f"commit column: no git commit here ({why}); recording {digest}, a hash of the source files; "
          f"set SPARSECORE_COMMIT to record the commit instead", file=sys.stderr)
    return digest


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


def error_row(case: dict, provider: str, error: BaseException | str, env: dict[str, str]) -> dict:
    """The row of a provider that failed (or could not run) on ``case``: empty timings, the reason in
    ``error``. A bench records it and carries on, so one provider's failure costs one row, not the run."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
    return {**case, PROVIDER: provider, TIME_MS: "", BEST_DENSE_MS: "", SPEEDUP: "", ERROR: text[:300], **env}


def failed(rows: Iterable[dict], providers: Sequence[str]) -> list[dict]:
    """The rows of ``providers`` that carry an error: a bench exits non-zero when its own providers failed."""
    return [r for r in rows if r.get(PROVIDER) in providers and r.get(ERROR) and not r[ERROR].startswith(NOT_RUN)]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_table(name: str, rows: Iterable[dict], device: torch.device | str, out_dir: Path | None = None) -> Path:
    """Write rows to ``<out_dir>/<name>_<device-slug>.csv`` and ``.md``; returns the markdown path.

    Columns are the union over rows in first-seen order, ``error`` and the env columns last. Each file is
    replaced in one rename, so a reader (or a run killed mid-write) sees the previous table or the new one,
    never half of one.
    """
    rows = list(rows)
    if not rows:
        raise ValueError(f"no rows to write for {name}")
    out_dir = Path(out_dir) if out_dir is not None else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{name}_{slug(device_name(device))[:40]}"
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    last = (ERROR, *ENV_COLUMNS)
    cols = [c for c in cols if c not in last] + [c for c in last if c in cols]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    _atomic_write(stem.with_suffix(".csv"), buf.getvalue())
    md = stem.with_suffix(".md")
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")).replace("|", "/") for c in cols) + " |" for r in rows]
    _atomic_write(md, "\n".join(lines) + "\n")
    return md


class Table:
    """A result table written again after every ``add``: a bench cut off by a time limit keeps every case
    that finished. ``path``: the markdown file, once a row was added.

    >>> table = Table("spmm", device, out_dir)
    >>> for case in cases: table.add(rows_of(case))
    """

    def __init__(self, name: str, device: torch.device | str, out_dir: Path | None = None) -> None:
        self.name, self.device, self.out_dir = name, device, out_dir
        self.rows: list[dict] = []
        self.path: Path | None = None

    def add(self, rows: Iterable[dict]) -> None:
        self.rows += list(rows)
        if self.rows:
            self.path = write_table(self.name, self.rows, self.device, self.out_dir)
