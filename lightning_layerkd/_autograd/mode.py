"""Cheaper autograd rules for the derivative-map passes: same values, same gradients.

:class:`LeanAutograd` is a ``TorchFunctionMode`` that, inside a map pass, replaces PyTorch's
forward-mode rules for convolution and batch norm with cheaper ones and records convolutions
whose double backward runs native kernels (:func:`native_convolution`); where a gradient is
differentiated again, it also replaces the activations whose derivatives PyTorch lacks
(:mod:`lightning_layerkd._autograd.hardsigmoid`). The mode instance owns
all the state the rules need (which leaves the running ``grad`` call asks for); the module
holds none.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from lightning_layerkd._autograd import hardsigmoid as activations
from lightning_layerkd._autograd.batch_norm import batch_norm_jvp, native_batch_norm
from lightning_layerkd._autograd.convolution import (
    CONVOLUTIONS,
    convolution_jvp,
    native_convolution,
)

_BATCH_NORM_SIGNATURE = inspect.signature(F.batch_norm)
#: Activations without a derivative of their backward in PyTorch (``aten::hardsigmoid_backward``
#: has none: no double backward, no reverse-over-forward), each with its twice-differentiable
#: replacement. ``nn.Hardsigmoid`` calls ``F.hardsigmoid``; the ``torch._C._nn`` entries catch
#: direct calls of the kernels. All other activations keep PyTorch's own rules.
_TWICE_DIFFERENTIABLE: dict[Any, Any] = {
    F.hardsigmoid: activations.hardsigmoid,
    torch._C._nn.hardsigmoid: activations.hardsigmoid,
    torch._C._nn.hardsigmoid_: partial(activations.hardsigmoid, inplace=True),
}


class LeanAutograd(TorchFunctionMode):
    """Cheaper autograd rules for convolutions and batch norm (same values, same gradients).

    With ``tangents`` (forward-mode passes):

    * Convolution: PyTorch's JVP is ``conv(x_t, W) + conv(x, W_t)`` with an absent tangent filled
      by zeros, so every layer pays three convolutions where one or two do (the frozen layers'
      ``conv(x, 0)``, the first probed layer's ``conv(0, W)``). Here each term runs only when its
      tangent exists, in the ``jvp`` of one autograd node that takes the dual inputs itself: no
      tangent is unpacked or packed (four ops per layer) and the output is no view.
    * Batch norm: its input Jacobian is symmetric, so the tangent of the output is batch norm's
      own backward kernel applied to the input's tangent: one fused call instead of PyTorch's
      composite formula (about four times the cost), in the ``jvp`` of one autograd node that
      takes the dual input itself. The output is a fresh tensor, not a view, so in-place ops
      after it stay cheap in reverse mode.

    With ``double_backward`` (the student's map pass, whose gradient is backpropagated again):
    convolutions run as :func:`~lightning_layerkd._autograd.convolution.native_convolution`, whose
    double backward runs the native forward and
    backward kernels. PyTorch's own computes the weight-gradient term as a convolution of
    transposed tensors, 1.5-2.7 times slower on CPU (ResNet layer shapes, batch 32). And
    ``F.hardsigmoid``, whose backward PyTorch cannot differentiate (the squeeze-excite gates of
    MobileNetV3), runs as :func:`~lightning_layerkd._autograd.hardsigmoid.hardsigmoid`: same
    values, a
    backward and a forward-mode rule made of differentiable ops. Without ``double_backward``
    PyTorch's own suffices (first derivatives and forward mode exist) and is kept; with
    ``tangents`` the nodes above then run the native backward kernels, which PyTorch can
    differentiate.

    Batch norm in training mode (batch statistics) runs as
    :func:`~lightning_layerkd._autograd.batch_norm.native_batch_norm`, whose backward
    is differentiated again by a closed formula: about 24 aten ops (6 on whole tensors) where
    PyTorch's composite ``batchnorm_double_backward`` runs some 90. With ``tangents`` too (the
    student's Hessian pass), the forward-mode rule above runs its primal and its tangent through
    the same closed-form nodes, since the map loss is backpropagated through both.

    The tangents are built from differentiable ops and nodes, so reverse mode through them (the
    student's map loss) is exact.
    """

    def __init__(self, *, tangents: bool, double_backward: bool) -> None:
        super().__init__()
        self.tangents, self.double_backward = tangents, double_backward
        #: ids of the leaves the running :meth:`grad` call asks for; a custom backward cannot
        #: ask the engine whether a leaf's gradient is needed there.
        self.requested_leaves: set[int] | None = None

    def grad(self, outputs: Tensor, inputs: Sequence[Tensor], **options: Any) -> tuple[Tensor, ...]:
        """``torch.autograd.grad`` that tells the convolutions recorded under this mode which
        leaves it asks for, so that they skip the other weight gradients."""
        previous, self.requested_leaves = self.requested_leaves, {id(t) for t in inputs}
        try:
            return torch.autograd.grad(outputs, inputs, **options)
        finally:
            self.requested_leaves = previous

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if (func in CONVOLUTIONS or func is F.batch_norm) and (
            self.tangents or self.double_backward
        ):
            device = args[0].device.type if args and isinstance(args[0], Tensor) else None
            if device is not None and torch.is_autocast_enabled(device):
                return self._outside_autocast(func, types, args, kwargs, device)
        if self.double_backward and func in _TWICE_DIFFERENTIABLE:
            return _TWICE_DIFFERENTIABLE[func](*args, **kwargs)
        if func in CONVOLUTIONS and not kwargs and len(args) >= 2:
            if self.tangents:
                return convolution_jvp(func, *args, closed_form=self.double_backward, owner=self)
            return (
                native_convolution(func, *args, owner=self) if self.double_backward else func(*args)
            )
        if func is F.batch_norm and self.tangents:  # dispatched as (input, mean, var) + keywords
            bound = _BATCH_NORM_SIGNATURE.bind(*args, **kwargs)
            bound.apply_defaults()
            return batch_norm_jvp(func, *bound.args, closed_form=self.double_backward, owner=self)
        if func is F.batch_norm and self.double_backward:
            bound = _BATCH_NORM_SIGNATURE.bind(*args, **kwargs)
            bound.apply_defaults()
            return native_batch_norm(*bound.args, owner=self)
        return func(*args, **kwargs)

    def _outside_autocast(self, func, types, args, kwargs, device: str):  # type: ignore[no-untyped-def]
        """Under autocast (``bf16-mixed``): autocast's own casts (a convolution's operands to
        the autocast dtype; batch norm as it comes, low-precision input with float32
        statistics), then the rule with autocast off, so that the rule's nodes run the native
        low-precision kernels in both directions instead of falling back to PyTorch's rules."""
        if func in CONVOLUTIONS:
            dtype = _autocast_dtype(device)
            args = tuple(
                a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() and a.dtype != dtype
                else a
                for a in args
            )  # fmt: skip
        with torch.autocast(device, enabled=False):
            return self.__torch_function__(func, types, args, kwargs)


def _autocast_dtype(device: str) -> torch.dtype:
    getter = getattr(torch, "get_autocast_dtype", None)  # torch >= 2.4
    if getter is not None:
        return getter(device)  # type: ignore[no-any-return]
    if device == "cpu":
        return torch.get_autocast_cpu_dtype()
    return torch.get_autocast_gpu_dtype()
