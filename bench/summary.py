"""The headline of a ``bench/run_gpu.sh`` run: one markdown page from the tables it wrote.

    python -m bench.summary RUN_DIR [--steps STEPS_FILE] [--out SUMMARY.md]

Reads the ``*.csv`` tables in ``RUN_DIR`` (column vocabulary: ``bench.common``) and, where present, the
pytest JUnit file ``gpu_tests.xml``; ``STEPS_FILE`` holds one line per step, ``name status seconds``.
Each section pivots one table: a row per case, a column per provider, each cell
``speedup_vs_best_dense`` (``x1.52``), ``error`` where the provider raised, ``-`` where it did not run.
Written atomically (temporary name, then rename), so it can be rewritten after every step.
"""
from __future__ import annotations

import argparse
import csv
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

# bench.common's column names, spelt out: importing it would import torch, seconds per call in a step loop
# (tests/test_run_gpu.py checks that they agree).
PROVIDER, BEST_DENSE_MS, SPEEDUP = "provider", "best_dense_time_ms", "speedup_vs_best_dense"
ERROR, NOT_RUN = "error", "not run: "
ENV_COLUMNS = ("device", "torch", "triton", "commit", "date")

# (title, table name prefix, case columns, providers shown, speedup column)
SECTIONS = (
    ("2:4 linear vs dense cuBLAS (speedup; best dense ms)", "nm_matmul_", ("N", "K", "M", "dtype"),
     ("triton_nm", "cusparselt", "cutlass", "dense_compile"), SPEEDUP),
    ("Unstructured linear vs dense (speedup; best dense ms)", "spmm_", ("N", "K", "sparsity_pct", "M", "dtype"),
     ("sparsecore_triton", "sparsecore_sell", "torch_csr", "torch_bsr_triton", "dense_compile"), SPEEDUP),
    ("Models end to end, eager under no_grad (speedup vs dense; dense ms)", "models", ("model", "batch", "dtype"),
     ("2:4", "unstructured90", "channel50"), SPEEDUP),
    ("Models end to end, CUDA graph replay (speedup vs dense graph)", "models", ("model", "batch", "dtype"),
     ("2:4", "unstructured90", "channel50"), "graph_speedup_vs_dense_graph"),
    ("Channel conv, 50% in x 50% out (speedup vs best dense layout; best dense ms)", "channel_conv_",
     ("layer", "batch", "layout"), ("physical_slice", "sliced_dense", "channel_conv"), SPEEDUP),
    ("Channel pruning, ResNet-50 (speedup vs dense)", "channel_resnet50_", ("model", "batch"), ("slimmed",), SPEEDUP),
)


def _read(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _cell(row: dict | None, col: str) -> str:
    if row is None:
        return "-"
    err = row.get(ERROR, "") or (row.get("graph_error", "") if col.startswith("graph") else "")
    if err:
        return "n/a" if err.startswith(NOT_RUN) else "error"
    try:
        return f"x{float(row[col]):.2f}"
    except (KeyError, ValueError):
        return "-"


def pivot(rows: list[dict], cases: Sequence[str], providers: Sequence[str], col: str) -> list[str]:
    """Markdown lines: one row per case (first-seen order), one column per provider present in ``rows``."""
    shown = [p for p in providers if any(r.get(PROVIDER) == p for r in rows)]
    if not shown or not any(col in r for r in rows):
        return []
    keyed: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        keyed.setdefault(tuple(r.get(c, "") for c in cases), {})[r.get(PROVIDER, "")] = r
    base = "graph_time_ms" if col.startswith("graph") else BEST_DENSE_MS
    lines = ["| " + " | ".join([*cases, "dense ms", *shown]) + " |", "|" + "---|" * (len(cases) + 1 + len(shown))]
    for case, by in keyed.items():
        dense = by.get("dense", {}).get(base) or next((r.get(BEST_DENSE_MS) for r in by.values()
                                                       if r.get(BEST_DENSE_MS)), "")
        try:
            dense = f"{float(dense):.4g}"
        except ValueError:
            dense = "-"
        lines.append("| " + " | ".join([*case, dense, *(_cell(by.get(p), col) for p in shown)]) + " |")
    return lines


def _errors(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        err = r.get(ERROR, "") or (f"CUDA graph: {r['graph_error']}" if r.get("graph_error") else "")
        if err and not err.startswith(NOT_RUN):
            where = ", ".join(f"{c}={r[c]}" for c in ("N", "K", "M", "layer", "model", "batch", "sparsity_pct")
                              if r.get(c))
            out.append(f"- {r.get(PROVIDER)} ({where}): {err[:200]}")
    return out


def _tests(xml_path: Path) -> list[str]:
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError) as e:
        return [f"GPU tests: no readable report ({type(e).__name__})"]
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return ["GPU tests: empty report"]
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    lines = [f"GPU tests: {n['tests']} collected, {n['tests'] - n['failures'] - n['errors'] - n['skipped']} passed, "
             f"{n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped ({suite.get('time', '?')} s)"]
    for case in suite.iter("testcase"):
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is not None:
            lines.append(f"- {case.get('classname')}::{case.get('name')}: {(bad.get('message') or '')[:160]}")
    return lines


def summarize(run_dir: Path, steps: Path | None = None) -> str:
    """The markdown page for the tables in ``run_dir``."""
    tables = {p.name: _read(p) for p in sorted(run_dir.glob("*.csv"))}
    first = next((rows[0] for rows in tables.values() if rows), {})
    lines = ["# sparsecore GPU run", ""]
    lines += [" / ".join(f"{c}: {first.get(c, '?')}" for c in ENV_COLUMNS) if first else "no tables written", ""]
    if steps is not None and steps.is_file():
        lines += ["| step | status | seconds |", "|---|---|---|"]
        lines += ["| " + " | ".join((line.split(maxsplit=2) + ["", ""])[:3]) + " |"
                  for line in steps.read_text().splitlines() if line.strip()]
        lines.append("")
    for title, prefix, cases, providers, col in SECTIONS:
        rows = [r for name, rs in tables.items() if name.startswith(prefix) for r in rs]
        body = pivot(rows, cases, providers, col)
        if body:
            lines += [f"## {title}", "", *body, ""]
    errors = [e for rs in tables.values() for e in _errors(rs)]
    if errors:
        lines += ["## Provider errors", "", *errors[:40], ""]
    if (run_dir / "gpu_tests.xml").is_file():
        lines += ["## Tests", "", *_tests(run_dir / "gpu_tests.xml"), ""]
    lines.append("Cells: speedup (> 1: faster than the best dense provider in the same run); n/a: does not apply "
                 "here; error: raised (see its row). Full tables: results.tar.gz.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.summary", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--steps", type=Path, help="file of 'name status seconds' lines, one per step")
    ap.add_argument("--out", type=Path, help="write the page here (atomically) instead of only printing it")
    args = ap.parse_args(argv)
    if not args.run_dir.is_dir():
        ap.error(f"{args.run_dir} is not a directory")
    text = summarize(args.run_dir, args.steps)
    if args.out is not None:
        tmp = args.out.with_name(args.out.name + ".part")
        tmp.write_text(text)
        os.replace(tmp, args.out)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
