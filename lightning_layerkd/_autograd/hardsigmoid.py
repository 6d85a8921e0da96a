"""Activations whose derivatives PyTorch lacks, written to be differentiated again.

PyTorch (checked on 2.14) has no derivative for ``aten::hardsigmoid_backward``: the
gradient of ``F.hardsigmoid`` cannot be backpropagated again (double backward, as the student's
Jacobian maps need) nor carried through forward mode (forward-over-reverse), and the tangent
of its forward-mode rule cannot be backpropagated (reverse-over-forward, as the student's
Hessian maps need). :func:`hardsigmoid` computes the same values with the native kernel and
has a backward and a ``jvp`` made of ordinary differentiable ops, so every combination of
reverse and forward mode works. Every other activation of the timm and torchvision families
(hardswish, SiLU, GELU, ReLU6, Mish, ELU, ...) supports all four in PyTorch and is left to it
(``tests/test_activations.py`` checks both claims).
:class:`~lightning_layerkd._autograd.mode.LeanAutograd` routes ``F.hardsigmoid`` here during
the map passes that differentiate a gradient again.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def hardsigmoid_slope(x: Tensor) -> Tensor:
    """``d hardsigmoid(x) / dx``: ``1/6`` on the open interval ``(-3, 3)``, ``0`` elsewhere (the
    kinks take PyTorch's ``hardsigmoid_backward`` convention). A constant of ``x``'s dtype
    without a graph: the second derivative is ``0`` wherever it exists."""
    inside = (x > -3.0) & (x < 3.0)
    return inside.to(x.dtype) / 6.0


class Hardsigmoid(torch.autograd.Function):
    """``hardsigmoid(x) = clamp(x / 6 + 1/2, 0, 1)`` by the native kernel; backward
    ``g * slope(x)`` and forward mode ``x_t * slope(x)`` (:func:`hardsigmoid_slope`) in
    differentiable ops, so that both can be differentiated again in either mode."""

    generate_vmap_rule = True  # elementwise torch ops throughout: torch.func can batch it

    @staticmethod
    def forward(x: Tensor) -> Tensor:  # type: ignore[override]
        """The native ``aten::hardsigmoid``."""
        return torch._C._nn.hardsigmoid(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        """Keep the input for the slope, in reverse and in forward mode."""
        (x,) = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Tensor:  # type: ignore[override]
        """``grad_output * slope(x)``: linear in ``grad_output``, so it has a backward itself."""
        (x,) = ctx.saved_tensors
        return grad_output * hardsigmoid_slope(x)

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor) -> Tensor:
        """The tangent ``x_t * slope(x)``, recorded by autograd like any other op."""
        (x,) = ctx.saved_tensors
        return x_t * hardsigmoid_slope(x)


def hardsigmoid(x: Tensor, inplace: bool = False) -> Tensor:
    """``F.hardsigmoid(x, inplace)`` through :class:`Hardsigmoid`: same values, and derivatives
    of every order and mode. ``inplace=True`` writes the result into ``x`` (with ``copy_``, so
    autograd and forward mode follow it) and keeps a copy of the input for the slope."""
    if not inplace:
        return Hardsigmoid.apply(x)
    return x.copy_(Hardsigmoid.apply(x.clone()))
