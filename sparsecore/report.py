"""What ``sparsify`` and ``plan`` did to each layer: a typed report for users, the CLI and ``inspect``.

One report per model, kept in this module's registry (a weak map: the report lives as long as the model),
and read with ``last_report(model)``. ``sparsify`` records which layers it skipped and why; ``plan`` records
each decision with its timings; channel slimming leaves on the slimmed model (``sparsecore.channel.slim``)
which layers it narrowed and why the others kept their width. ``file_report(path)`` gives the same table for
a saved file: its packed layers, plus the rows a file cannot tell when it records them (``REPORT_KEY``).

>>> model = sc.sparsify(model, sc.SparsityConfig("unstructured", 0.9), example_inputs=(x,))
>>> print(sc.last_report(model).format_table())
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .planner import PlanEntry

__all__ = ["BucketPlan", "LayerReport", "SparsityReport", "last_report", "file_report", "record_skips",
           "record_plan", "COLUMNS", "STATUSES", "REPORT_KEY"]


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


STATUSES = ("sparse", "slimmed", "skipped")


@dataclass
class LayerReport:
    """One weight layer: packed (``status == "sparse"``), physically narrowed by channel slimming
    (``"slimmed"``, a plain dense layer again) or left as it was (``"skipped"``, with ``reason``).

    ``reason`` says why the layer (or, for a slimmed layer, its output width) was left alone; on a sparse
    channel layer, why it keeps zeroed channels at full width instead of shrinking.
    """

    fqn: str
    kind: str                        # module class: "Linear", "Conv1D", "Conv2d", "SparseLinear", ...
    shape: tuple[int, ...]           # weight shape [out, in] or [C_out, C_in/groups, kh, kw], as the model holds it
    status: str                      # one of STATUSES
    pattern: str | None = None       # format or rule: "unstructured" | "nm" | "channel"
    kept: float | None = None        # kept fraction of the original (unslimmed) weight's entries
    reason: str = ""                 # why it was skipped (see above)
    plans: dict[int, BucketPlan] = field(default_factory=dict)  # bucket -> choice; empty: unplanned (runs dense)
    layout: str = ""                 # the pattern's detail: "2:4", "out 16/32 in 8/16" (kept / original channels)
    dense_shape: tuple[int, ...] | None = None  # weight shape before slimming, when slimming changed it

    def shape_text(self) -> str:
        now = "x".join(map(str, self.shape))
        if self.dense_shape is None or tuple(self.dense_shape) == tuple(self.shape):
            return now
        return "x".join(map(str, self.dense_shape)) + "->" + now

    def pattern_text(self) -> str:
        return " ".join(t for t in (self.pattern, self.layout) if t) or "-"

    def backend_text(self) -> str:
        if self.status == "slimmed":
            return "dense"
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
    def slimmed(self) -> list[LayerReport]:
        return [r for r in self.layers if r.status == "slimmed"]

    @property
    def skipped(self) -> list[LayerReport]:
        return [r for r in self.layers if r.status == "skipped"]

    @property
    def planned(self) -> bool:
        """Whether any layer carries a measured plan (the backend columns then say something)."""
        return any(r.plans for r in self.layers)

    def summary(self) -> str:
        """``"3 sparse, 2 slimmed, 1 skipped"`` (a zero slimmed count is left out)."""
        parts = [f"{len(self.sparse)} sparse"] + [f"{len(self.slimmed)} slimmed"] * bool(self.slimmed)
        return ", ".join(parts + [f"{len(self.skipped)} skipped"])

    def layer(self, fqn: str) -> LayerReport:
        for r in self.layers:
            if r.fqn == fqn:
                return r
        raise KeyError(f"no layer {fqn!r} in the report")

    def to_rows(self) -> list[dict[str, str]]:
        """One dict of display strings per layer, keyed by ``COLUMNS``."""
        return [{"layer": r.fqn or "(root)", "kind": r.kind, "shape": r.shape_text(), "status": r.status,
                 "pattern": r.pattern_text(), "kept": f"{r.kept:.3f}" if r.kept is not None else "-",
                 "backend": r.backend_text(), "vs dense [q25-q75]": r.speed_text(), "note": r.note_text()}
                for r in self.layers]

    def format_table(self) -> str:
        """A plain-text table of ``to_rows()`` plus a one-line summary."""
        rows = self.to_rows()
        widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in COLUMNS}
        lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS).rstrip()]
        lines.append("  ".join("-" * widths[c] for c in COLUMNS))
        lines += ["  ".join(r[c].ljust(widths[c]) for c in COLUMNS).rstrip() for r in rows]
        lines.append(self.summary())
        return "\n".join(lines)

    def to_json(self) -> list[dict[str, Any]]:
        """The rows as JSON-able dicts (plans left out: they belong to one machine). ``from_json`` reads them."""
        return [{"layer": r.fqn, "kind": r.kind, "shape": list(r.shape), "status": r.status, "pattern": r.pattern,
                 "kept": r.kept, "reason": r.reason, "layout": r.layout,
                 "dense_shape": list(r.dense_shape) if r.dense_shape is not None else None} for r in self.layers]

    @classmethod
    def from_json(cls, rows: Any) -> "SparsityReport":
        """Inverse of ``to_json``; ``ValueError`` on anything else."""
        try:
            return cls([LayerReport(str(r["layer"]), str(r["kind"]), tuple(int(d) for d in r["shape"]),
                                    _status(r["status"]), r.get("pattern"),
                                    None if r.get("kept") is None else float(r["kept"]), str(r.get("reason", "")),
                                    layout=str(r.get("layout", "")),
                                    dense_shape=None if r.get("dense_shape") is None
                                    else tuple(int(d) for d in r["dense_shape"])) for r in rows])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"not a layer report (a list of rows as SparsityReport.to_json writes): {e!r}") from None

    def __str__(self) -> str:
        return self.format_table()


def _status(s: Any) -> str:
    if s not in STATUSES:
        raise ValueError(f"status {s!r} is not one of {STATUSES}")
    return str(s)


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


def _layout(meta: dict[str, Any], tensors: dict[str, torch.Tensor], dense_shape: tuple[int, ...] | None = None) -> str:
    """The packed pattern's detail: ``"2:4"`` for N:M, ``"out a/b in c/d"`` (kept / original channels) for channel."""
    if meta["kind"] == "nm":
        return f"{meta['n']}:{meta['m']}"
    if meta["kind"] == "channel":
        full = dense_shape or tuple(meta["shape"])
        return f"out {tensors['out_idx'].numel()}/{full[0]} in {tensors['in_idx'].numel()}/{full[1]}"
    return ""


