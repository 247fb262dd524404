"""Configuration objects (frozen dataclasses) that travel with saved models."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

PATTERNS = ("unstructured", "nm", "channel")
SCOPES = ("layer", "global")


@dataclass(frozen=True)
class SparsityConfig:
    """What to prune and how to store it.

    pattern: "unstructured" (keep-k by score), "nm" (keep n of every m along K), "channel" (keep-k output
        channels by L2 norm).
    sparsity: pruned fraction in [0, 1] for "unstructured" and "channel" (default 0.5). For "nm" the pattern
        fixes it at ``1 - n/m``: leave it out (it is then set to that value) or give exactly that value;
        any other value raises rather than being ignored.
    n, m: the N:M pattern (m in {4, 8}).
    scope: "layer" (every layer pruned to ``sparsity``) or "global" (one ranking over all layers).
    backend: execution backend name ("auto" lets the planner choose; see sparsecore.backends.Backend).
    """

    pattern: str = "unstructured"
    sparsity: float | None = None
    n: int = 2
    m: int = 4
    scope: str = "layer"
    backend: str = "auto"

    def __post_init__(self) -> None:
        from .backends.registry import Backend

        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS}, got {self.pattern!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        for name in ("n", "m"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
        if self.sparsity is None:
            object.__setattr__(self, "sparsity", 1.0 - self.n / self.m if self.pattern == "nm" else 0.5)
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not 0.0 <= self.sparsity <= 1.0:
            raise ValueError(f"sparsity must be a number in [0, 1], got {self.sparsity!r}")
        if self.pattern == "nm":
            if self.m not in (4, 8) or not (isinstance(self.n, int) and 0 < self.n < self.m):
                raise ValueError(f"N:M needs m in (4, 8) and 0 < n < m, got {self.n}:{self.m}")
            if self.scope != "layer":
                raise ValueError("N:M pruning is per group; scope must be 'layer'")
            if abs(self.sparsity - (1.0 - self.n / self.m)) > 1e-9:
                raise ValueError(f"{self.n}:{self.m} prunes {1 - self.n / self.m:g} of every group; sparsity "
                                 f"{self.sparsity!r} contradicts it (leave sparsity out for N:M)")
        try:
            Backend(self.backend)
        except ValueError:
            raise ValueError(f"backend must be one of {[b.value for b in Backend]}, got {self.backend!r}") from None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SparsityConfig":
        if not isinstance(data, dict) or set(data) - set(cls.__dataclass_fields__):
            raise ValueError(f"bad SparsityConfig data: {data!r}")
        return cls(**data)
