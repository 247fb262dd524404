"""Byte counts of packed layers and files, beside the per-layer report (``sparsecore.report``).

What happened to each layer (status, pattern, kept fraction, reasons, plans) is the library's report
(``sparsecore.last_report`` for a model, ``sparsecore.file_report`` for a file); this module adds only what the
command shows on top of it: packed and dense bytes per sparse layer and for the whole file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..report import REPORT_KEY, SparsityReport

DENSE_BYTES_KEY = "dense_model_bytes"  # extra's key: bytes of the unpruned model's state_dict


def layer_bytes(p) -> dict[str, Any]:
    """Bytes of one PackedWeight ``p``: ``dtype``, ``packed_bytes``, ``dense_bytes`` and their ``ratio``."""
    from ..formats.base import dtype_name

    return {"dtype": dtype_name(p.dtype), "packed_bytes": int(p.nbytes), "dense_bytes": int(p.dense_nbytes),
            "ratio": p.dense_nbytes / p.nbytes if p.nbytes else float("inf")}


def file_stats(path: str | Path) -> dict[str, Any]:
    """A saved file's report (``report``: a :class:`SparsityReport`), bytes per sparse layer (``bytes``:
    ``{fqn: layer_bytes}``) and ``totals``, from the file alone (no model needed)."""
    import sparsecore as sc
    from ..io import FileFormatError, packed_layer, read

    saved = read(path)
    sizes, packed_keys = {}, set()
    for fqn, entry in saved.header["layers"].items():
        try:
            packed, keys = packed_layer(fqn, entry, saved.tensors)
        except FileFormatError as e:
            raise FileFormatError(f"{path}: {e}") from None
        packed_keys.update(keys)
        sizes[fqn] = layer_bytes(packed)
    aliases = saved.header["aliases"]
    other = sum(t.numel() * t.element_size() for k, t in saved.tensors.items()
                if k not in packed_keys and k not in aliases)
    packed_total = sum(r["packed_bytes"] for r in sizes.values())
    dense_total = sum(r["dense_bytes"] for r in sizes.values())
    extra = saved.header.get("extra")
    # a slimmed model's dense self is larger than its packed layers unpacked: the file records it (prune does)
    dense_model = extra.get(DENSE_BYTES_KEY) if isinstance(extra, dict) else None
    return {"file": str(path), "config": saved.header.get("config"), "extra": extra,
            "report": sc.file_report(saved), "bytes": sizes,
            "totals": {"sparse_layers": len(sizes), "packed_bytes": packed_total, "dense_bytes": dense_total,
                       "ratio": dense_total / packed_total if packed_total else float("nan"),
                       "other_bytes": other, "model_bytes": packed_total + other,
                       "dense_model_bytes": dense_model if isinstance(dense_model, int) else dense_total + other}}


def json_rows(report: SparsityReport, sizes: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The report's rows (``SparsityReport.to_json``) with each sparse layer's bytes merged in."""
    return [{**row, **sizes.get(row["layer"], {})} for row in report.to_json()]


def to_json(stats: dict[str, Any]) -> dict[str, Any]:
    """``inspect --json`` of :func:`file_stats`: the file's config, extra, per-layer rows (report plus bytes) and
    totals."""
    extra = {k: v for k, v in (stats["extra"] or {}).items() if k not in (REPORT_KEY, DENSE_BYTES_KEY)} or None
    return {"file": stats["file"], "config": stats["config"], "extra": extra,
            "layers": json_rows(stats["report"], stats["bytes"]), "totals": stats["totals"]}


def file_report(path: str | Path) -> dict[str, Any]:
    """:func:`to_json` of the file at ``path``."""
    return to_json(file_stats(path))
