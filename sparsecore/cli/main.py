"""The ``sparsecore`` command's parser and entry point: one subcommand per module ``cmd_<name>``."""
from __future__ import annotations

import os
import sys
from typing import Sequence

from . import cmd_bench, cmd_demo, cmd_inspect, cmd_prune
from .errors import PROG, ArgumentParser, CLIError

SUBCOMMANDS = {
    "prune": (cmd_prune, "prune a model one-shot, pack it, optionally plan, save one file"),
    "inspect": (cmd_inspect, "per-layer formats, sparsity and bytes of a saved file, and how to load it"),
    "bench": (cmd_bench, "latency of a pruned file against its dense self (medians, spread) on this machine"),
    "demo": (cmd_demo, "the end-to-end demo: prune, pack, plan, verify, save/load, time vs dense"),
}


def build_parser() -> ArgumentParser:
    """The ``sparsecore`` argument parser; each subcommand's options come from its ``cmd_*`` module."""
    p = ArgumentParser(prog=PROG, description="Sparse inference for pruned PyTorch models.")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    for name, (module, help_text) in SUBCOMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sparsecore`` command; returns the exit code (2 on any user error)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse exits on bad arguments or --help; in-process callers get the code
        return int(e.code or 0)
    from ..backends import BackendUnavailable
    from ..io import FileFormatError

    try:
        return args.func(args)
    except BrokenPipeError:  # `sparsecore inspect f | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (CLIError, FileFormatError, FileNotFoundError, BackendUnavailable, ValueError, TypeError, KeyError) as e:
        if args.traceback:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{PROG}: error: {' '.join(str(msg).split())}", file=sys.stderr)
        return 2