def _kept(tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> float:
    return tensors["values"].numel() / max(math.prod(shape), 1)


def _channel_layout(before: tuple[int, ...], after: tuple[int, ...]) -> str:
    return f"out {after[0]}/{before[0]} in {after[1]}/{before[1]}"


def _join(*reasons: str) -> str:
    out: list[str] = []
    for r in reasons:
        if r and r not in out:
            out.append(r)
    return "; ".join(out)


def last_report(model: nn.Module) -> SparsityReport:
    """The report of ``model`` as it stands: its sparse layers (format, kept fraction, plan and timings), the
    layers channel slimming narrowed, and the layers left as they were, each with the reason. Works on any
    model (a loaded one lists its sparse layers).

    Reasons come from ``sparsify`` (layers it cannot or may not make sparse) and, for the channel pattern with
    slimming, from the channel tracer (``sparsecore.channel.slim_skipped``: why a layer's output width could
    not shrink; ``slim_residual``: why a packed layer keeps zeroed channels at full width).
    """
    from .channel.slim import slim_residual, slim_skipped, slimmed_shapes
    from .layers import layer_kind, weight_matrix
    from .sparsify import sparse_modules

    if not isinstance(model, nn.Module):
        raise TypeError(f"last_report takes an nn.Module, got {type(model).__name__}")
    rec = _RECORDS.get(model, _Record())
    sparse = sparse_modules(model)
    shapes = {f: s for f, s in slimmed_shapes(model).items() if len(s[0]) >= 2}  # weight layers, not BatchNorm
    pinned, residual = slim_skipped(model), slim_residual(model)
    rows: list[LayerReport] = []
    for fqn, mod in model.named_modules():
        if fqn in sparse:
            rows.append(_sparse_row(fqn, mod, rec, shapes.get(fqn), residual.get(fqn, "")))
            continue
        skip = rec.skipped.get(fqn)
        if skip is None and fqn not in pinned and fqn not in shapes:
            continue
        weight = getattr(mod, "weight", None)
        shape = tuple(weight_matrix(mod).shape) if isinstance(weight, torch.Tensor) else skip[1] if skip else ()
        reason = _join(skip[2] if skip else "", pinned.get(fqn, ""))
        kind = layer_kind(mod) if skip is None else skip[0]
        if fqn in shapes:
            before, after = shapes[fqn]
            rows.append(LayerReport(fqn, kind, shape, "slimmed", "channel", math.prod(after) / math.prod(before),
                                    reason, layout=_channel_layout(before, after), dense_shape=before))
        else:
            rows.append(LayerReport(fqn, kind, shape, "skipped", reason=reason or "left dense"))
    return SparsityReport(rows)


def _sparse_row(fqn: str, mod: nn.Module, rec: _Record, slimmed: tuple | None, residual: str) -> LayerReport:
    meta = mod.format_meta
    shape = tuple(meta["shape"])
    kept = mod.kept_fraction()
    before = None
    if slimmed is not None and meta["kind"] == "channel":  # kept and layout against the unslimmed layer
        before = slimmed[0]
        kept *= math.prod(shape) / math.prod(before)
    layout = _layout(meta, mod.packed.state()[0] if meta["kind"] == "channel" else {}, before)
    plans = {b: rec.plans.get(fqn, {}).get(b, BucketPlan(b, be.value)) for b, be in mod.plan.items()}
    return LayerReport(fqn, type(mod).__name__, shape, "sparse", meta["kind"], kept,
                       residual if meta["kind"] == "channel" else "", plans, layout, before)


REPORT_KEY = "layer_report"  # key of a saved file's ``extra`` that holds the rows a file cannot tell (to_json)


def file_report(source: "str | Path | Any") -> SparsityReport:
    """The report for a saved file (a path, or a ``SavedModel`` from ``sparsecore.read``): each sparse
    layer's type, format, layout, shape and kept fraction, from the packed tensors. The layers a file holds
    dense (skipped or slimmed) appear when the file records them: ``extra[REPORT_KEY]``, the report's
    ``to_json()`` (``sparsecore prune`` writes it). Plans are per machine and not saved.

    >>> sc.save(model, path, extra={REPORT_KEY: sc.last_report(model).to_json()})
    """
    from .io import SavedModel, packed_layer, read

    saved = source if isinstance(source, SavedModel) else read(source)
    extra = saved.header.get("extra")
    recorded = SparsityReport.from_json(extra[REPORT_KEY]) if isinstance(extra, dict) and REPORT_KEY in extra \
        else SparsityReport()
    notes = {r.fqn: r for r in recorded.layers}
    layers = {}
    for fqn, entry in saved.header["layers"].items():
        packed, _ = packed_layer(fqn, entry, saved.tensors)
        tensors, meta = packed.state()
        kind = "SparseLinear" if entry["type"] == "linear" else "SparseConv2d"
        shape = tuple(meta["shape"])
        note = notes.get(fqn)
        before = note.dense_shape if note is not None and meta["kind"] == "channel" else None
        kept = _kept(tensors, shape) * (math.prod(shape) / math.prod(before) if before else 1.0)
        layers[fqn] = LayerReport(fqn, kind, shape, "sparse", meta["kind"], kept, note.reason if note else "",
                                  layout=_layout(meta, tensors, before), dense_shape=before)
    for r in recorded.layers:  # the rows the packed tensors cannot tell: layers the file holds dense
        if r.status != "sparse" and r.fqn not in layers:
            layers[r.fqn] = r
    order = {r.fqn: i for i, r in enumerate(recorded.layers)}
    return SparsityReport(sorted(layers.values(), key=lambda r: order.get(r.fqn, len(order))))
