"""Calibration inputs for activation-aware one-shot pruning (``prune --method wanda``).

``--calibration FILE``: a safetensors file (no pickle) with a tensor ``inputs``, a batch of the model's
first argument: token ids ``[N, T]`` (int64) for a transformers folder, ``[N, ...]`` floats for the other
models. Other tensors of the file (e.g. ``attention_mask`` ``[N, T]``) go to the model as keyword arguments.
Without the option, the random example batch that ``--plan`` uses is the calibration batch: enough to try
the method, not to keep a pretrained model's accuracy (random token ids are not text).

Making such a file from sentences::

    from safetensors.torch import save_file
    enc = tokenizer(sentences, padding=True, return_tensors="pt")
    save_file({"inputs": enc["input_ids"], "attention_mask": enc["attention_mask"]}, "calib.safetensors")
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import CLIError, check_readable_file


def load_calibration(path: str | Path) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """``((inputs,), {name: tensor})`` from a calibration file; :class:`CLIError` when it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_readable_file(path, "--calibration")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CLIError(f"--calibration {path} is not a readable safetensors file: {e}") from None
    inputs = tensors.pop("inputs", None)
    if inputs is None:
        raise CLIError(f"--calibration {path} has no tensor named 'inputs' (it has {sorted(tensors) or 'none'})")
    if inputs.dim() < 1 or inputs.shape[0] < 1:
        raise CLIError(f"--calibration {path}: 'inputs' must be a batch [N, ...] with N >= 1, got {list(inputs.shape)}")
    for name, t in tensors.items():
        if t.shape[:1] != inputs.shape[:1]:
            raise CLIError(f"--calibration {path}: {name!r} has {t.shape[0] if t.dim() else 0} rows, "
                           f"'inputs' has {inputs.shape[0]}")
    return (inputs,), tensors
