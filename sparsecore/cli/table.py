"""Plain-text tables of the ``sparsecore`` command: fixed-width columns, byte counts in binary units."""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, Sequence

from ..report import COLUMNS

if TYPE_CHECKING:
    from ..report import SparsityReport

PLAN_COLUMNS = ("backend", "vs dense [q25-q75]")


def fmt_bytes(n: float) -> str:
    """``1536`` -> ``1.50 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def fixed_width(rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def layer_table(report: "SparsityReport", sizes: dict[str, dict[str, Any]] | None = None) -> str:
    """Per-layer table (``prune`` and ``inspect``): the report's rows (:data:`sparsecore.report.COLUMNS`) with
    each sparse layer's packed and dense bytes (``sizes``: ``{fqn: stats.layer_bytes}``) beside its kept
    fraction; the backend columns only when some layer was planned. Ends with the report's summary line."""
    sizes = sizes or {}
    columns = [c for c in COLUMNS if report.planned or c not in PLAN_COLUMNS]
    at = columns.index("kept") + 1
    columns[at:at] = ["packed", "dense"]
    table = [columns]
    for row, r in zip(report.to_rows(), report.layers):
        size = sizes.get(r.fqn)
        row["packed"] = fmt_bytes(size["packed_bytes"]) if size else "-"
        row["dense"] = fmt_bytes(size["dense_bytes"]) if size else "-"
        table.append([row[c] for c in columns])
    return fixed_width(table) + "\n" + report.summary()


def brief_text(report: "SparsityReport", limit: int = 4) -> str:
    """The short form (``--brief``): the summary line, then each distinct reason once with the layers it names
    (the first ``limit`` and a count)."""
    by_reason: dict[str, list[str]] = {}
    for r in report.layers:
        if r.reason:
            by_reason.setdefault(r.reason, []).append(r.fqn or "<root>")
    lines = [report.summary()]
    if report.planned:  # how many (layer, batch bucket) decisions went to each backend
        chosen = Counter(p.backend for r in report.layers for p in r.plans.values())
        lines.append("  backends chosen: " + ", ".join(f"{name} x{n}" for name, n in chosen.most_common()))
    for reason, fqns in by_reason.items():
        more = f" and {len(fqns) - limit} more" if len(fqns) > limit else ""
        lines.append(f"  {len(fqns)} layer{'s' * (len(fqns) > 1)} ({', '.join(fqns[:limit])}{more}): {reason}")
    return "\n".join(lines)


def totals_text(t: dict[str, Any]) -> str:
    """Two lines: sparse layers packed vs dense, and the whole model (vs its dense self, unslimmed)."""
    packed = (f"sparse layers: {t['sparse_layers']}  packed {fmt_bytes(t['packed_bytes'])} vs dense "
              f"{fmt_bytes(t['dense_bytes'])} ({t['ratio']:.2f}x smaller)" if t["sparse_layers"]
              else "sparse layers: none packed")
    return (f"{packed}\n"
            f"whole model:   {fmt_bytes(t['model_bytes'])} vs dense {fmt_bytes(t['dense_model_bytes'])} "
            f"(other tensors {fmt_bytes(t['other_bytes'])})")
