"""Configuration objects (frozen dataclasses) that travel with saved models."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

SCOPES = ("layer", "global")


def patterns() -> tuple[str, ...]:
    """The registered format kinds, each a valid ``SparsityConfig.pattern`` (``sparsecore.formats.FORMATS``)."""
    from .formats import FORMATS
    return tuple(FORMATS)


def __getattr__(name: str) -> Any:  # ``config.PATTERNS`` reads the format registry at the time of the call
    if name == "PATTERNS":
        return patterns()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class SparsityConfig:
    """What to prune and how to store it.

    pattern: a registered format kind: "unstructured" (keep-k by score), "nm" (keep n of every m along K),
        "channel" (keep-k output channels by L2 norm), or any format registered with ``register_format``.
    sparsity: pruned fraction in [0, 1] for "unstructured" and "channel" (ignored for "nm": n/m fixes it).
    n, m: the N:M pattern (m in {4, 8}).
    scope: "layer" (every layer pruned to ``sparsity``) or "global" (one ranking over all layers).
    backend: execution backend name ("auto" lets the planner choose), one of the declared backends
        (``sparsecore.backends.backend_names()``).
    """

    pattern: str = "unstructured"
    sparsity: float = 0.5
    n: int = 2
    m: int = 4
    scope: str = "layer"
    backend: str = "auto"

    def __post_init__(self) -> None:
        from .formats import FORMATS

        if self.pattern not in FORMATS:
            raise ValueError(f"pattern must be one of {tuple(FORMATS)}, got {self.pattern!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not 0.0 <= self.sparsity <= 1.0:
            raise ValueError(f"sparsity must be a number in [0, 1], got {self.sparsity!r}")
        FORMATS[self.pattern].check_config(self)
        from .backends.registry import backend_names  # the declared backends, looked up when a config is made

        if self.backend not in backend_names():
            raise ValueError(f"backend must be one of {list(backend_names())}, got {self.backend!r}")

    @property
    def format(self) -> type:
        """The packed-weight class of ``pattern`` (a ``sparsecore.formats.PackedWeight`` subclass)."""
        from .formats import FORMATS
        return FORMATS[self.pattern]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SparsityConfig":
        if not isinstance(data, dict) or set(data) - set(cls.__dataclass_fields__):
            raise ValueError(f"bad SparsityConfig data: {data!r}")
        return cls(**data)
