"""``sparsecore prune``: build or load a model, prune it one-shot, pack it, optionally plan, save one file.

Every argument is checked before the model is built: a bad ``--out``, ``--device`` or ``--model`` is reported
before any pruning, and a failed run writes no file.
"""
from __future__ import annotations

import argparse
import fnmatch
import sys
from pathlib import Path

import torch
from torch import nn

from . import methods, zoo
from .calibration import load_calibration
from .errors import CLIError, check_device, check_readable_file, check_writable, fraction, positive
from .stats import DENSE_BYTES_KEY, file_stats
from .table import brief_text, layer_table, totals_text

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_arguments(pr: argparse.ArgumentParser) -> None:
    from ..backends import Backend
    from ..config import patterns

    pr.add_argument("--model", required=True, metavar="MODEL",
                    help=f"a built-in model ({', '.join(zoo.BUILTIN)}), a torchvision model name "
                         f"(e.g. mobilenet_v2; 'torchvision:resnet18' for torchvision's own resnet18; needs "
                         f"torchvision) or a local transformers folder (needs transformers)")
    pr.add_argument("--pattern", required=True, choices=patterns(), help="the formats registered (sparsecore.formats)")
    pr.add_argument("--sparsity", type=fraction, help="pruned fraction (unstructured, channel)")
    pr.add_argument("--n", type=int, default=2, help="N of N:M (default 2)")
    pr.add_argument("--m", type=int, default=4, help="M of N:M (default 4)")
    pr.add_argument("--scope", choices=("layer", "global"), default="layer")
    pr.add_argument("--method", default="magnitude", choices=list(methods.ONESHOT), help=methods.METHODS_HELP)
    pr.add_argument("--calibration", metavar="FILE",
                    help="methods that use activations: a safetensors file with a batch 'inputs' (token ids for "
                         "transformers) and optional keyword tensors; default: the random example batch")
    pr.add_argument("--exclude", action="append", metavar="GLOB", help="keep layers matching this fqn glob dense")
    pr.add_argument("--backend", default="auto", choices=[b.value for b in Backend])
    pr.add_argument("--dtype", default="float32", choices=list(DTYPES))
    pr.add_argument("--device", default="cpu", help="cpu or cuda[:N] (where --plan measures)")
    weights = pr.add_argument_group("weights (one is required: pruning random weights is rarely what you want)")
    weights.add_argument("--checkpoint", help="a plain state_dict saved with safetensors, loaded before pruning")
    weights.add_argument("--weights", metavar="NAME",
                         help="torchvision models: pretrained weights by name (e.g. DEFAULT), fetched by torchvision")
    weights.add_argument("--random-init", action="store_true",
                         help="prune the random initial weights (for trying the tool, and for latency only)")
    pr.add_argument("--out", required=True, help="output file (.safetensors); checked before any work")
    pr.add_argument("--plan", action="store_true", help="time the backends per layer and report the choice")
    pr.add_argument("--slim", action="store_true",
                    help="channel pattern: remove pruned channels physically where the model graph allows (a "
                         "smaller dense model; with --method magnitude, channels tied by residual adds are chosen "
                         "together); layers that must keep their width stay packed, and the table says why")
    pr.add_argument("--brief", action="store_true",
                    help="print the summary and each skip reason once instead of one row per layer")
    pr.add_argument("--batch", type=positive, default=1, help="batch size the plan is made for")
    pr.add_argument("--seq", type=positive, default=128, help="sequence length of encoder / transformers inputs")
    pr.add_argument("--image-size", type=positive, help="image side: plan input of conv nets (224), cnn's input (8)")
    for opt in ("dim", "hidden", "heads", "layers", "width", "num-classes", "in-features"):
        pr.add_argument(f"--{opt}", type=positive, help="built-in model size option (where the model takes it)")
    pr.set_defaults(func=run)


def _config(args: argparse.Namespace):
    from ..config import SparsityConfig

    if args.pattern == "nm" and args.sparsity is not None and abs(args.sparsity - (1 - args.n / args.m)) > 1e-9:
        raise CLIError(f"--sparsity {args.sparsity} contradicts {args.n}:{args.m} (which prunes "
                       f"{1 - args.n / args.m:g}); drop --sparsity for nm")
    if args.slim and args.pattern != "channel":
        raise CLIError(f"--slim removes channels: it needs --pattern channel, not {args.pattern!r}")
    if args.pattern != "nm" and args.sparsity is None:
        raise CLIError(f"--sparsity is required for pattern {args.pattern!r}")
    return SparsityConfig(args.pattern, args.sparsity, n=args.n, m=args.m,
                          scope=args.scope, backend=args.backend)


