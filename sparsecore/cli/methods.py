"""Pruning methods the ``sparsecore prune`` command runs: one-shot methods only.

A one-shot method turns a (trained) model into masks ``{fqn: bool weight-shaped}`` in one call. Methods that
prune while training (GMP, PDP, SAP, PSAP, SNACS) need the user's data and training loop; they run from Python
(``sparsecore.pruning`` with ``pruning.training.train``; the README has a runnable example) and their masks go
to ``sparsecore.sparsify(model, config, masks=...)``.
"""
from __future__ import annotations

import inspect as _inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..config import SparsityConfig
from .errors import CLIError

# Calibration: positional and keyword inputs of the model, model(*args, **kwargs) (see calibration.py)
Calibration = tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]
# fn(model, config, filter_fn, calibration) -> masks; calibration is None for data-free methods
MaskFn = Callable[[nn.Module, SparsityConfig, Callable | None, Calibration | None], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Method:
    """A one-shot pruning method: its name, what it needs, and the call that makes masks."""

    name: str
    help: str
    needs_calibration: bool
    masks: MaskFn


def _magnitude(model, config, filter_fn, calibration):
    from ..pruning.magnitude import magnitude_masks
    return magnitude_masks(model, config, filter_fn)


def calibration_batches(model: nn.Module, calibration: Calibration, rows: int = 16) -> list:
    """The calibration set as model-input batches of at most ``rows`` rows: tuples ``(inputs,)``, or dicts of
    keyword inputs when there are keyword tensors (``inputs`` then goes under the name of the model's first
    ``forward`` parameter, e.g. ``input_ids``)."""
    (first, *rest), kwargs = calibration
    if rest:
        raise CLIError("calibration takes one positional input ('inputs') plus keyword tensors")
    n = first.shape[0]
    if not kwargs:
        return [(first[i:i + rows],) for i in range(0, n, rows)]
    name = next(iter(_inspect.signature(model.forward).parameters))
    return [{name: first[i:i + rows], **{k: v[i:i + rows] for k, v in kwargs.items()}} for i in range(0, n, rows)]


def _wanda(model, config, filter_fn, calibration):
    from ..pruning.wanda import wanda_masks
    return wanda_masks(model, calibration_batches(model, calibration), config, filter_fn)


ONESHOT: dict[str, Method] = {
    "magnitude": Method("magnitude", "|w|: data-free, the default", False, _magnitude),
    "wanda": Method("wanda", "|w| times the input feature's norm over calibration inputs, per output row; "
                             "keeps pretrained models closer to dense, see --calibration", True, _wanda),
}

TRAINING_METHODS = ("GMP", "PDP", "SAP", "PSAP", "SNACS")
METHODS_HELP = (f"one-shot pruning method: {', '.join(f'{m.name} ({m.help})' for m in ONESHOT.values())}. "
                f"Training-time methods ({', '.join(TRAINING_METHODS)}) need your data and training loop: run "
                "them from Python (sparsecore.pruning, see the README's 'Pruning while training') and pass "
                "their masks to sparsecore.sparsify(model, config, masks=...)")


def get(name: str) -> Method:
    """The one-shot method ``name``, or a :class:`CLIError` naming the choices."""
    method = ONESHOT.get(name)
    if method is None:
        hint = (f"; {name} prunes while training: run it from Python (sparsecore.pruning.{name.upper()})"
                if name.upper() in TRAINING_METHODS else "")
        raise CLIError(f"unknown pruning method {name!r}; one-shot methods: {', '.join(ONESHOT)}{hint}")
    return method
