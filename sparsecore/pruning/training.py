"""Run a pruner inside your own training loop.

``attach(optimizer, pruner)`` registers two optimiser hooks: a step pre-hook (gradients are there: PSAP
records gradient norms) and a step post-hook that lets the pruner update (GMP's schedule) and then re-zeros
pruned weights so they cannot regrow (hard pruners: GMP, SAP, finalized PDP/PSAP). Nothing else in your
loop changes; call ``pruner.on_epoch_end(epoch)`` yourself, or use ``train`` which does all of it.

>>> pruner = GMP(model, 0.9, t0=0, n=10, dt=50)
>>> handle = attach(optimizer, pruner)
>>> for x, y in loader: loss = F.cross_entropy(model(x), y); optimizer.zero_grad(); loss.backward(); optimizer.step()
>>> handle.remove()
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .base import Pruner

__all__ = ["attach", "PruningHandle", "train", "evaluate"]


class PruningHandle:
    """Removes both optimiser hooks of ``attach``."""

    def __init__(self, handles: list) -> None:
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def attach(optimizer: torch.optim.Optimizer, pruner: Pruner) -> PruningHandle:
    """Hook ``pruner`` into ``optimizer``: ``before_step`` before, ``after_step`` + re-zeroing after each step."""

    def pre(_opt, _args, _kwargs):
        pruner.before_step()

    def post(_opt, _args, _kwargs):
        pruner.after_step()
        if pruner.zero_after_step:
            pruner.apply()

    return PruningHandle([optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)])


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device | str | None = None) -> float:
    """Top-1 accuracy of ``model`` over ``(x, y)`` batches (eval mode, restored afterwards)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        if device is not None:
            x, y = x.to(device), y.to(device)
        correct += int((model(x).argmax(-1) == y).sum())
        total += y.numel()
    model.train(was_training)
    return correct / max(1, total)


def train(model: nn.Module, loader: Iterable, epochs: int, pruner: Pruner | None = None, *,
          optimizer: torch.optim.Optimizer | None = None, lr: float = 1e-3,
          loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
          device: torch.device | str | None = None, progress: bool = False, start_epoch: int = 0) -> list[float]:
    """Plain supervised training with an optional pruner; returns the mean loss of each epoch.

    ``optimizer`` defaults to Adam(lr). Pruned weights stay zero after every step for hard pruners; soft
    pruners (PDP, PSAP) get ``on_epoch_end`` after every epoch (``start_epoch`` offsets the epoch count).
    ``progress`` shows a tqdm bar over the batches.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    optimizer = optimizer or torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    handle = attach(optimizer, pruner) if pruner is not None else None
    if pruner is not None and hasattr(pruner, "set_epoch"):
        pruner.set_epoch(start_epoch)
    losses = []
    try:
        model.train()
        for epoch in range(start_epoch, start_epoch + epochs):
            batches = loader
            if progress:
                from tqdm.auto import tqdm
                batches = tqdm(loader, desc=f"epoch {epoch}", leave=False)
            total, count = 0.0, 0
            for x, y in batches:
                if device is not None:
                    x, y = x.to(device), y.to(device)
                loss = loss_fn(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, count = total + float(loss.detach()), count + 1
            losses.append(total / max(1, count))
            if pruner is not None:
                pruner.on_epoch_end(epoch)
    finally:
        if handle is not None:
            handle.remove()
    return losses
