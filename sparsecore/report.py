"""What ``sparsify`` and ``plan`` did to each layer: a typed report for users, the CLI and ``inspect``.

One report per model, kept in this module's registry (a weak map: the report lives as long as the model),
and read with ``last_report(model)``: nothing is stored on the model itself. ``sparsify`` records which
layers it skipped and why; ``plan`` records each decision with its timings. ``file_report(path)`` gives
the same table for a saved file.

>>> model = sc.sparsify(model, sc.SparsityConfig("unstructured", 0.9), example_inputs=(x,))
>>> print(sc.last_report(model).format_table())
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .planner import PlanEntry

__all__ = ["BucketPlan", "LayerReport", "SparsityReport", "last_report", "file_report", "record_skips",
           "record_plan", "COLUMNS"]


@dataclass(frozen=True)
class BucketPlan:
    """The planner's choice for one batch bucket (``m_bucket``) of one layer.

    ``speedup`` is dense time / chosen time (medians of interleaved samples); ``spread`` is the
    interquartile range of the per-round ratios, ``(q25, q75)``: a choice is sparse only when even q25 > 1.
    """

    bucket: int
    backend: str
    dense_ms: float | None = None
    backend_ms: float | None = None
    speedup: float | None = None
    spread: tuple[float, float] | None = None
    cached: bool = False
    note: str = ""  # dense picks: the best sparse contender's figures, or that none runs here


@dataclass
class LayerReport:
    """One weight layer: made sparse (``status == "sparse"``) or left dense (``"skipped"``, with ``reason``)."""

    fqn: str
    kind: str                        # module class: "Linear", "Conv1D", "Conv2d", "SparseLinear", ...
    shape: tuple[int, ...]           # weight shape [out, in] or [C_out, C_in/groups, kh, kw]
    status: str                      # "sparse" | "skipped"
    pattern: str | None = None       # packed format: "unstructured" | "nm" | "channel"
    kept: float | None = None        # kept fraction of the weight's entries
    reason: str = ""                 # why it was skipped
    plans: dict[int, BucketPlan] = field(default_factory=dict)  # bucket -> choice; empty: unplanned (runs dense)

    def backend_text(self) -> str:
        if self.status != "sparse":
            return "-"
        if not self.plans:
            return "dense (unplanned)"
        return ", ".join(f"M<={b}: {p.backend}" for b, p in sorted(self.plans.items()))

    def speed_text(self) -> str:
        parts = []
        for b, p in sorted(self.plans.items()):
            if p.speedup is None:
                continue
            spread = f" [{p.spread[0]:.2f}-{p.spread[1]:.2f}]" if p.spread else ""
            parts.append(f"{p.speedup:.2f}x{spread}")
        return ", ".join(parts) or "-"

    def note_text(self) -> str:
        notes = [f"M<={b}: {p.note}" for b, p in sorted(self.plans.items()) if p.note]
        return "; ".join([self.reason] * bool(self.reason) + notes)


COLUMNS = ("layer", "kind", "shape", "status", "pattern", "kept", "backend", "vs dense [q25-q75]", "note")


@dataclass
class SparsityReport:
    """Every weight layer of a model (or file) and what became of it."""

    layers: list[LayerReport] = field(default_factory=list)

    @property
    def sparse(self) -> list[LayerReport]:
        return [r for r in self.layers if r.status == "sparse"]

    @property
    def skipped(self) -> list[LayerReport]:
        return [r for r in self.layers if r.status != "sparse"]

    def layer(self, fqn: str) -> LayerReport:
        for r in self.layers:
            if r.fqn == fqn:
                return r
        raise KeyError(f"no layer {fqn!r} in the report")

    def to_rows(self) -> list[dict[str, str]]:
        """One dict of display strings per layer, keyed by ``COLUMNS``."""
        return [{"layer": r.fqn or "(root)", "kind": r.kind, "shape": "x".join(map(str, r.shape)), "status": r.status,
                 "pattern": r.pattern or "-", "kept": f"{r.kept:.3f}" if r.kept is not None else "-",
                 "backend": r.backend_text(), "vs dense [q25-q75]": r.speed_text(), "note": r.note_text()}
                for r in self.layers]

    def format_table(self) -> str:
        """A plain-text table of ``to_rows()`` plus a one-line summary."""
        rows = self.to_rows()
        widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in COLUMNS}
        lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS).rstrip()]
        lines.append("  ".join("-" * widths[c] for c in COLUMNS))
        lines += ["  ".join(r[c].ljust(widths[c]) for c in COLUMNS).rstrip() for r in rows]
        lines.append(f"{len(self.sparse)} sparse, {len(self.skipped)} skipped")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format_table()


@dataclass
class _Record:
    skipped: dict[str, tuple[str, tuple[int, ...], str]] = field(default_factory=dict)  # fqn -> (kind, shape, reason)
    plans: dict[str, dict[int, BucketPlan]] = field(default_factory=dict)


_RECORDS: "weakref.WeakKeyDictionary[nn.Module, _Record]" = weakref.WeakKeyDictionary()


def record_skips(model: nn.Module, skipped: dict[str, tuple[nn.Module, str]]) -> None:
    """Called by ``sparsify``: the layers it left dense and why (replaces any earlier record)."""
    from .layers import weight_matrix
    rec = _RECORDS.setdefault(model, _Record())
    rec.skipped = {}
    for fqn, (mod, reason) in skipped.items():
        if isinstance(getattr(mod, "weight", None), torch.Tensor):
            shape = tuple(weight_matrix(mod).shape)
        else:  # nn.MultiheadAttention: its packed q/k/v projection
            w = getattr(mod, "in_proj_weight", None)
            shape = tuple(w.shape) if isinstance(w, torch.Tensor) else ()
        rec.skipped[fqn] = (type(mod).__name__, shape, reason)


def record_plan(model: nn.Module, entries: list["PlanEntry"]) -> None:
    """Called by ``plan``: each decision with its timings and spread."""
    rec = _RECORDS.setdefault(model, _Record())
    for e in entries:
        dense = e.times_ms.get("dense")
        mine = e.times_ms.get(e.chosen)
        note = ""
        if e.chosen == "dense":
            best = max(e.speedup, key=e.speedup.get, default=None)
            if best is not None:
                lo, hi = e.spread.get(best, (float("nan"), float("nan")))
                note = f"best sparse {best} {e.speedup[best]:.2f}x [{lo:.2f}-{hi:.2f}]"
            elif e.dropped:
                note = "; ".join(f"{k} dropped ({v})" for k, v in e.dropped.items())
            else:
                note = "no sparse backend runs here"
        speed = 1.0 if e.chosen == "dense" else e.speedup.get(e.chosen)
        rec.plans.setdefault(e.fqn, {})[e.bucket] = BucketPlan(
            e.bucket, e.chosen, dense, mine, speed, e.spread.get(e.chosen), e.cached, note)


def _kept(tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> float:
    numel = 1
    for s in shape:
        numel *= s
    return tensors["values"].numel() / max(numel, 1)


def last_report(model: nn.Module) -> SparsityReport:
    """The report of ``model`` as it stands: its sparse layers (format, kept fraction, plan and timings) and
    the layers ``sparsify`` skipped, with reasons. Works on any model (a loaded one lists its sparse layers)."""
    from .sparsify import sparse_modules

    if not isinstance(model, nn.Module):
        raise TypeError(f"last_report takes an nn.Module, got {type(model).__name__}")
    rec = _RECORDS.get(model, _Record())
    sparse = sparse_modules(model)
    order = [fqn for fqn, _ in model.named_modules()]
    rows: dict[str, LayerReport] = {}
    for fqn, mod in sparse.items():
        meta = mod.format_meta
        shape = tuple(meta["shape"])
        kept = mod.kept_fraction()
        plans = {b: rec.plans.get(fqn, {}).get(b, BucketPlan(b, be.value)) for b, be in mod.plan.items()}
        rows[fqn] = LayerReport(fqn, type(mod).__name__, shape, "sparse", meta["kind"], kept, plans=plans)
    for fqn, (kind, shape, reason) in rec.skipped.items():
        if fqn not in rows:
            rows[fqn] = LayerReport(fqn, kind, shape, "skipped", reason=reason)
    rank = {f: i for i, f in enumerate(order)}
    return SparsityReport(sorted(rows.values(), key=lambda r: rank.get(r.fqn, len(rank))))


def file_report(source: "str | Path | Any") -> SparsityReport:
    """The report for a saved file (a path, or a ``SavedModel`` from ``sparsecore.read``): each sparse
    layer's type, format, shape and kept fraction. Plans are per machine and not saved."""
    from .io import SavedModel, packed_layer, read

    saved = source if isinstance(source, SavedModel) else read(source)
    layers = []
    for fqn, entry in saved.header["layers"].items():
        packed, _ = packed_layer(fqn, entry, saved.tensors)
        tensors, meta = packed.state()
        kind = "SparseLinear" if entry["type"] == "linear" else "SparseConv2d"
        layers.append(LayerReport(fqn, kind, tuple(meta["shape"]), "sparse", meta["kind"],
                                  _kept(tensors, tuple(meta["shape"]))))
    return SparsityReport(layers)
