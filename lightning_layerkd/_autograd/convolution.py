"""Convolutions for the derivative-map passes: a convolution whose double backward runs
native kernels (:func:`native_convolution`) and a forward-mode rule that skips absent tangents
(:func:`convolution_jvp`), both in one autograd node; both are routed by
:class:`~lightning_layerkd._autograd.mode.LeanAutograd`, whose instance says which leaves a
backward must compute (:func:`gradient_needed`)."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:
    from lightning_layerkd._autograd.mode import LeanAutograd

CONVOLUTIONS = (F.conv1d, F.conv2d, F.conv3d)


def native_convolution(
    func: Any,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
    *,
    owner: LeanAutograd | None = None,
) -> Tensor:
    """``func(x, weight, ...)`` (a ``torch.nn.functional`` convolution) through
    :class:`_Convolution`, whose double backward runs native kernels, where it applies (batched
    input, numeric padding, no autocast, grad mode on); otherwise ``func`` itself. ``owner`` is
    the mode whose :meth:`LeanAutograd.grad` says which leaves a backward needs."""
    nd = CONVOLUTIONS.index(func) + 1
    if (
        isinstance(padding, str)
        or x.dim() != nd + 2
        or not torch.is_grad_enabled()
        or torch.is_autocast_enabled(x.device.type)
    ):
        return func(x, weight, bias, stride, padding, dilation, groups)
    params = tuple(_ntuple(v, nd) for v in (stride, padding, dilation))
    return _Convolution.apply(x, weight, bias, *params, groups, True, owner)


def gradient_needed(ctx: Any, index: int) -> bool:
    """Whether the running backward needs the gradient of input ``index`` (as PyTorch's own
    convolution asks the engine), so that a gradient w.r.t. four layers' weights does not
    compute every layer's weight gradient."""
    if not ctx.needs_input_grad[index]:
        return False
    node = ctx.next_functions[index][0]
    if node is None:
        return False
    requested = ctx.owner.requested_leaves if ctx.owner is not None else None
    if (
        requested is not None
        and ctx.input_ids[index] is not None
        and node.name() == "torch::autograd::AccumulateGrad"
    ):
        return ctx.input_ids[index] in requested
    will_execute = getattr(torch._C, "_will_engine_execute_node", None)  # private engine query
    if will_execute is None:
        return True
    try:
        return bool(will_execute(node))
    except RuntimeError:  # a leaf inside another autograd.grad call: compute it
        return True


def _ntuple(value: Any, n: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (tuple, list)) else [int(value)] * n


