"""``sparsecore demo``: the end-to-end demo of ``sparsecore.demo`` (its options, its ``--help``)."""
from __future__ import annotations

import argparse


def add_arguments(de: argparse.ArgumentParser) -> None:
    from .. import demo  # imported here: sparsecore.demo imports this package's argument checks

    demo.add_arguments(de)
