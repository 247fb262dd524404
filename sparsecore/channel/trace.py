"""Channel dependency tracing: which output channels of which layers are coupled.

Two tracers fill the same ``ChannelGraph``: this file's ``torch.fx`` program for conv nets (channels on dim 1),
and ``export_trace.py`` (``torch.export`` plus label propagation) for models fx cannot trace or whose Linear
layers run on 3-D activations (transformers: MLP hidden channels, attention heads). ``trace_channels`` picks.

A model is traced once with ``torch.fx`` and shape-propagated on an example input. The trace is
boiled down to a short *program* of channel steps (``Step``), one per graph node that carries a
channel dimension (dim 1 of a 2-D ``[B, F]`` or 4-D ``[B, C, H, W]`` tensor):

* ``producer``  Conv2d (groups=1) / Linear: new channels; its input channels are *consumed*;
* ``dw``        depthwise Conv2d (groups = C_in = C_out): output channel c *is* input channel c;
* ``bn``        BatchNorm: carries its input's channels, has per-channel parameters;
* ``pass``      ReLU-like ops with f(0) = 0, pools, dropout, mean over H, W: carries channels;
* ``add``       residual add (or subtract): channel c of both sides is one channel;
* ``cat``       concat along dim 1: channel offsets;
* ``flatten``   ``[B, C, h, w] -> [B, C*h*w]``: channel c becomes features c*h*w .. (c+1)*h*w - 1;
* ``opaque``    anything else (model inputs, grouped convs, unknown ops): fresh channels that are
                *pinned*, and the channels it reads are pinned too (``sink``), so they are never removed.

Interpreting the program over "atoms" (one id per produced channel) and uniting atoms at every add
gives *units*: sets of channels that must be kept or removed together. A ``ChannelGroup`` is a
connected set of maskable layers (conv, linear, depthwise) with their units; a pruner scores units
and expands a unit mask to consistent per-layer masks. The same program, interpreted over bool
"dead channel" vectors, defines the masked reference (``slim.py``).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

__all__ = ["Step", "LayerInfo", "ChannelGraph", "ChannelGroup", "trace_channels", "channel_groups"]

# Modules and functions whose output channel c depends only on input channel c and map 0 to 0.
_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Tanh, nn.Hardtanh,
                 nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_PASS_FUNCS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.silu, F.gelu, F.hardswish, torch.tanh,
               F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_PASS_METHODS = {"relu", "relu_", "tanh", "contiguous", "clone"}
# Residual joins: 0 +/- 0 = 0, and channel c of both sides is one channel.
_ADD_FUNCS = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub}
_ADD_METHODS = {"add", "add_", "__add__", "sub", "sub_", "__sub__"}
_RESHAPE_METHODS = {"view", "reshape", "flatten"}


@dataclass(frozen=True)
class Step:
    """One channel-carrying node. ``op`` is one of the kinds in the module docstring."""

    out: str                       # node name
    op: str
    ins: tuple[str, ...] = ()
    fqn: str | None = None         # module for producer / dw / bn / opaque layers
    size: int = 0                  # channel count of the output
    repeat: int = 1                # flatten: features per channel


@dataclass
class LayerInfo:
    """A layer with per-channel parameters. ``kind``: conv | linear | dw | grouped | bn."""

    fqn: str
    kind: str
    out_atoms: torch.Tensor                  # [out] atom ids of its output channels
    in_atoms: torch.Tensor | None = None     # [in] atom ids of its input columns (conv, linear)


@dataclass
class ChannelGroup:
    """Coupled output channels of several layers.

    ``unit_of[fqn]`` (``[out]`` int64) gives, for each output channel of layer ``fqn``, the unit it
    belongs to; all channels of one unit are kept or removed together. ``prunable[u]`` is False for
    units that feed the model output or an op the tracer cannot see through: those never shrink.

    >>> g = channel_groups(model, x)[0]
    >>> keep = keep_channels(g.scores(l1_scores), k)      # [n_units]
    >>> masks.update(g.expand(keep))                      # consistent per-layer masks
    """

    fqns: tuple[str, ...]
    unit_of: dict[str, torch.Tensor]
    prunable: torch.Tensor                  # [n_units] bool
    units: torch.Tensor                     # [n_units] the units' global ids in the ChannelGraph

    @property
    def n_units(self) -> int:
        return int(self.prunable.numel())

    def scores(self, per_layer: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum per-layer channel scores (``fqn -> [out]``) into unit scores ``[n_units]`` (float64)."""
        total = torch.zeros(self.n_units, dtype=torch.float64)
        for fqn in self.fqns:
            if fqn in per_layer:
                s = per_layer[fqn].detach().to("cpu", torch.float64).reshape(-1)
                if s.numel() != self.unit_of[fqn].numel():
                    raise ValueError(f"scores for {fqn!r} have {s.numel()} entries, layer has {self.unit_of[fqn].numel()} channels")
                total.index_add_(0, self.unit_of[fqn], s)
        return total

    def expand(self, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unit mask ``[n_units]`` -> per-layer output-channel masks ``{fqn: bool [out]}``."""
        if keep.dtype != torch.bool or tuple(keep.shape) != (self.n_units,):
            raise ValueError(f"keep must be bool [{self.n_units}], got {keep.dtype} {tuple(keep.shape)}")
        keep = keep.cpu()
        return {fqn: keep[self.unit_of[fqn]] for fqn in self.fqns}


@dataclass
class ChannelGraph:
    """The traced channel program of a model plus its layers, units and groups."""

    steps: list[Step]
    layers: dict[str, LayerInfo]
    unit: torch.Tensor                      # [n_atoms] unit id (union-find root) of each atom
    pinned_unit: torch.Tensor               # [n_atoms] bool, indexed by unit id
    groups: list[ChannelGroup] = field(default_factory=list)
    tracer: str = "fx"                      # "fx" (conv nets, channels on dim 1) or "export" (linear layers, any rank)
    pin_reasons: dict[int, str] = field(default_factory=dict)   # unit id -> why it is pinned, where known
    called: set[str] = field(default_factory=set)               # fx: modules called in the traced graph

    def interpret(self, fns: dict[str, Callable[..., Any]]) -> dict[str, Any]:
        """Run the channel program with one function per step kind; returns node name -> value."""
        env: dict[str, Any] = {}
        for s in self.steps:
            env[s.out] = fns[s.op](s, *(env[i] for i in s.ins if i in env))
        return env


def _channels(node: Any) -> int | None:
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(tm, "shape", None)
    return int(shape[1]) if shape is not None and len(shape) in (2, 4) else None


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["tensor_meta"].shape)


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) if "tensor_meta" in a.meta else None)
    return found


def _arg(node: fx.Node, i: int, name: str, default: Any) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _flatten_repeat(node: fx.Node, src: fx.Node) -> int | None:
    """Features per channel when ``node`` flattens 4-D ``src`` to ``[B, C*h*w]``, else None."""
    s_in, s_out = _shape(src), _shape(node) if "tensor_meta" in node.meta else ()
    if len(s_in) != 4 or len(s_out) != 2 or s_out[0] != s_in[0] or s_out[1] != s_in[1] * s_in[2] * s_in[3]:
        return None
    return s_in[2] * s_in[3]


def _module_step(node: fx.Node, mod: nn.Module, src: fx.Node | None, size: int) -> Step | None:
    fqn, name = str(node.target), node.name
    if src is None or _channels(src) is None:
        return None
    c_in = _channels(src)
    if isinstance(mod, nn.Conv2d) and len(_shape(src)) == 4:
        if mod.groups == 1:
            return Step(name, "producer", (src.name,), fqn, size)
        if mod.groups == mod.in_channels == mod.out_channels == c_in:
            return Step(name, "dw", (src.name,), fqn, size)
        return Step(name, "grouped", (src.name,), fqn, size)
    if isinstance(mod, nn.Linear) and len(_shape(src)) == 2:
        return Step(name, "producer", (src.name,), fqn, size)
    if isinstance(mod, nn.modules.batchnorm._BatchNorm) and size == c_in:
        return Step(name, "bn", (src.name,), fqn, size)
    if isinstance(mod, nn.Hardtanh) and not mod.min_val <= 0.0 <= mod.max_val:
        return None  # clamps 0 to a non-zero value
    if isinstance(mod, _PASS_MODULES) and size == c_in:
        return Step(name, "pass", (src.name,))
    if isinstance(mod, nn.Flatten) and mod.start_dim == 1 and mod.end_dim == -1:
        rep = _flatten_repeat(node, src)
        return Step(name, "flatten", (src.name,), repeat=rep) if rep else None
    return None


def _function_step(node: fx.Node, size: int) -> Step | None:
    targs = _tensor_args(node)
    if not targs or _channels(targs[0]) is None:
        return None
    src, name, t = targs[0], node.name, node.target
    same = _channels(src) == size
    if node.op == "call_method":
        if t in _PASS_METHODS and same:
            return Step(name, "pass", (src.name,))
        if t in _ADD_METHODS:
            return _add_step(node, targs, size)
        if t == "mean" and _reduces_hw(_arg(node, 1, "dim", None), len(_shape(src))):
            return Step(name, "pass", (src.name,))
        if t in _RESHAPE_METHODS:
            rep = _flatten_repeat(node, src)
            return Step(name, "flatten", (src.name,), repeat=rep) if rep else None
        return None
    if t in _PASS_FUNCS and same:
        return Step(name, "pass", (src.name,))
    if t in _ADD_FUNCS:
        return _add_step(node, targs, size)
    if t is torch.mean and _reduces_hw(_arg(node, 1, "dim", None), len(_shape(src))):
        return Step(name, "pass", (src.name,))
    if t is torch.flatten:
        rep = _flatten_repeat(node, src)
        return Step(name, "flatten", (src.name,), repeat=rep) if rep else None
    if t is torch.cat:
        parts = _arg(node, 0, "tensors", ())
        dim = _arg(node, 1, "dim", 0)
        rank = len(_shape(src))
        if (dim in (1, 1 - rank) and all(isinstance(p, fx.Node) and _channels(p) is not None for p in parts)
                and sum(_channels(p) for p in parts) == size):
            return Step(name, "cat", tuple(p.name for p in parts), size=size)
    return None


def _add_step(node: fx.Node, targs: list[fx.Node], size: int) -> Step | None:
    # Only tensor + tensor with equal channel counts: adding a constant makes a zero channel non-zero.
    if len(targs) != 2 or any(_channels(a) != size for a in targs):
        return None
    others = [a for a in node.args if not isinstance(a, fx.Node)]
    if others:
        return None
    return Step(node.name, "add", (targs[0].name, targs[1].name), size=size)


def _reduces_hw(dim: Any, rank: int) -> bool:
    if rank != 4 or not isinstance(dim, (tuple, list)):
        return False
    return sorted(d % 4 for d in dim) == [2, 3]


def _is_metadata(node: fx.Node) -> bool:
    """``x.size(0)``, ``x.shape``, ``x.dim()``, ``len(x)``: they read shapes, never channel values."""
    if node.op == "call_method":
        return node.target in ("size", "dim", "numel")
    return node.op == "call_function" and (node.target is len or (
        node.target is getattr and len(node.args) > 1 and node.args[1] in ("shape", "dtype", "device", "ndim")))


def _build_steps(gm: fx.GraphModule) -> list[Step]:
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    steps: list[Step] = []
    for node in gm.graph.nodes:
        size = _channels(node)
        if node.op == "output":
            srcs = tuple(a.name for a in _tensor_args(node) if _channels(a) is not None)
            steps.append(Step(node.name, "sink", srcs))
            continue
        step = None
        if node.op == "call_module" and size is not None:
            # A layer with parameters called twice (weight sharing) cannot be sliced for one call only.
            shared = calls[node.target] > 1 and any(True for _ in gm.get_submodule(node.target).parameters())
            targs = [] if shared else _tensor_args(node)
            step = _module_step(node, gm.get_submodule(node.target), targs[0] if len(targs) == 1 else None, size)
        elif node.op in ("call_function", "call_method") and size is not None:
            step = _function_step(node, size)
        if step is not None:
            steps.append(step)
            continue
        # Unknown: pin what it reads (its channel semantics are unknown), pin what it makes.
        srcs = tuple(a.name for a in _tensor_args(node) if _channels(a) is not None)
        if srcs and node.op != "placeholder" and not _is_metadata(node):
            steps.append(Step(node.name + ".__sink", "sink", srcs))
        if size is not None:
            steps.append(Step(node.name, "opaque", (), size=size))
    return steps


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self, n: int) -> torch.Tensor:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return torch.arange(start, start + n)

    def find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the lower (earlier) atom stays root


TRACERS = ("auto", "fx", "export")


def trace_channels(model: nn.Module, example_input: torch.Tensor | tuple, example_kwargs: dict | None = None, *,
                   tracer: str = "auto") -> ChannelGraph:
    """Trace ``model(*example_input, **example_kwargs)`` into a ``ChannelGraph``.

    ``example_input``: one tensor or a tuple of positional inputs. ``tracer``: "fx" (``torch.fx`` + shape
    propagation; conv nets whose channels sit on dim 1 of 2-D / 4-D tensors, one positional input), "export"
    (``torch.export`` + label propagation, ``export_trace.py``: Linear layers on inputs of any rank, attention
    heads, several positional and keyword inputs) or "auto": fx where it traces a single-input model and sees
    every Linear call as a channel layer, else export.
    """
    if tracer not in TRACERS:
        raise ValueError(f"tracer must be one of {TRACERS}, got {tracer!r}")
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    if tracer == "export":
        from .export_trace import trace_export
        return trace_export(model, args, example_kwargs)
    single = len(args) == 1 and isinstance(args[0], torch.Tensor) and not example_kwargs
    if tracer == "fx" and not single:
        raise ValueError("tracer='fx' needs exactly one positional tensor input and no keyword inputs")
    if tracer == "auto" and not single:
        from .export_trace import trace_export
        return trace_export(model, args, example_kwargs)
    try:
        graph = _trace_fx(model, args[0])
    except Exception:  # fx cannot trace data-dependent Python (transformers); export can
        if tracer == "fx":
            raise
        from .export_trace import trace_export
        return trace_export(model, args, example_kwargs)
    if tracer == "auto" and not _fx_sees_all_linears(model, graph):
        from .export_trace import trace_export
        return trace_export(model, args, example_kwargs)
    return graph


def _fx_sees_all_linears(model: nn.Module, graph: ChannelGraph) -> bool:
    """False when fx left an nn.Linear out of the channel program (applied to a 3-D tensor, say)."""
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return True          # the export tracer follows Linear layers only; conv nets stay with fx
    return all(f in graph.layers for f, m in model.named_modules() if type(m) is nn.Linear and f in graph.called)


def _trace_fx(model: nn.Module, example_input: torch.Tensor) -> ChannelGraph:
    gm = fx.symbolic_trace(model)
    # Shapes only: run in eval mode so BN running stats are not updated (gm shares the model's modules).
    modes = [(m, m.training) for m in model.modules()]
    try:
        gm.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    finally:
        for m, training in modes:
            m.training = training
    steps = _build_steps(gm)
    uf, layers, pinned_atoms = _UnionFind(), {}, []

    def producer(s: Step, a_in: torch.Tensor) -> torch.Tensor:
        out = uf.new(s.size)
        layers[s.fqn] = LayerInfo(s.fqn, "conv" if isinstance(gm.get_submodule(s.fqn), nn.Conv2d) else "linear", out, a_in)
        return out

    def same_atoms(kind: str) -> Callable[..., torch.Tensor]:
        def fn(s: Step, a_in: torch.Tensor) -> torch.Tensor:
            layers[s.fqn] = LayerInfo(s.fqn, kind, a_in)
            return a_in
        return fn

    def grouped(s: Step, a_in: torch.Tensor) -> torch.Tensor:
        pinned_atoms.append(a_in)
        out = uf.new(s.size)
        pinned_atoms.append(out)
        layers[s.fqn] = LayerInfo(s.fqn, "grouped", out, a_in)
        return out

    def add(s: Step, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        for x, y in zip(a.tolist(), b.tolist()):
            uf.union(x, y)
        return a

    def opaque(s: Step) -> torch.Tensor:
        out = uf.new(s.size)
        pinned_atoms.append(out)
        return out

    def sink(s: Step, *ins: torch.Tensor) -> None:
        pinned_atoms.extend(ins)

    graph = ChannelGraph(steps, layers, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.bool))
    graph.called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    graph.interpret({
        "producer": producer, "dw": same_atoms("dw"), "bn": same_atoms("bn"), "grouped": grouped,
        "pass": lambda s, a: a, "add": add, "cat": lambda s, *parts: torch.cat(parts),
        "flatten": lambda s, a: a.repeat_interleave(s.repeat), "opaque": opaque, "sink": sink,
    })
    graph.unit = torch.tensor([uf.find(a) for a in range(len(uf.parent))], dtype=torch.long)
    graph.pinned_unit = torch.zeros(len(uf.parent), dtype=torch.bool)
    for atoms in pinned_atoms:
        graph.pinned_unit[graph.unit[atoms]] = True
    graph.groups = make_groups(graph)
    return graph


def make_groups(graph: ChannelGraph) -> list[ChannelGroup]:
    members = [f for f, info in graph.layers.items() if info.kind != "bn"]
    # Members sharing a unit are in one group: union-find over members through units.
    parent = {f: f for f in members}

    def find(f: str) -> str:
        while parent[f] != f:
            f = parent[f]
        return f

    owner: dict[int, str] = {}
    for f in members:
        for u in graph.unit[graph.layers[f].out_atoms].unique().tolist():
            if u in owner:
                ra, rb = find(owner[u]), find(f)
                if ra != rb:
                    parent[rb] = ra
            else:
                owner[u] = f
    by_root: dict[str, list[str]] = {}
    for f in members:
        by_root.setdefault(find(f), []).append(f)
    groups = []
    for fqns in by_root.values():
        local: dict[int, int] = {}   # global unit id -> unit index in the group, in member/channel order
        unit_of = {}
        for f in fqns:
            ids = graph.unit[graph.layers[f].out_atoms].tolist()
            unit_of[f] = torch.tensor([local.setdefault(u, len(local)) for u in ids], dtype=torch.long)
        units = torch.tensor(list(local), dtype=torch.long)
        groups.append(ChannelGroup(tuple(fqns), unit_of, ~graph.pinned_unit[units], units))
    return groups


def channel_groups(model: nn.Module, example_input: torch.Tensor | tuple, example_kwargs: dict | None = None, *,
                   tracer: str = "auto") -> list[ChannelGroup]:
    """Coupled channel groups of ``model``'s conv / linear / depthwise layers (see ``ChannelGroup``)."""
    return trace_channels(model, example_input, example_kwargs, tracer=tracer).groups
