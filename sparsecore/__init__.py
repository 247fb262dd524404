"""sparsecore: sparse inference for pruned PyTorch models.

Prune (masks) -> pack (formats) -> swap modules (``sparsify``) -> plan backends (``plan``) -> ``save``/``load``.

>>> import sparsecore as sc
>>> model = sc.sparsify(model, sc.SparsityConfig("nm", n=2, m=4), example_inputs=(x,))
>>> sc.save(model, "model.sparsecore.safetensors")
"""
__version__ = "0.1.0"

from .attention import AttentionChoice, use_fast_attention  # noqa: E402
from .backends import Backend, BackendUnavailable  # noqa: E402
from .config import SparsityConfig  # noqa: E402
from .formats import ChannelWeight, FormatError, NMWeight, PackedWeight, UnstructuredWeight  # noqa: E402
from .io import FileFormatError, SkeletonMismatchError, load, read, save  # noqa: E402
from .masks import PatternError  # noqa: E402
from .memory import resident_bytes  # noqa: E402
from .modules import SparseConv1D, SparseConv2d, SparseLinear, pack  # noqa: E402
from .planner import plan  # noqa: E402
from .pruning.magnitude import magnitude_masks  # noqa: E402
from .pruning.wanda import wanda_masks  # noqa: E402
from .report import LayerReport, SparsityReport, file_report, last_report  # noqa: E402
from .sparsify import sparse_modules, sparsify  # noqa: E402

__all__ = ["AttentionChoice", "use_fast_attention", "Backend", "BackendUnavailable", "SparsityConfig", "ChannelWeight", "FormatError", "NMWeight",
           "PackedWeight", "UnstructuredWeight", "FileFormatError", "SkeletonMismatchError", "load", "read", "save",
           "PatternError", "SparseConv1D", "SparseConv2d", "SparseLinear", "pack", "plan", "magnitude_masks",
           "sparse_modules", "sparsify", "LayerReport", "SparsityReport", "file_report", "last_report", "resident_bytes",
           "wanda_masks"]
