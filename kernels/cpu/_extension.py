"""Building the native CPU extensions on first use, once per process, shared by ``kernels.cpu`` (sparse
linear) and ``kernels.cpu.attention``: cache names, the stale-lock rule, and a failed build turned into a reason.

Each extension is compiled with ``torch.utils.cpp_extension.load`` (needs a C++ compiler and ninja) into torch's
extension cache (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) under a name hashing its
sources and headers, the flags, torch and Python versions and the CPU's features: an edited source, another
torch or another CPU gets its own build.
"""
from __future__ import annotations

import hashlib
import platform
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional, Sequence

import torch

from .._host import on_poison_change

DIR = Path(__file__).resolve().parent
X86 = platform.machine().lower() in ("x86_64", "amd64")
CFLAGS = ["-O3", "-fopenmp", "-std=c++17"] + ([] if X86 else ["-DSPARSECORE_PORTABLE_ONLY"])
LDFLAGS = ["-fopenmp"]
_CPU_FLAGS = ("avx2", "fma", "f16c", "bmi1", "bmi2", "popcnt", "avx512f", "avx512bw", "avx512vl", "avx512dq",
              "avx512_vbmi2")

# torch's build lock is a file that a killed build leaves behind, and every later build then waits for it
# forever. A build takes minutes at most, so a lock older than this belongs to a dead build.
STALE_LOCK_S = 15 * 60


class CpuKernelsUnavailable(RuntimeError):
    """The native CPU kernels cannot run here (no compiler, failed build, unsupported instruction set)."""


def cpu_features() -> str:
    """``machine:flag,flag,...`` of the instruction-set features the kernels use (part of the build name)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return platform.machine() + ":" + ",".join(f for f in _CPU_FLAGS if f in flags)


def clear_stale_lock(lock: Path) -> None:
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
    except FileNotFoundError:
        pass


def build(prefix: str, sources: Sequence[str], headers: Sequence[str]) -> ModuleType:
    """Compiles (or loads from the cache) ``sources`` of this folder as extension ``<prefix>_<hash>``."""
    from torch.utils import cpp_extension

    h = hashlib.sha256()
    for name in sorted(sources) + list(headers):
        h.update(name.encode() + b"\0" + (DIR / name).read_bytes())
    h.update(repr((CFLAGS, LDFLAGS, torch.__version__, cpu_features(), platform.python_version())).encode())
    name = prefix + "_" + h.hexdigest()[:16]
    cpp_extension.verify_ninja_availability()  # raises RuntimeError naming ninja
    clear_stale_lock(Path(cpp_extension._get_build_directory(name, False)) / "lock")
    mod = cpp_extension.load(name, [str(DIR / s) for s in sources], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
                             verbose=False)
    on_poison_change(mod.set_poison)
    return mod


def load_once(state: dict[str, object], lock: threading.Lock, make: Callable[[], ModuleType], what: str
              ) -> ModuleType:
    """``state["module"]``, made by ``make()`` on the first call; a failure is kept in ``state["error"]`` (never
    retried) and raised as ``CpuKernelsUnavailable`` naming ``what`` could not be built."""
    mod = state.get("module")
    if mod is not None:
        return mod  # type: ignore[return-value]
    with lock:
        if "module" not in state and "error" not in state:
            try:
                state["module"] = make()
            except Exception as e:  # any build failure becomes the reason reported by why_unavailable
                state["error"] = f"{what} could not be built: {type(e).__name__}: {e}".strip()
    if "error" in state:
        raise CpuKernelsUnavailable(str(state["error"]))
    return state["module"]  # type: ignore[return-value]


def unavailable_reason(extension: Callable[[], ModuleType]) -> Optional[str]:
    """``None`` if ``extension()`` loads (building it if needed), else the reason."""
    try:
        extension()
    except CpuKernelsUnavailable as e:
        return str(e)
    return None


def isas(state: dict[str, object], extension: Callable[[], ModuleType]) -> tuple[str, ...]:
    """The extension's ``available_isas()``, plainest first, asked once."""
    have = state.get("isas")
    if have is None:
        have = state["isas"] = tuple(extension().available_isas())
    return have  # type: ignore[return-value]
