"""End-to-end demo (the README's main job): prune, pack, plan, verify, save/load, and time vs dense.

Runs on CPU when there is no GPU. For each case it prunes a model by magnitude, swaps in sparse modules,
lets the planner pick backends on the real input, checks the sparse output against the masked dense model
computed in float64, round-trips the packed model through a file, and prints bytes and latency.

    python -m sparsecore.demo            # or: sparsecore demo
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import io, planner
from .cli.errors import check_device, positive
from .compare import LatencyComparison, compare_latency
from .config import SparsityConfig
from .models.resnet import resnet18
from .models.transformer import DecoderBlock
from .pruning.base import masked_copy
from .pruning.magnitude import magnitude_masks
from .sparsify import sparse_modules, sparsify

_TOL = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 8e-2}


@dataclass
class CaseResult:
    name: str
    dense_mb: float
    packed_mb: float
    latency: LatencyComparison
    max_err: float
    tol: float
    backends: str
    reloaded_equal: bool

    @property
    def ok(self) -> bool:
        return self.max_err <= self.tol and self.reloaded_equal


def _masked_dense_reference(model: nn.Module, masks: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return masked_copy(model, masks)(x.double())


def _model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer: what a saved file holds (backend-prepared copies are not counted)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def run_case(name: str, make_model, x: torch.Tensor, config: SparsityConfig, filter_fn, rep: int) -> CaseResult:
    """Prune ``make_model()`` under ``config``, verify and time it against its dense self on input ``x``.

    Channel cases are slimmed physically (``sparsify(..., example_inputs=...)``); their reference zeroes
    pruned channels through BatchNorm too (``sparsecore.channel.masked_reference``).
    """
    torch.manual_seed(0)
    dense = make_model().eval().to(x.device, x.dtype)
    masks = magnitude_masks(dense, config, filter_fn)
    if config.pattern == "channel":
        from .channel import masked_reference
        from .masks import check_channel
        ref = masked_reference(dense, {f: check_channel(m) for f, m in masks.items()}, x).double()(x.double())
        sparse = sparsify(copy.deepcopy(dense), config, masks=masks, example_inputs=(x,))  # slims, then plans
    else:
        ref = _masked_dense_reference(dense, masks, x)
        sparse = sparsify(copy.deepcopy(dense), config, masks=masks)
    decisions = planner.plan(sparse, (x,), use_cache=False, rep=max(3, rep // 2))
    with torch.no_grad():
        out = sparse(x)
        err = float((out.double() - ref).abs().max())
        tol = _TOL[x.dtype] * max(1.0, float(ref.abs().max()))
        latency = compare_latency(dense, sparse, (x,), rep=rep)
        with tempfile.TemporaryDirectory() as tmp:
            path = io.save(sparse, Path(tmp) / f"{name}.safetensors", config=config)
            reloaded = io.load(path, make_model().eval()).to(x.device)
            # Plans are per machine and not saved; reuse this run's so both run the same backends.
            for fqn, mod in sparse_modules(reloaded).items():
                mod.load_plan(sparse.get_submodule(fqn).plan)
            before, after = sparse.state_dict(), reloaded.state_dict()
            stored_exact = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
            # Tensors are bit-exact; outputs are compared within tolerance, since a library may pick another
            # algorithm (e.g. oneDNN) for freshly allocated tensors.
            reloaded_equal = stored_exact and float((reloaded(x).double() - out.double()).abs().max()) <= tol
    chosen = sorted({d.chosen for d in decisions})
    return CaseResult(name, _model_bytes(dense) / 2**20, _model_bytes(sparse) / 2**20, latency,
                      err, tol, "+".join(chosen), reloaded_equal)


def _cases(device: torch.device, small: bool):
    dim, hidden = (256, 688) if small else (1024, 2752)

    def block() -> nn.Module:
        return DecoderBlock(dim, hidden, heads=8)

    tokens = torch.randn(1, 1, dim, device=device)  # decode: batch 1, one token
    cases = [
        ("decoder 2:4", block, tokens, SparsityConfig("nm", n=2, m=4), None),
        ("decoder unstructured 90%", block, tokens, SparsityConfig("unstructured", 0.9), None),
        ("decoder unstructured 50%", block, tokens, SparsityConfig("unstructured", 0.5), None),
    ]
    side, width = (32, 16) if small else (64, 64)
    image = torch.randn(1, 3, side, side, device=device)

    def net() -> nn.Module:
        return resnet18(num_classes=10, width=width)

    cases.append(("resnet18 unstructured 70%", net, image, SparsityConfig("unstructured", 0.7), None))
    cases.append(("resnet18 channel 50% slim", net, image, SparsityConfig("channel", 0.5),
                  lambda mod, fqn: fqn != "fc"))  # keep all 10 classes
    return cases


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The demo's options (shared by ``python -m sparsecore.demo`` and ``sparsecore demo``)."""
    ap.add_argument("--small", action="store_true", help="smaller models and fewer repetitions (a quick run)")
    ap.add_argument("--rep", type=positive, help="timed pairs (dense, sparse) per case (default 20; 8 with --small)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu or cuda[:N] (default: cuda when available)")
    ap.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run every demo case; print a table; return 1 if any output check fails."""
    device = check_device(args.device)
    rep = args.rep or (8 if args.small else 20)
    print(f"sparsecore demo on {device} (torch {torch.__version__}, {torch.get_num_threads()} CPU threads)")
    header = (f"{'case':<28}{'dense MB':>9}{'sparse MB':>10}{'dense ms':>10}{'sparse ms':>10}{'speedup':>9}"
              f"{'(IQR)':>13}  {'max err':>9}  backends")
    print(header)
    print("-" * len(header))
    failed = []
    for name, make_model, x, config, filter_fn in _cases(device, args.small):
        r = run_case(name, make_model, x, config, filter_fn, rep)
        mark = "" if r.ok else "  <-- FAILED (" + ("error over tolerance" if r.max_err > r.tol else "reloaded model differs") + ")"
        t = r.latency
        spread = f"{t.ratio_q1:.2f}-{t.ratio_q3:.2f}x"
        print(f"{r.name:<28}{r.dense_mb:>9.2f}{r.packed_mb:>10.2f}{t.dense_ms:>10.3f}{t.sparse_ms:>10.3f}"
              f"{t.ratio:>8.2f}x {spread:>12}  {r.max_err:>9.2e}  {r.backends}{mark}")
        if not r.ok:
            failed.append(name)
    print(f"\nMB: all parameters and buffers of the model (what its file holds); latency: medians of the whole")
    print(f"model's forward pass over {rep} interleaved (dense, sparse) pairs; speedup: ratio of the medians,")
    print("with the quartiles (IQR) of the per-pair ratios dense / sparse.")
    print("verification: sparse output vs the masked dense model in float64; after save/load every stored tensor")
    print("is compared bit for bit and the output again within tolerance.")
    if failed:
        print(f"FAILED: {failed}", file=sys.stderr)
        return 1
    print("all outputs verified")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m sparsecore.demo [options]``: the same as ``sparsecore demo [options]``."""
    from .cli import main as cli_main
    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
