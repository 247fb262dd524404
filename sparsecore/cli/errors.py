"""User errors of the ``sparsecore`` command and the checks that find them before any work starts.

Every user error prints one line ``sparsecore: error: ...`` on stderr and exits with code 2; the checks here
run first (argument types, devices, output paths), so that a bad ``--out`` is reported before a model is built
or pruned, and a failed command leaves no file behind.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

import torch

PROG = "sparsecore"


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose errors are one line (``sparsecore: error: ...``), exit code 2.

    argparse's default prints the whole usage block before the message; the usage stays one ``--help`` away.
    """

    def error(self, message: str) -> NoReturn:
        print(f"{PROG}: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {v}")
    return v


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def check_device(text: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``, present on this machine; anything else is a :class:`CLIError`."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise CLIError(f"--device must be cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {text} given but no CUDA device is available here (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_writable(path: str | Path, option: str = "--out") -> Path:
    """Raise :class:`CLIError` unless a file can be written at ``path``; creates nothing that stays.

    The directory must exist and take a new file (tried with a temporary file that is removed at once, since
    permission bits say nothing for root or read-only mounts); an existing ``path`` must be a writable file.
    """
    p = Path(path)
    if p.is_dir():
        raise CLIError(f"{option} {path} is a directory; give a file name")
    parent = p.parent
    if parent.exists() and not parent.is_dir():
        raise CLIError(f"{option} {path}: {parent} is not a directory")
    if not parent.is_dir():
        raise CLIError(f"{option} {path}: directory {parent} does not exist")
    if p.exists() and not os.access(p, os.W_OK):
        raise CLIError(f"{option} {path} exists and is not writable")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise CLIError(f"{option} {path}: cannot write in {parent} ({e.strerror or e})") from None
    return p


def check_readable_file(path: str | Path, option: str) -> Path:
    """Raise :class:`CLIError` unless ``path`` is an existing file."""
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"{option} {path} does not exist" if not p.exists() else f"{option} {path} is not a file")
    return p
