"""Latency-vs-sparsity and latency-vs-batch figures from the CSV tables in bench/results.

    python -m bench.plots [--results DIR] [--out DIR]

Every ``<name>_<device>.csv`` written by ``bench.common.write_table`` is read by the canonical column
names of ``bench.common`` only: latency ``time_ms``, one line per ``provider``, x axes ``sparsity_pct``
and ``M`` (matmuls) or ``batch`` (models, convs). A table gets a latency-vs-sparsity (-batch) figure when
some provider was measured at several sparsities (batch sizes) in one setting. One panel per fixed
setting (model, shape, layout, dtype, and the other axis), log-scale latency. Figures go to
``<out>/<table stem>_vs_<axis>.png`` and are titled with the device that measured them, so a CPU figure
can never pass for a GPU one. Tables that are absent are reported and skipped.
"""
from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path
from typing import Sequence

from .common import BATCH, M_ROWS, PROVIDER, RESULTS, SPARSITY_PCT, TIME_MS

BATCH_AXES = (M_ROWS, BATCH)  # a table has one of them
# Columns that fix a setting: rows that differ in one of them go to different panels.
FACETS = ("model", "dims", "layer", "shape", "N", "K", "k", "layout", "dtype", "pattern", SPARSITY_PCT, BATCH, M_ROWS)
EXPECTED = {"nm": "bench.bench_nm", "spmm": "bench.bench_spmm", "channel": "bench.bench_channel",
            "models": "bench.bench_models"}
PANELS_PER_FIGURE = 12


def _pick(cols: Sequence[str], names: Sequence[str]) -> str | None:
    return next((n for n in names if n in cols), None)


def _num(v: str) -> float | None:
    try:
        f = float(v)
    except ValueError:
        return None
    return f if math.isfinite(f) else None


def _sort_key(v: str) -> tuple:
    f = _num(v.rstrip("%"))
    return (0, f, "") if f is not None else (1, 0.0, v)  # numbers in order, then labels such as "2:4"


def plot_table(csv_path: Path, out_dir: Path, log=print) -> list[Path]:
    """Figures for one table; returns the files written (none when the table has no usable axis)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(csv_path.open()))
    if rows and TIME_MS in rows[0]:  # rows without a timing (a provider's ``error`` row) have nothing to plot
        rows = [r for r in rows if _num(r[TIME_MS]) is not None]
    if not rows:
        log(f"skip {csv_path.name}: empty table")
        return []
    cols = list(rows[0])
    y, series = TIME_MS, PROVIDER
    missing = [c for c in (y, series) if c not in cols]
    if missing:
        log(f"skip {csv_path.name}: no {' or '.join(missing)} column")
        return []
    device = rows[0].get("device", "unknown device")
    written = []
    for label, x in (("sparsity", _pick(cols, (SPARSITY_PCT,))), ("batch", _pick(cols, BATCH_AXES))):
        if x is None:
            continue
        facets = panel_facets(rows, x)
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            if _num(r[y]) is not None:
                groups.setdefault(tuple(r[c] for c in facets), []).append(r)
        # Panels where no provider has two x values have no curve to draw (e.g. a model run at one batch size).
        keys = sorted((k for k, g in groups.items() if _has_line(g, x, series)),
                      key=lambda k: tuple(_sort_key(v) for v in k))
        if not keys:
            continue
        for page in range(0, len(keys), PANELS_PER_FIGURE):
            chunk = keys[page: page + PANELS_PER_FIGURE]
            ncol = min(3, len(chunk))
            nrow = math.ceil(len(chunk) / ncol)
            fig, axes = plt.subplots(nrow, ncol, figsize=(max(5 * ncol, 7), 3.6 * nrow), squeeze=False)
            for ax, key in zip(axes.flat, chunk):
                _panel(ax, groups[key], x, y, series)
                ax.set_title(", ".join(f"{c}={v}" for c, v in zip(facets, key)) or csv_path.stem, fontsize=8)
            for ax in list(axes.flat)[len(chunk):]:
                ax.axis("off")
            fig.suptitle(f"{csv_path.stem}: latency vs {label} ({device})", fontsize=10)
            fig.tight_layout()
            suffix = "" if len(keys) <= PANELS_PER_FIGURE else f"_{page // PANELS_PER_FIGURE + 1}"
            path = out_dir / f"{csv_path.stem}_vs_{label}{suffix}.png"
            out_dir.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
            log(f"wrote {path}")
    if not written:
        log(f"skip {csv_path.name}: no provider measured at several sparsities or batch sizes")
    return written


def panel_facets(rows: list[dict], x: str) -> list[str]:
    """The columns that split ``rows`` into panels for an x axis ``x``: settings that vary in the table.

    A column that varies but takes one value per provider (a model variant's ``sparsity_pct``) labels a
    line, not a panel: dense and its sparse variants share one panel.
    """
    cols = rows[0].keys()
    return [c for c in FACETS if c in cols and c not in (x, PROVIDER) and len({r[c] for r in rows}) > 1
            and not _follows(rows, c, PROVIDER)]


def _follows(rows: list[dict], col: str, series: str) -> bool:
    """Whether ``col`` takes one value per provider."""
    seen: dict[str, str] = {}
    return all(seen.setdefault(r[series], r[col]) == r[col] for r in rows)


def _has_line(rows: list[dict], x: str, series: str) -> bool:
    """Whether some provider has two or more x values among ``rows``."""
    seen: dict[str, set[str]] = {}
    for r in rows:
        seen.setdefault(r[series], set()).add(r[x])
    return any(len(v) > 1 for v in seen.values())


def _panel(ax, rows: list[dict], x: str, y: str, series: str) -> None:
    xs = sorted({r[x] for r in rows}, key=_sort_key)
    numeric = all(_num(v.rstrip("%")) is not None for v in xs)
    lines: dict[str, dict[str, float]] = {}
    for r in rows:
        lines.setdefault(r[series], {})[r[x]] = float(r[y])
    for name, pts in sorted(lines.items()):
        ks = [k for k in xs if k in pts]
        pos = [_num(k.rstrip("%")) if numeric else xs.index(k) for k in ks]
        ax.plot(pos, [pts[k] for k in ks], marker="o", label=name)
    if not numeric:
        ax.set_xticks(range(len(xs)), xs)
    elif x in BATCH_AXES and all(_num(v) > 0 for v in xs):
        ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plots", description=__doc__.split("\n")[0])
    p.add_argument("--results", default=str(RESULTS), help="folder holding the CSV tables")
    p.add_argument("--out", help="folder for the figures (default <results>/plots)")
    args = p.parse_args(argv)
    results = Path(args.results)
    out = Path(args.out) if args.out else results / "plots"
    tables = sorted(results.glob("*.csv")) if results.is_dir() else []
    for prefix, module in EXPECTED.items():
        if not any(t.name.startswith(prefix + "_") for t in tables):
            print(f"skip {prefix}: no {prefix}_*.csv in {results} (run python -m {module})")
    for table in tables:
        plot_table(table, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
