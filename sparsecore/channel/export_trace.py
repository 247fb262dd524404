"""Channel tracing through ``torch.export``: transformers, several positional and keyword inputs.

The model is exported (non-strict, on the example inputs) to an ATen graph, and the graph is run once on
*label tensors* instead of data: every tensor value gets an int64 tensor of its shape whose entries say which
channel ("atom") each element belongs to. A ``linear`` whose weight is a parameter of an ``nn.Linear`` makes
fresh atoms along its last dim; data movement (view, reshape, transpose, permute, expand, slice, cat, split...)
is the same ATen op applied to the labels, so a ``[B, S, H*D] -> [B, H, S, D]`` head split carries each
element's atom to where the element goes. Atoms are united (union-find) wherever two labelled elements meet:
an elementwise op (residual add, SwiGLU's ``silu(gate) * up``), a batched matmul (``q @ k^T`` and ``p @ v``
unite a head's q, k and v columns), scaled-dot-product attention (per head; a GQA key/value head with all
query heads that read it). The resulting *units* are the sets of output rows that must go together: an MLP
hidden channel, an attention head (a key/value group under GQA).

Label values: ``-1`` free (not derived from any traced layer's output: inputs, constants, parameters,
position tables), ``0`` the pinned atom, ``> 0`` layer output atoms. A unit is *pinned* (never removed) when
it reaches the model output, an op the tracer does not know, a reduction or normalisation over a dimension
along which units differ (a LayerNorm over the hidden size), an elementwise op with a free tensor that is not
broadcast along such a dimension (adding the residual stream), or a linear layer whose weight serves several
calls. ``ChannelGraph.pin_reasons`` keeps, per pinned unit, the first reason found.

Why removal is exact: every op keeps elements of one unit apart from other units' (that is what the unions
ensure), so deleting a unit everywhere changes no other element; its only way into kept elements is through
consumer linear layers, whose columns for it are zeroed in the masked reference.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from .trace import ChannelGraph, LayerInfo, make_groups

__all__ = ["trace_export", "output_tensors"]

FREE, PIN = -1, 0

_MOVE = {"view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "unsqueeze", "squeeze", "slice",
         "select", "narrow", "flatten", "unflatten", "repeat", "repeat_interleave", "split", "split_with_sizes",
         "chunk", "unbind", "cat", "stack", "movedim", "swapaxes", "alias", "view_as"}
_IDENTITY = {"to", "_to_copy", "type_as", "contiguous", "clone", "detach", "detach_", "lift_fresh_copy",
             "dropout", "feature_dropout", "alpha_dropout"}
_ELEMENTWISE = {"add", "sub", "rsub", "mul", "div", "true_divide", "where", "maximum", "minimum", "masked_fill",
                "relu", "gelu", "silu", "sigmoid", "tanh", "neg", "exp", "log", "sqrt", "rsqrt", "abs", "erf", "sin",
                "cos", "pow", "square", "reciprocal", "hardtanh", "clamp", "clamp_min", "clamp_max", "leaky_relu",
                "hardswish", "hardsigmoid", "mish", "softplus", "elu", "relu6", "gelu_", "relu_", "mul_", "add_",
                "div_", "sub_", "silu_", "tanh_"}
_SAME_SHAPE_REDUCE = {"softmax", "_softmax", "log_softmax", "_log_softmax", "cumsum", "cumprod", "_safe_softmax"}
_REDUCE = {"mean", "sum", "amax", "amin", "var", "std", "logsumexp", "norm", "linalg_vector_norm", "prod"}
_MATMUL = {"matmul", "bmm", "mm", "baddbmm", "addmm", "einsum"}
_SDPA = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
         "_scaled_dot_product_attention_math"}
_IGNORE = {"_assert_tensor_metadata", "_assert_scalar", "sym_size", "sym_constrain_range_for_size"}


def output_tensors(obj: Any, out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The tensors inside a model output (tensors, tuples, lists, dicts / ModelOutput), in order."""
    out = [] if out is None else out
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            output_tensors(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            output_tensors(v, out)
    return out


class _Flat(nn.Module):
    """Exports ``model`` with its output reduced to a tuple of tensors (caches and other objects dropped)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        return tuple(output_tensors(self.m(*args, **kwargs)))


class _Labeller:
    def __init__(self) -> None:
        self.parent: list[int] = [0]          # atom 0: the pinned atom
        self.pin_reason: dict[int, str] = {}
        self.deferred: list[tuple[torch.Tensor, tuple[int, ...], str]] = []

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
            self.parent[max(ra, rb)] = min(ra, rb)   # 0 (pinned) stays root of whatever joins it

    def unite(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Unite elementwise the atoms of two broadcast-compatible label tensors (free entries skipped)."""
        a, b = torch.broadcast_tensors(a, b)
        keep = (a >= 0) & (b >= 0) & (a != b)
        if bool(keep.any()):
            for x, y in torch.stack([a[keep], b[keep]], 1).unique(dim=0).tolist():
                self.union(x, y)

    def unite_all(self, labels: torch.Tensor) -> int:
        ids = labels[labels >= 0].unique().tolist()
        for x in ids[1:]:
            self.union(ids[0], x)
        return ids[0] if ids else FREE

    def pin(self, labels: Any, reason: str) -> None:
        for t in _label_tensors(labels):
            for a in t[t > 0].unique().tolist():
                self.pin_reason.setdefault(a, reason)

    def root_table(self) -> torch.Tensor:
        """``[n_atoms]`` the unit (union-find root) of every atom."""
        return torch.tensor([self.find(a) for a in range(len(self.parent))], dtype=torch.long)


def _label_tensors(v: Any) -> list[torch.Tensor]:
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (list, tuple)):
        return [t for x in v for t in _label_tensors(x)]
    return []


