"""Keep attention modules' head counts in step with their narrowed q/k/v projections.

Attention code reshapes ``[B, S, H * D]`` to ``[B, S, H, D]`` with counts it stores as attributes
(``num_heads``, ``num_attention_heads``, ``num_key_value_heads``, ``all_head_size`` ...). When slimming removes
whole heads, those attributes must follow or the reshape breaks (or, worse, silently regroups). For every module
with a narrowed Linear child, an int attribute named as a head count ``h`` with ``h * D`` equal to a child's old
row count (``D`` the module's head-dim attribute) becomes ``new_rows / D``; a width attribute equal to a child's
old row count becomes its new row count. Code that reads counts from elsewhere (a shared config) is caught by
``verify_slim``, which runs the slimmed model against the masked one.
"""
from __future__ import annotations

from torch import nn

__all__ = ["HEAD_COUNT_ATTRS", "HEAD_DIM_ATTRS", "WIDTH_ATTRS", "update_head_counts"]

HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "heads", "num_key_value_heads",
                    "num_kv_heads", "n_kv_heads", "n_kv_head")
HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size", "d_head", "dim_head")
WIDTH_ATTRS = ("all_head_size", "inner_dim")


def _int_attr(mod: nn.Module, name: str) -> int | None:
    v = getattr(mod, name, None)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def update_head_counts(model: nn.Module, resized: dict[str, tuple[int, int]]) -> None:
    """Update head-count / width attributes of the parents of narrowed Linear layers, in place.

    ``resized``: ``{fqn: (old_out_features, new_out_features)}`` of Linear layers whose rows were cut.
    Raises ``ValueError`` when a head-count attribute matches a layer whose new width is not whole heads.

    >>> update_head_counts(model, {"layers.0.attn.q_proj": (4096, 2048)})   # num_heads 32 -> 16 (D = 128)
    """
    by_parent: dict[str, list[tuple[str, int, int]]] = {}
    for fqn, (old, new) in resized.items():
        by_parent.setdefault(fqn.rpartition(".")[0], []).append((fqn, old, new))
    for parent, children in by_parent.items():
        mod = model.get_submodule(parent) if parent else model
        head_dim = next((d for d in (_int_attr(mod, n) for n in HEAD_DIM_ATTRS) if d), None)
        updates = {}
        for name in HEAD_COUNT_ATTRS if head_dim else ():
            h = _int_attr(mod, name)
            new = {n for _, o, n in children if h is not None and o == h * head_dim}
            if not new:
                continue
            if len(new) != 1 or next(iter(new)) % head_dim:
                raise ValueError(f"{parent or 'model'}.{name}: the layers it counts heads of were cut to widths "
                                 f"{sorted(new)}, not one whole number of heads of size {head_dim}")
            updates[name] = next(iter(new)) // head_dim
        for name in WIDTH_ATTRS:
            w = _int_attr(mod, name)
            new = {n for _, o, n in children if w is not None and o == w}
            if len(new) == 1:
                updates[name] = next(iter(new))
        for name, value in updates.items():
            setattr(mod, name, value)
