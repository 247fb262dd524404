"""The ``sparsecore`` command: prune a model to a file, inspect a file, run the benchmarks, run the demo.

    sparsecore prune --model decoder --pattern nm --n 2 --m 4 --out block.safetensors --plan --batch 4
    sparsecore inspect block.safetensors [--json]
    sparsecore bench models --quick
    sparsecore demo

Every user error (bad argument, unreadable file, a pattern a layer cannot take) prints one line
``sparsecore: error: ...`` on stderr and exits with code 2; ``--traceback`` shows the full trace instead.
"""
from __future__ import annotations

import argparse
import fnmatch
import importlib
import inspect as _inspect
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = ["main", "layer_stats", "file_report"]

MODELS = ("mlp", "cnn", "resnet18", "resnet50", "decoder", "encoder")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# bench subcommand -> module under the repository's bench/ folder
BENCHES = {"kernels-nm": "bench_nm", "kernels-spmm": "bench_spmm", "channel": "bench_channel",
           "models": "bench_models", "accuracy": "bench_accuracy"}
# size options (--dim, --num-classes, ...) passed to the model builders that take them
_MODEL_KWARGS = ("dim", "hidden", "heads", "layers", "width", "num_classes", "in_features")
# pruning methods of sparsecore.pruning listed besides magnitude; usable here once they define oneshot_masks
METHOD_MODULES = ("gmp", "sap", "pdp", "snacs", "psap")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


# -- models ---------------------------------------------------------------------------------------
def _mlp(in_features: int = 64, num_classes: int = 10, hidden: int = 128, layers: int = 2) -> nn.Module:
    """sparsecore.models.small.MLP with ``layers`` hidden layers of width ``hidden`` (digits-sized default)."""
    from .models.small import MLP
    return MLP(in_features, num_classes, hidden=(hidden,) * layers)


def _cnn(num_classes: int = 10, width: int = 16, hidden: int = 64, image_size: int = 8) -> nn.Module:
    """sparsecore.models.small.SmallCNN on ``1 x S x S`` images, channels ``(width, 2 * width)``."""
    from .models.small import SmallCNN
    return SmallCNN((1, image_size, image_size), num_classes, channels=(width, 2 * width), hidden=hidden)


def _builder(name: str) -> Callable[..., nn.Module]:
    if name in ("decoder", "encoder"):
        from .models import transformer
        return transformer.DecoderBlock if name == "decoder" else transformer.encoder
    if name in ("resnet18", "resnet50"):
        from .models import resnet
        return getattr(resnet, name)
    return _mlp if name == "mlp" else _cnn


def build_model(name: str, options: dict[str, int]) -> nn.Module:
    """Build model ``name`` with random init; ``options`` (e.g. ``{"dim": 256}``) go to its builder."""
    if name not in MODELS:
        raise CLIError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    fn = _builder(name)
    params = _inspect.signature(fn).parameters
    bad = sorted(k for k in options if k not in params)
    if bad:
        raise CLIError(f"model {name!r} does not take {', '.join('--' + b.replace('_', '-') for b in bad)}; "
                       f"it takes {', '.join(p for p in params if p in _MODEL_KWARGS) or 'no size options'}")
    return fn(**options)