class _Convolution(torch.autograd.Function):
    """A convolution with our reverse and forward-mode rules. With ``closed_form`` (a gradient
    that is differentiated again) its backward is :class:`_ConvolutionBackward`, whose own
    backward runs native kernels; otherwise the native backward kernel (which PyTorch can
    differentiate). ``jvp`` runs only the terms whose tangent exists."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        groups: int,
        closed_form: bool,
        owner: LeanAutograd | None,
    ) -> Tensor:
        ctx.set_materialize_grads(False)  # absent tangents stay None in jvp
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)
        ctx.owner, ctx.closed_form = owner, closed_form
        ctx.params = (stride, padding, dilation, groups, bias is not None)
        ctx.input_ids = (id(x), id(weight), None if bias is None else id(bias))
        out = torch.ops.aten.convolution(
            x, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups
        )
        ctx.out_shape = out.shape
        return out

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_out: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        nones = (None,) * 6
        if grad_out is None:
            return (None, None, None, *nones)
        x, weight = ctx.saved_tensors
        mask = (
            gradient_needed(ctx, 0),
            gradient_needed(ctx, 1),
            ctx.params[4] and gradient_needed(ctx, 2),
        )
        if ctx.closed_form:
            grads = _ConvolutionBackward.apply(grad_out, x, weight, ctx.params, mask, ctx.owner)
            return (*grads, *nones)
        if not any(mask):
            return (None, None, None, *nones)
        stride, padding, dilation, groups, _ = ctx.params
        grads = torch.ops.aten.convolution_backward(
            grad_out, x, weight, [weight.shape[0]] if mask[2] else None, stride, padding,
            dilation, False, [0] * len(stride), groups, list(mask),
        )  # fmt: skip
        return (*(g if m else None for g, m in zip(grads, mask, strict=True)), *nones)

    @staticmethod
    def jvp(  # type: ignore[override]
        ctx: Any, x_t: Tensor | None, w_t: Tensor | None, b_t: Tensor | None, *_: Any
    ) -> Tensor | None:
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, _ = ctx.params
        terms = []
        for a, b in ((x_t, weight), (x, w_t)):
            if a is not None and b is not None:
                if ctx.closed_form:
                    term = _Convolution.apply(
                        a, b, None, stride, padding, dilation, groups, True, ctx.owner
                    )
                else:
                    term = torch.ops.aten.convolution(
                        a, b, None, stride, padding, dilation, False, [0] * len(stride), groups
                    )
                terms.append(term)
        if b_t is not None:
            shape = [1, -1] + [1] * len(stride)
            terms.append(b_t.view(shape) if terms else b_t.view(shape).expand(ctx.out_shape))
        if not terms:
            return None
        tangent = terms[0]
        for term in terms[1:]:
            tangent = tangent + term
        return tangent


class _ConvolutionBackward(torch.autograd.Function):
    """``(dx, dW, db)`` of a convolution from the output gradient ``g``, and its backward.

    ``dx = conv_transpose(g, W)`` and ``dW = corr(x, g)`` are bilinear, so the backward of
    ``<ggx, dx> + <ggW, dW> + <ggb, db>`` is: ``d/dg = conv(ggx, W) + conv(x, ggW) + ggb``,
    ``d/dx`` = the input gradient of ``conv(., ggW)`` at ``g``, ``d/dW`` = the weight gradient of
    ``conv(ggx, .)`` at ``g``: two forward and two backward kernels at most.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        grad_out: Tensor,
        x: Tensor,
        weight: Tensor,
        params: tuple,
        mask: tuple,
        owner: LeanAutograd | None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        stride, padding, dilation, groups, has_bias = params
        ctx.set_materialize_grads(False)
        ctx.owner = owner
        ctx.save_for_backward(grad_out, x, weight)
        ctx.params = params
        ctx.input_ids = (None, id(x), id(weight))
        out_pad = [0] * len(stride)
        bias_sizes = [weight.shape[0]] if has_bias else None
        dx, dw, db = torch.ops.aten.convolution_backward(
            grad_out, x, weight, bias_sizes, stride, padding, dilation, False, out_pad, groups,
            list(mask),
        )  # fmt: skip
        return (dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None)

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, ggx: Tensor | None, ggw: Tensor | None, ggb: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        grad_out, x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, _ = ctx.params
        conv_args = (stride, padding, dilation, False, [0] * len(stride), groups)
        need_g, need_x, need_w = (gradient_needed(ctx, i) for i in range(3))
        d_g = d_x = d_w = None
        if need_g:
            terms = []
            if ggx is not None:
                terms.append(torch.ops.aten.convolution(ggx, weight, None, *conv_args))
            if ggw is not None:
                terms.append(torch.ops.aten.convolution(x, ggw, None, *conv_args))
            if ggb is not None:
                terms.append(ggb.view(1, -1, *([1] * len(stride))).expand_as(grad_out))
            if terms:
                d_g = terms[0]
                for term in terms[1:]:
                    d_g = d_g + term
        if need_x and ggw is not None:
            d_x = torch.ops.aten.convolution_backward(
                grad_out, x, ggw, None, *conv_args, [True, False, False]
            )[0]
        if need_w and ggx is not None:
            d_w = torch.ops.aten.convolution_backward(
                grad_out, ggx, weight, None, *conv_args, [False, True, False]
            )[1]
        return d_g, d_x, d_w, None, None, None


def convolution_jvp(
    func: Any,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
    *,
    closed_form: bool = False,
    owner: LeanAutograd | None = None,
) -> Tensor:
    """``func`` (a ``torch.nn.functional`` convolution) whose forward-mode rule skips absent
    tangents: through :class:`_Convolution` (closed-form double backward with ``closed_form``),
    which takes dual inputs itself, so no tangent is unpacked or packed here and the output is no
    view; otherwise (string padding, unbatched input, autocast) by unpacking the tangents."""
    nd = CONVOLUTIONS.index(func) + 1
    if isinstance(padding, str) or x.dim() != nd + 2 or torch.is_autocast_enabled(x.device.type):
        conv = partial(native_convolution, func, owner=owner) if closed_form else func
        return _unpacked_jvp(conv, x, weight, bias, stride, padding, dilation, groups)
    params = tuple(_ntuple(v, nd) for v in (stride, padding, dilation))
    return _Convolution.apply(x, weight, bias, *params, groups, closed_form, owner)


def _unpacked_jvp(
    func: Any, x: Tensor, weight: Tensor, bias: Tensor | None = None, *rest: Any
) -> Tensor:
    x_p, x_t = fwAD.unpack_dual(x)
    w_p, w_t = fwAD.unpack_dual(weight)
    b_p, b_t = fwAD.unpack_dual(bias) if bias is not None else (None, None)
    if x_t is None and w_t is None and b_t is None:
        return func(x, weight, bias, *rest)
    primal = func(x_p, w_p, b_p, *rest)
    terms = []
    if x_t is not None:
        terms.append(func(x_t, w_p, None, *rest))
    if w_t is not None:
        terms.append(func(x_p, w_t, None, *rest))
    if b_t is not None:
        terms.append(b_t.view(1, -1, *([1] * (primal.dim() - 2))).expand_as(primal))
    tangent = terms[0]
    for term in terms[1:]:
        tangent = tangent + term
    return fwAD.make_dual(primal, tangent)
