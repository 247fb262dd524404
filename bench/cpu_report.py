"""Headline tables for ``bench/results/CPU.md`` from the CSVs that ``bench.bench_cpu`` wrote.

    python -m bench.cpu_report [--results DIR]

Prints Markdown: per kernel case, dense time and, for every sparsecore provider, the best peer and each
provider's ratio vs dense (spread: the ratio at the slowest and fastest repeat medians); then the
end-to-end and CSR-overhead rows. Reads only what was measured; prints nothing for a missing table.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

from .common import RESULTS


def _f(v: str) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def kernel_table(rows: list[dict]) -> list[str]:
    out = ["| shape | M | dtype | sparsity | dense ms | best peer (x dense) | sparsecore provider | x dense "
           "[spread] | x best peer | byte ceiling | % of ceiling |", "|" + "---|" * 11]
    cases: dict[tuple, list[dict]] = {}
    for r in rows:
        cases.setdefault((r["N"], r["K"], r["M"], r["dtype"], r["pattern"], r["sparsity_pct"]), []).append(r)
    for (n, k, m, dtype, pattern, pct), case in cases.items():
        timed = [r for r in case if _f(r.get("time_ms")) is not None]
        dense = next((r for r in timed if r["group"] == "dense"), None)
        if dense is None:
            continue
        peers = [r for r in timed if r["group"] == "peer"]
        best = min(peers, key=lambda r: float(r["time_ms"])) if peers else None
        peer_cell = f"{best['provider']} ({float(best['speedup_vs_best_dense']):.2f}x)" if best else "none runs"
        label = pattern if pattern != "unstructured" else f"{pct}%"
        for r in (r for r in timed if r["group"] == "sparsecore"):
            d = float(dense["time_ms"])
            lo, hi = d / float(r["time_max_ms"]), d / float(r["time_min_ms"])
            vs_peer = f"{float(r['speedup_vs_best_peer']):.2f}" if _f(r.get("speedup_vs_best_peer")) else "-"
            name = r["provider"] + (f" ({r['detail'].replace('planner chose ', '')})" if r["detail"] else "")
            out.append(f"| {n}x{k} | {m} | {dtype} | {label} | {d:.2f} | {peer_cell} | {name} | "
                       f"{float(r['speedup_vs_best_dense']):.2f} [{lo:.2f}-{hi:.2f}] | {vs_peer} | "
                       f"{float(r['byte_ceiling']):.2f} | {float(r['pct_of_ceiling']):.0f} |")
    return out


def e2e_table(rows: list[dict]) -> list[str]:
    out = ["| model | batch | seq | variant | ms [min-max] | x torch dense | resident MB | backends | note |",
           "|" + "---|" * 9]
    for r in rows:
        ms = _f(r.get("time_ms"))
        timing = f"{ms:.2f} [{float(r['time_min_ms']):.2f}-{float(r['time_max_ms']):.2f}]" if ms else "-"
        speed = f"{float(r['speedup_vs_best_dense']):.2f}" if ms else "-"
        mb = f"{float(r['model_MB']):.1f}" if _f(r.get("model_MB")) else "-"
        out.append(f"| {r['model']} | {r.get('batch', '')} | {r.get('seq', '')} | {r['provider']} {r.get('pattern', '')}"
                   f" | {timing} | {speed} | {mb} | {r.get('backends', '')} | {r.get('note', '')} |")
    return out


def csr_table(rows: list[dict]) -> list[str]:
    out = ["| shape | M | step | ms [min-max] | vs direct | paired vs direct [q25, q75] |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        paired = (f"{float(r['paired_overhead_pct']):+.1f}% [{float(r['paired_q25_pct']):+.1f}, "
                  f"{float(r['paired_q75_pct']):+.1f}]") if r.get("paired_overhead_pct") not in (None, "") else "-"
        out.append(f"| {r['N']}x{r['K']} | {r['M']} | {r['provider']} | {float(r['time_ms']):.3f} "
                   f"[{float(r['time_min_ms']):.3f}-{float(r['time_max_ms']):.3f}] | "
                   f"{float(r['overhead_vs_direct_pct']):+.1f}% | {paired} |")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_report", description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    for pattern, make in (("cpu_kernels*.csv", kernel_table), ("cpu_e2e*.csv", e2e_table),
                          ("cpu_csr_overhead*.csv", csr_table)):
        for path in sorted(args.results.glob(pattern)):
            with path.open() as f:
                rows = list(csv.DictReader(f))
            first = rows[0] if rows else {}
            print(f"\n### {path.name} ({first.get('cpu', '?')}, {first.get('threads', '?')} threads, torch "
                  f"{first.get('torch', '?')}, commit {first.get('commit', '?')}, {first.get('date', '?')})\n")
            print("\n".join(make(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
