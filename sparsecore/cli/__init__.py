"""The ``sparsecore`` command: prune a model to a file, inspect a file, time a file against dense, run the demo.

    sparsecore prune --model decoder --pattern nm --random-init --out block.safetensors --plan --batch 4
    sparsecore prune --model resnet18 --pattern channel --sparsity 0.5 --slim --random-init --out r18.safetensors
    sparsecore inspect block.safetensors [--json | --brief]
    sparsecore bench block.safetensors --batch 4
    sparsecore demo --small

``prune`` and ``inspect`` print the per-layer report (``sparsecore.report``): each weight layer sparse, slimmed
or skipped, its pattern, kept fraction and bytes, the plan where one was made, and why a layer was left alone.

Every user error (bad argument, unreadable file, a pattern a layer cannot take) prints one line
``sparsecore: error: ...`` on stderr and exits with code 2, found before any work where the arguments alone
tell; ``--traceback`` shows the full trace instead.

One module per concept: ``zoo`` (the models it builds and the skeleton a file records), ``methods`` (one-shot
pruning methods), ``stats`` (bytes of packed layers and files, beside the library's per-layer report), ``table`` (text tables),
``errors`` (user errors and up-front checks), ``cmd_<name>`` (one per subcommand), ``main`` (parser).
"""
from .errors import CLIError
from .main import build_parser, main
from .stats import file_report, file_stats, layer_bytes
from .zoo import skeleton_from_file

__all__ = ["CLIError", "build_parser", "main", "file_report", "file_stats", "layer_bytes", "skeleton_from_file"]
