"""``sparsecore inspect FILE``: the per-layer report of a saved file (status, pattern, kept fraction, bytes,
skip reasons where the file records them) and how to load it."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import zoo
from .errors import CLIError
from .stats import file_stats, to_json
from .table import brief_text, layer_table, totals_text


def add_arguments(ins: argparse.ArgumentParser) -> None:
    ins.add_argument("file", help="a file written by sparsecore.save or `sparsecore prune`")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.add_argument("--brief", action="store_true",
                     help="print the summary and each skip reason once instead of one row per layer")
    ins.set_defaults(func=run)


def rebuild_hint(file: str, extra: dict | None) -> str:
    """How to load ``file`` in Python: from its recorded skeleton, or with the user's own model."""
    try:
        spec = zoo.spec_of_file(extra, file)
    except CLIError:
        return (f"load: sparsecore.load({file!r}, <the dense model it was pruned from>) "
                f"(no skeleton recorded: not made by `sparsecore prune`)")
    options = ", ".join(f"{k}={v!r}" for k, v in spec.options.items())
    return (f"skeleton: {spec.source} model {spec.name!r}" + (f" ({options})" if options else "") + "\n"
            f"load: from sparsecore.cli.zoo import skeleton_from_file; "
            f"model = sparsecore.load({file!r}, skeleton_from_file({file!r}))")


def run(args: argparse.Namespace) -> int:
    if Path(args.file).is_dir():
        raise CLIError(f"inspect: {args.file} is a directory; give a file")
    st = file_stats(args.file)
    if args.json:
        print(json.dumps(to_json(st), indent=1))
        return 0
    print(f"file: {st['file']}")
    print(f"config: {json.dumps(st['config']) if st['config'] else 'none recorded'}")
    print(rebuild_hint(st["file"], st["extra"]))
    print(brief_text(st["report"]) if args.brief else layer_table(st["report"], st["bytes"]))
    print(totals_text(st["totals"]))
    return 0