def _spec(args: argparse.Namespace) -> zoo.ModelSpec:
    options = {k: getattr(args, k) for k in zoo.SIZE_OPTIONS if k != "image_size" and getattr(args, k) is not None}
    if args.model == "cnn" and args.image_size is not None:
        options["image_size"] = args.image_size  # SmallCNN's input size is part of the architecture
    spec = zoo.resolve(args.model, options, args.weights)
    given = [o for o, v in (("--checkpoint", args.checkpoint), ("--weights", args.weights),
                            ("--random-init", args.random_init)) if v]
    if len(given) > 1:
        raise CLIError(f"give one of {', '.join(given)}")
    if not given and not zoo.has_own_weights(spec):
        raise CLIError(f"--model {args.model} is built with random weights: pass --checkpoint FILE.safetensors "
                       f"(your trained state_dict) to prune your model, or --random-init to prune random weights")
    if args.checkpoint:
        check_readable_file(args.checkpoint, "--checkpoint")
    return spec


def run(args: argparse.Namespace) -> int:
    import sparsecore as sc
    from ..report import REPORT_KEY

    # -- everything the user typed, checked before any work --------------------------------------
    check_writable(args.out)
    device = check_device(args.device)
    config = _config(args)
    method = methods.get(args.method)
    spec = _spec(args)
    calibration = None
    if args.calibration is not None:
        if not method.needs_calibration:
            raise CLIError(f"--calibration is for methods that use activations; {method.name} is data-free")
        calibration = load_calibration(args.calibration)

    # -- the work ----------------------------------------------------------------------------------
    model = zoo.build(spec)
    if args.checkpoint:
        _load_checkpoint(model, args.checkpoint)
    model = model.to(device=device, dtype=DTYPES[args.dtype])
    excludes = args.exclude or []
    filter_fn = (lambda mod, fqn: not any(fnmatch.fnmatchcase(fqn, pat) for pat in excludes)) if excludes else None
    # Inputs are shaped from the dense layers, before they are swapped.
    x = zoo.example_inputs(spec, model, args.batch, DTYPES[args.dtype], device, args.seq, args.image_size or 224)
    if method.needs_calibration and calibration is None:
        calibration = (x, {})
    elif calibration is not None:
        calibration = _to(calibration, device, DTYPES[args.dtype])
    dense_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    masks = method.masks(model, config, filter_fn, calibration)
    if not masks:
        raise CLIError(f"no layer of {args.model!r} can take pattern {args.pattern!r} (after --exclude)")
    if args.slim:  # magnitude: sparsify's own group-wise choice (coupled channels pruned together)
        model = sc.sparsify(model, config, filter_fn, masks=None if method.name == "magnitude" else masks,
                            example_inputs=x, slim=True, progress=sys.stderr.isatty())
    else:
        model = sc.sparsify(model, config, filter_fn, masks=masks, progress=sys.stderr.isatty())
    if config.backend != "auto":
        with torch.no_grad():  # a forced backend must be able to run here; find out now, not at deployment
            model(*x)
    if args.plan:
        sc.plan(model, x)
    report = sc.last_report(model)
    # what zoo.skeleton_from_file rebuilds, and the rows the packed tensors cannot tell (skipped layers, reasons)
    extra = {"skeleton": {**spec.to_json(), "dtype": args.dtype}, REPORT_KEY: report.to_json(),
             DENSE_BYTES_KEY: dense_bytes}
    out = sc.save(model.cpu(), args.out, config=config, extra=extra)
    stats = file_stats(out)
    print(brief_text(report) if args.brief else layer_table(report, stats["bytes"]))
    print(totals_text(stats["totals"]))
    print(f"saved {out}")
    return 0


def _to(calibration: methods.Calibration, device: torch.device, dtype: torch.dtype) -> methods.Calibration:
    """Calibration tensors on the model's device; floating ones in the model's dtype, integer ones as they are."""
    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, dtype) if t.is_floating_point() else t.to(device)
    args, kwargs = calibration
    return tuple(move(t) for t in args), {k: move(t) for k, t in kwargs.items()}


def _load_checkpoint(model: nn.Module, path: str | Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CLIError(f"checkpoint {path} is not a readable safetensors state_dict: {e}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CLIError(f"checkpoint {path} does not fit this model: missing keys {missing[:5]}, "
                       f"unexpected keys {unexpected[:5]} (check the model and its size options)")