def example_inputs(name: str, model: nn.Module, batch: int, dtype: torch.dtype, device: torch.device,
                   seq: int, image_size: int) -> tuple[torch.Tensor]:
    """A random input batch for ``model``: decoder ``[B, 1, dim]`` (decode), encoder ``[B, seq, dim]``,
    conv nets ``[B, C_in, S, S]``, MLP ``[B, in_features]``."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
    if first is None:
        raise CLIError(f"model {name!r} has no Linear or Conv2d layer")
    if hasattr(model, "in_shape"):  # models that fix their input shape (SmallCNN)
        shape: tuple[int, ...] = (batch, *model.in_shape)
    elif isinstance(first, nn.Conv2d):
        shape = (batch, first.in_channels, image_size, image_size)
    elif name in ("decoder", "encoder"):
        shape = (batch, 1 if name == "decoder" else seq, first.in_features)
    else:
        shape = (batch, first.in_features)
    return (torch.randn(*shape, device=device).to(dtype),)


# -- pruning methods ------------------------------------------------------------------------------
def available_methods() -> dict[str, Callable | None]:
    """Pruning methods by name -> one-shot mask function, or ``None`` for methods that need training data.

    ``magnitude`` is built in. A module ``sparsecore.pruning.<name>`` that defines
    ``oneshot_masks(model, config, filter_fn=None) -> {fqn: mask}`` is usable from the command line too.
    """
    from .pruning.magnitude import magnitude_masks

    methods: dict[str, Callable | None] = {"magnitude": magnitude_masks}
    for name in METHOD_MODULES:
        try:
            mod = importlib.import_module(f".pruning.{name}", __package__)
        except ImportError:  # not written yet in this install
            continue
        methods[name] = getattr(mod, "oneshot_masks", None)
    return methods


def _masks(method: str, model: nn.Module, config, filter_fn) -> dict[str, torch.Tensor]:
    methods = available_methods()
    if method not in methods:
        raise CLIError(f"unknown pruning method {method!r}; known: {', '.join(sorted(methods))}")
    fn = methods[method]
    if fn is None:
        usable = sorted(k for k, v in methods.items() if v is not None)
        raise CLIError(f"method {method!r} needs training data and a training loop (see sparsecore.pruning."
                       f"{method}); one-shot methods usable here: {', '.join(usable)}")
    return fn(model, config, filter_fn)


# -- per-layer statistics -------------------------------------------------------------------------
def _kept(p) -> int:
    """Stored (kept) weight entries of a PackedWeight, from its structure."""
    if hasattr(p, "nnz"):
        return int(p.nnz)
    numel = math.prod(p.shape)
    if p.kind == "nm":
        return numel // p.m * p.n
    if p.kind == "channel":
        return p.n_out * p.n_in * math.prod(p.shape[2:])
    return int(torch.count_nonzero(p.to_dense()))


def _pattern(p) -> str:
    if p.kind == "nm":
        return f"{p.n}:{p.m}"
    if p.kind == "channel":
        return f"out {p.n_out}/{p.shape[0]} in {p.n_in}/{p.shape[1]}"
    return "unstructured"


def layer_stats(fqn: str, op: str, p) -> dict[str, Any]:
    """One row of the per-layer report for PackedWeight ``p``."""
    from .formats.base import dtype_name

    numel = math.prod(p.shape)
    return {"layer": fqn, "type": op, "format": p.kind, "pattern": _pattern(p), "shape": list(p.shape),
            "dtype": dtype_name(p.dtype), "sparsity": 1.0 - _kept(p) / numel if numel else 0.0,
            "packed_bytes": int(p.nbytes), "dense_bytes": int(p.dense_nbytes),
            "ratio": p.dense_nbytes / p.nbytes if p.nbytes else float("inf")}


def file_report(path: str | Path) -> dict[str, Any]:
    """Per-layer and total statistics of a saved file, from the file alone (no model needed)."""
    from .io import FileFormatError, packed_layer, read

    saved = read(path)
    layers, packed_keys = [], set()
    for fqn, entry in saved.header["layers"].items():
        try:
            packed, keys = packed_layer(fqn, entry, saved.tensors)
        except FileFormatError as e:
            raise FileFormatError(f"{path}: {e}") from None
        packed_keys.update(keys)
        layers.append(layer_stats(fqn, entry["type"], packed))
    aliases = saved.header["aliases"]
    other = sum(t.numel() * t.element_size() for k, t in saved.tensors.items()
                if k not in packed_keys and k not in aliases)
    packed_total = sum(r["packed_bytes"] for r in layers)
    dense_total = sum(r["dense_bytes"] for r in layers)
    return {"file": str(path), "config": saved.header.get("config"), "extra": saved.header.get("extra"), "layers": layers,
            "totals": {"sparse_layers": len(layers), "packed_bytes": packed_total, "dense_bytes": dense_total,
                       "ratio": dense_total / packed_total if packed_total else float("nan"),
                       "other_bytes": other, "model_bytes": packed_total + other,
                       "dense_model_bytes": dense_total + other}}


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def format_table(rows: list[dict[str, Any]], plans: dict[str, str] | None = None) -> str:
    """Fixed-width per-layer table (the text shown by ``prune`` and ``inspect``)."""
    head = ["layer", "format", "pattern", "shape", "dtype", "sparsity", "packed", "dense", "ratio"]
    if plans is not None:
        head.append("backend")
    table = [head]
    for r in rows:
        line = [r["layer"] or "<root>", r["format"], r["pattern"], "x".join(map(str, r["shape"])), r["dtype"],
                f"{r['sparsity']:.4f}", _fmt_bytes(r["packed_bytes"]), _fmt_bytes(r["dense_bytes"]),
                f"{r['ratio']:.2f}x"]
        if plans is not None:
            line.append(plans.get(r["layer"], "dense (unplanned)"))
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


def _print_totals(t: dict[str, Any]) -> None:
    print(f"sparse layers: {t['sparse_layers']}  packed {_fmt_bytes(t['packed_bytes'])} vs dense "
          f"{_fmt_bytes(t['dense_bytes'])} ({t['ratio']:.2f}x smaller)")
    print(f"whole model:   {_fmt_bytes(t['model_bytes'])} vs dense {_fmt_bytes(t['dense_model_bytes'])} "
          f"(other tensors {_fmt_bytes(t['other_bytes'])})")


# -- subcommands ----------------------------------------------------------------------------------
def cmd_prune(args: argparse.Namespace) -> int:
    import sparsecore as sc
    from .sparsify import sparse_modules

    if args.pattern == "nm" and args.sparsity is not None and abs(args.sparsity - (1 - args.n / args.m)) > 1e-9:
        raise CLIError(f"--sparsity {args.sparsity} contradicts {args.n}:{args.m} (which prunes "
                       f"{1 - args.n / args.m:g}); drop --sparsity for nm")
    if args.pattern != "nm" and args.sparsity is None:
        raise CLIError(f"--sparsity is required for pattern {args.pattern!r}")
    config = sc.SparsityConfig(args.pattern, args.sparsity, n=args.n, m=args.m,
                               scope=args.scope, backend=args.backend)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda given but no CUDA device is available")
    options = {k: getattr(args, k) for k in _MODEL_KWARGS if getattr(args, k) is not None}
    if args.model == "cnn" and args.image_size is not None:
        options["image_size"] = args.image_size  # SmallCNN's input size is part of the architecture
    model = build_model(args.model, options).eval()
    if args.checkpoint:
        _load_checkpoint(model, args.checkpoint)
    model = model.to(device=device, dtype=DTYPES[args.dtype])
    excludes = args.exclude or []
    filter_fn = (lambda mod, fqn: not any(fnmatch.fnmatchcase(fqn, pat) for pat in excludes)) if excludes else None
    masks = _masks(args.method, model, config, filter_fn)
    if not masks:
        raise CLIError(f"no layer of {args.model!r} can take pattern {args.pattern!r} (after --exclude)")
    # Inputs are shaped from the dense layers, before they are swapped.
    x = example_inputs(args.model, model, args.batch, DTYPES[args.dtype], device, args.seq, args.image_size or 224)
    sc.sparsify(model, config, masks=masks, progress=sys.stderr.isatty())
    if config.backend != "auto":
        with torch.no_grad():  # a forced backend must be able to run here; find out now, not at deployment
            model(*x)
    plans = None
    if args.plan:
        entries = sc.plan(model, x)
        plans = {e.fqn: e.chosen + (" (cached)" if e.cached else "") for e in entries}
    mods = sparse_modules(model)
    rows = [layer_stats(f, m.op, m.packed) for f, m in mods.items()]
    skeleton = {"model": args.model, "options": options, "dtype": args.dtype}  # what `load` needs to rebuild
    out = sc.save(model.cpu(), args.out, config=config, extra={"skeleton": skeleton})
    print(format_table(rows, plans))
    _print_totals(file_report(out)["totals"])
    print(f"saved {out}")
    return 0


def _load_checkpoint(model: nn.Module, path: str) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise CLIError(f"checkpoint {path} does not exist")
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CLIError(f"checkpoint {path} is not a readable safetensors state_dict: {e}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CLIError(f"checkpoint {path} does not fit this model: missing keys {missing[:5]}, "
                       f"unexpected keys {unexpected[:5]} (check the model and its size options)")


def cmd_inspect(args: argparse.Namespace) -> int:
    report = file_report(args.file)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"file: {report['file']}")
    print(f"config: {json.dumps(report['config']) if report['config'] else 'none recorded'}")
    if report.get("extra"):
        print(f"extra: {json.dumps(report['extra'])}")
    print(format_table(report["layers"]))
    _print_totals(report["totals"])
    return 0


def _bench_root() -> Path:
    # bench/ is not part of the package: found next to the package (editable/source install) or in the cwd.
    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (root / "bench" / "__init__.py").is_file() and (root / "bench" / "common.py").is_file():
            return root
    raise CLIError("the benchmarks live in the repository's bench/ folder, which this install does not have "
                   "(e.g. a wheel install); run from a source checkout")


def cmd_bench(args: argparse.Namespace) -> int:
    root = _bench_root()
    name = BENCHES[args.name]
    if not (root / "bench" / f"{name}.py").is_file():
        raise CLIError(f"benchmark {args.name!r} ({root / 'bench' / (name + '.py')}) is not present in this checkout")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    mod = importlib.import_module(f"bench.{name}")
    argv = (["--quick"] if args.quick else []) + list(args.rest)
    if not callable(getattr(mod, "main", None)):
        raise CLIError(f"bench.{name} has no main(argv) function to call")
    rc = mod.main(argv)
    return rc if isinstance(rc, int) else 0  # some benches return the table they wrote


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from .demo import main as demo_main
    except ImportError as e:
        raise CLIError(f"the demo is not available in this install: {e}") from None
    rc = demo_main(list(args.rest))
    return rc if isinstance(rc, int) else 0


# -- argument parsing -----------------------------------------------------------------------------
def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {v}")
    return v


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from .backends import Backend

    p = argparse.ArgumentParser(prog="sparsecore", description="Sparse inference for pruned PyTorch models.")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("prune", help="prune a model, pack it, optionally plan, save it")
    pr.add_argument("--model", required=True, choices=MODELS)
    pr.add_argument("--pattern", required=True, choices=("unstructured", "nm", "channel"))
    pr.add_argument("--sparsity", type=_fraction, help="pruned fraction (unstructured, channel)")
    pr.add_argument("--n", type=int, default=2, help="N of N:M (default 2)")
    pr.add_argument("--m", type=int, default=4, help="M of N:M (default 4)")
    pr.add_argument("--scope", choices=("layer", "global"), default="layer")
    pr.add_argument("--method", default="magnitude", help="pruning method (default magnitude)")
    pr.add_argument("--exclude", action="append", metavar="GLOB", help="keep layers matching this fqn glob dense")
    pr.add_argument("--backend", default="auto", choices=[b.value for b in Backend])
    pr.add_argument("--dtype", default="float32", choices=list(DTYPES))
    pr.add_argument("--device", default="cpu", help="cpu or cuda (where --plan measures)")
    pr.add_argument("--checkpoint", help="a plain state_dict saved with safetensors, loaded before pruning")
    pr.add_argument("--out", required=True, help="output file (.safetensors)")
    pr.add_argument("--plan", action="store_true", help="time the backends per layer and report the choice")
    pr.add_argument("--batch", type=_positive, default=1, help="batch size the plan is made for")
    pr.add_argument("--seq", type=_positive, default=128, help="encoder sequence length for --plan")
    pr.add_argument("--image-size", type=_positive, help="image side: plan input of ResNets (224), cnn's input (8)")
    for opt in ("dim", "hidden", "heads", "layers", "width", "num-classes", "in-features"):
        pr.add_argument(f"--{opt}", type=_positive, help="model size option (where the model takes it)")
    pr.set_defaults(func=cmd_prune)

    ins = sub.add_parser("inspect", help="per-layer formats, sparsity and bytes of a saved file")
    ins.add_argument("file")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.set_defaults(func=cmd_inspect)

    be = sub.add_parser("bench", help="run a benchmark from the repository's bench/ folder (other arguments "
                                      "go to the benchmark)")
    be.add_argument("name", choices=list(BENCHES))
    be.add_argument("--quick", action="store_true", help="small, fast configuration")
    be.set_defaults(func=cmd_bench)

    de = sub.add_parser("demo", help="run the end-to-end CPU demo (arguments go to the demo)")
    de.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sparsecore`` command; returns the exit code (2 on any user error)."""
    parser = build_parser()
    try:
        # bench and demo forward the arguments they do not know to the code they run
        args, rest = parser.parse_known_args(argv)
        if rest and args.command not in ("bench", "demo"):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.rest = rest
    except SystemExit as e:  # argparse exits on bad arguments or --help; in-process callers get the code
        return int(e.code or 0)
    from .backends import BackendUnavailable
    from .io import FileFormatError

    try:
        return args.func(args)
    except BrokenPipeError:  # `sparsecore inspect f | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (CLIError, FileFormatError, FileNotFoundError, BackendUnavailable, ValueError, TypeError, KeyError) as e:
        if args.traceback:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"sparsecore: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