def _varies(units: torch.Tensor, dims: list[int]) -> bool:
    for d in dims:
        if units.shape[d] > 1 and bool((units != units.narrow(d, 0, 1)).any()):
            return True
    return False


def _meta_shape(node: fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def trace_export(model: nn.Module, args: tuple, kwargs: dict | None = None) -> ChannelGraph:
    """Trace ``model(*args, **kwargs)`` with ``torch.export`` into a ``ChannelGraph`` of its Linear layers."""
    wrapped = _Flat(model)
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            ep = torch.export.export(wrapped, tuple(args), dict(kwargs or {}), strict=False)
    except Exception as e:  # export failures come in many types; name the cause for the user
        raise ValueError(f"channel tracing: torch.export could not trace {type(model).__name__} on the given "
                         f"example inputs ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    finally:
        for m, training in modes:
            m.training = training
    params = {k: v.removeprefix("m.") for k, v in ep.graph_signature.inputs_to_parameters.items()}
    return _interpret(model, ep.graph_module.graph, params)


def _interpret(model: nn.Module, graph: fx.Graph, params: dict[str, str]) -> ChannelGraph:
    lab = _Labeller()
    env: dict[str, Any] = {}
    layers: dict[str, LayerInfo] = {}
    uses: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_function" and _name(node) == "linear" and isinstance(node.args[1], fx.Node):
            uses[node.args[1].name] = uses.get(node.args[1].name, 0) + 1

    def val(a: Any) -> Any:
        if isinstance(a, fx.Node):
            return env.get(a.name)
        if isinstance(a, (list, tuple)):
            return type(a)(val(x) for x in a)
        return a

    def full(a: fx.Node) -> torch.Tensor | None:
        """Label tensor of node ``a`` with free values materialised as -1 (None if ``a`` is not a tensor)."""
        v = env.get(a.name)
        if isinstance(v, torch.Tensor):
            return v
        shape = _meta_shape(a)
        return None if shape is None else torch.full(shape, FREE, dtype=torch.long)

    def pinned_like(node: fx.Node) -> Any:
        val_ = node.meta.get("val")
        if isinstance(val_, torch.Tensor):
            return torch.full(tuple(val_.shape), PIN, dtype=torch.long)
        if isinstance(val_, (list, tuple)):
            return [torch.full(tuple(v.shape), PIN, dtype=torch.long) if isinstance(v, torch.Tensor) else None for v in val_]
        return None

    def opaque(node: fx.Node, why: str) -> Any:
        ins = [v for v in _label_tensors(val(list(node.args) + list(node.kwargs.values()))) if v is not None]
        if not ins:
            return None
        lab.pin(ins, why)
        return pinned_like(node)

    outputs = None
    for node in graph.nodes:
        if node.op == "placeholder":
            env[node.name] = None
            continue
        if node.op == "output":
            outputs = val(node.args[0])     # pinned last: a more specific reason found on the way wins
            continue
        if node.op == "get_attr":
            env[node.name] = None
            continue
        if node.op != "call_function":
            env[node.name] = opaque(node, f"read by {node.target}, which the tracer does not see into")
            continue
        name = _name(node)
        if node.target.__module__ == "_operator" and node.target.__name__ == "getitem":
            src = val(node.args[0])
            env[node.name] = src[node.args[1]] if isinstance(src, (list, tuple)) else None
            continue
        tensor_nodes = [a for a in _flat_nodes((node.args, node.kwargs)) if _meta_shape(a) is not None]
        if name in _IGNORE:
            env[node.name] = None
        elif name == "linear" and isinstance(node.args[1], fx.Node) and node.args[1].name in params:
            env[node.name] = _linear(node, model, params, uses, lab, layers, full)
        elif all(env.get(a.name) is None for a in tensor_nodes):
            env[node.name] = None           # computed from free values only: free
        elif name in _IDENTITY:
            env[node.name] = full(node.args[0])
        elif name in _MOVE:
            env[node.name] = _move(node, lab, full, val)
        elif name in _ELEMENTWISE:
            env[node.name] = _elementwise(node, tensor_nodes, lab, full)
        elif name in _SAME_SHAPE_REDUCE or name in _REDUCE or name in ("native_layer_norm", "layer_norm"):
            env[node.name] = _reduce(node, name, lab, full)
        elif name in _SDPA:
            env[node.name] = _sdpa(node, lab, full)
        elif name in _MATMUL and name not in ("einsum", "addmm", "baddbmm"):
            env[node.name] = _matmul(node, lab, full)
        else:
            env[node.name] = opaque(node, f"read by {name} ({node.name}), which the tracer does not see through")
    return _finish(lab, layers, outputs)


def _name(node: fx.Node) -> str:
    t = node.target
    schema = getattr(t, "_schema", None)
    if schema is not None:
        return schema.name.split("::")[-1]
    return getattr(t, "__name__", str(t))


def _flat_nodes(obj: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(obj, lambda a: found.append(a))
    return found


def _linear(node, model, params, uses, lab, layers, full) -> torch.Tensor:
    x, w = node.args[0], node.args[1]
    fqn = params[w.name].rpartition(".")[0]
    shape = _meta_shape(node)
    k = _meta_shape(w)[1]
    x_lab = full(x)
    mod = model.get_submodule(fqn) if fqn else model
    if type(mod) is not nn.Linear or uses[w.name] > 1 or fqn in layers:
        lab.pin(x_lab, f"read by {fqn!r}, whose weight serves several calls")
        return torch.full(shape, PIN, dtype=torch.long)
    rows = x_lab.reshape(-1, k)
    in_atoms = rows[0].clone()
    varies = (rows != rows[0]).any(0)
    if bool(varies.any()):
        lab.pin(rows[:, varies], f"columns of {fqn!r} read different channels at different positions")
        in_atoms[varies] = PIN
    in_atoms[in_atoms < 0] = PIN
    out = lab.new(shape[-1])
    layers[fqn] = LayerInfo(fqn, "linear", out, in_atoms)
    return out.expand(shape).clone()


def _move(node, lab, full, val) -> Any:
    target, args = node.target, list(node.args)
    name = _name(node)
    if name in ("cat", "stack"):
        args[0] = [full(a) for a in args[0]]
    else:
        args[0] = full(args[0])
    args[1:] = [val(a) for a in args[1:]]
    kwargs = {k: val(v) for k, v in node.kwargs.items()}
    if name in ("view", "_unsafe_view"):   # label tensors may be laid out differently from the real ones
        return torch.reshape(args[0], args[1])
    return target(*args, **kwargs)


def _elementwise(node, tensor_nodes, lab, full) -> torch.Tensor:
    shape = _meta_shape(node)
    labelled = [full(a) for a in tensor_nodes if a is not None and full(a) is not None and bool((full(a) >= 0).any())]
    if not labelled:
        return torch.full(shape, FREE, dtype=torch.long)
    out = labelled[0].expand(shape).clone() if tuple(labelled[0].shape) != shape else labelled[0].clone()
    for other in labelled[1:]:
        lab.unite(out, other)
    for a in tensor_nodes:
        t = full(a)
        if t is not None and not bool((t >= 0).any()):
            lab.deferred.append((out, _meta_shape(a), f"combined by {_name(node)} ({node.name}) with a per-channel tensor the tracer does not follow"))
    return out


def _reduce(node, name, lab, full) -> Any:
    x = full(node.args[0])
    rank = x.dim()
    if name in ("native_layer_norm", "layer_norm"):
        dims = list(range(rank - len(node.args[1]), rank))
    elif name in _SAME_SHAPE_REDUCE:
        dims = [node.args[1] % rank]
    else:
        d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = list(range(rank)) if d is None or d == [] else [i % rank for i in (d if isinstance(d, (list, tuple)) else [d])]
    mixed = tuple(s if i in dims else 1 for i, s in enumerate(x.shape))   # checked like a free operand of this shape
    lab.deferred.append((x, mixed, f"mixed by {name} ({node.name}) over a dimension along which channels differ"))
    if name in _SAME_SHAPE_REDUCE or name in ("native_layer_norm", "layer_norm"):
        return [x, None, None] if name == "native_layer_norm" else x
    out_shape = _meta_shape(node)
    picked = x
    for d in sorted(dims, reverse=True):
        picked = picked.narrow(d, 0, 1)
    return picked.reshape(out_shape) if out_shape is not None else None


def _matmul(node, lab, full) -> torch.Tensor:
    a, b = full(node.args[0]), full(node.args[1])
    shape = _meta_shape(node)
    if a.dim() < 3 or b.dim() < 3 or not (bool((a >= 0).any()) and bool((b >= 0).any())):
        lab.pin([a, b], f"read by {_name(node)} ({node.name}) with an untraced operand")
        return torch.full(shape, PIN, dtype=torch.long)
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a = a.expand(batch + a.shape[-2:]).reshape(-1, *a.shape[-2:])
    b = b.expand(batch + b.shape[-2:]).reshape(-1, *b.shape[-2:])
    unit = torch.tensor([lab.unite_all(torch.cat([a[i].reshape(-1), b[i].reshape(-1)])) for i in range(a.shape[0])])
    return unit.reshape(batch + (1, 1)).expand(shape).clone()


def _sdpa(node, lab, full) -> Any:
    q, k, v = (full(a) for a in node.args[:3])
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    shape = tuple(q.shape[:-1]) + (v.shape[-1],)
    if (isinstance(mask, fx.Node) and full(mask) is not None and bool((full(mask) >= 0).any())) or q.dim() != 4:
        lab.pin([q, k, v], f"attention {node.name} with a traced mask or unusual rank")
        return torch.full(shape, PIN, dtype=torch.long)
    hq, hk = q.shape[1], k.shape[1]
    group = hq // hk
    unit = torch.full(q.shape[:2], FREE, dtype=torch.long)
    for bi in range(q.shape[0]):
        for h in range(hq):
            parts = [q[min(bi, q.shape[0] - 1), h], k[min(bi, k.shape[0] - 1), h // group], v[min(bi, v.shape[0] - 1), h // group]]
            unit[bi, h] = lab.unite_all(torch.cat([p.reshape(-1) for p in parts]))
    out = unit[:, :, None, None].expand(shape).clone()
    if _name(node) != "scaled_dot_product_attention":
        return [out] + [None] * 8
    return out


def _finish(lab: _Labeller, layers: dict[str, LayerInfo], outputs: Any) -> ChannelGraph:
    table = lab.root_table()       # pins never unite, so the units are final here
    for labels, free_shape, why in lab.deferred:
        if free_shape is None:
            continue
        units = torch.where(labels >= 0, table[labels.clamp_min(0)], labels)
        aligned = (1,) * (units.dim() - len(free_shape)) + tuple(free_shape)
        dims = [d for d, s in enumerate(aligned) if s > 1 and d < units.dim()]
        if _varies(units, dims):
            lab.pin(labels, why)
    lab.pin(outputs, "feeds the model output")
    n = len(lab.parent)
    unit = table
    pinned = torch.zeros(n, dtype=torch.bool)
    pinned[0] = True
    reasons: dict[int, str] = {}
    for a, why in lab.pin_reason.items():
        pinned[unit[a]] = True
        reasons.setdefault(int(unit[a]), why)
    graph = ChannelGraph([], layers, unit, pinned, tracer="export", pin_reasons=reasons)
    graph.groups = make_groups(graph)
    return graph
