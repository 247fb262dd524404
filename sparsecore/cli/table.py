"""Plain-text tables of the ``sparsecore`` command: fixed-width columns, byte counts in binary units."""
from __future__ import annotations

from typing import Any, Sequence


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


def layer_table(rows: list[dict[str, Any]], plans: dict[str, str] | None = None) -> str:
    """Per-layer table (the text shown by ``prune`` and ``inspect``) of :func:`stats.layer_stats` rows."""
    head = ["layer", "format", "pattern", "shape", "dtype", "sparsity", "packed", "dense", "ratio"]
    if plans is not None:
        head.append("backend")
    table = [head]
    for r in rows:
        line = [r["layer"] or "<root>", r["format"], r["pattern"], "x".join(map(str, r["shape"])), r["dtype"],
                f"{r['sparsity']:.4f}", fmt_bytes(r["packed_bytes"]), fmt_bytes(r["dense_bytes"]),
                f"{r['ratio']:.2f}x"]
        if plans is not None:
            line.append(plans.get(r["layer"], "dense (unplanned)"))
        table.append(line)
    return fixed_width(table)


def totals_text(t: dict[str, Any]) -> str:
    """Two lines: sparse layers packed vs dense, and the whole model."""
    return (f"sparse layers: {t['sparse_layers']}  packed {fmt_bytes(t['packed_bytes'])} vs dense "
            f"{fmt_bytes(t['dense_bytes'])} ({t['ratio']:.2f}x smaller)\n"
            f"whole model:   {fmt_bytes(t['model_bytes'])} vs dense {fmt_bytes(t['dense_model_bytes'])} "
            f"(other tensors {fmt_bytes(t['other_bytes'])})")
