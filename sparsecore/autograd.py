"""Input gradients through backends that autograd cannot see into (Triton kernels, CSR custom ops).

The packed weight is frozen (buffers, not parameters): fine-tuning a pruned weight belongs in the
pruning loop (``sparsecore.pruning.training``), on the dense weight with its mask. What a deployed sparse
layer must still give is the gradient with respect to its input and its bias, so that layers around it
can be trained or inputs attributed. Backends built from differentiable torch ops get that from autograd;
the rest run inside this Function, whose backward uses the masked dense weight:
``dX = dY @ W`` (linear) or ``conv2d_input(dY, W)`` (conv), ``db = dY`` summed over all but channels.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


class SparseOpGrad(torch.autograd.Function):
    """``y = run(x, bias)`` forward; backward through the dense weight from ``weight_fn()``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, run: Callable, weight_fn: Callable,
                conv: Any) -> torch.Tensor:
        ctx.backward_args = (weight_fn, conv, x.shape)
        ctx.has_bias = bias is not None
        return run(x, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight_fn, conv, x_shape = ctx.backward_args
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            w = weight_fn().to(grad.dtype)
            if conv is None:
                grad_x = grad @ w  # (M, N) @ (N, K) -> (M, K)
            else:
                grad_x = torch.nn.grad.conv2d_input(x_shape, w, grad, conv.stride, conv.padding, conv.dilation,
                                                    conv.groups)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_b = grad.sum(0) if conv is None else grad.sum((0, 2, 3))
        return grad_x, grad_b, None, None, None


def needs_grad(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """True when autograd will want gradients from this call."""
    return torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
