"""Batch norm for the derivative-map passes: batch statistics whose backward has a
closed-form, cheap derivative (:func:`native_batch_norm`, for a gradient that is differentiated
again) and a forward-mode rule through batch norm's own backward kernel
(:func:`batch_norm_jvp`, through the same closed-form nodes where its tangent is
backpropagated), both in one autograd node; both are routed by
:class:`~lightning_layerkd._autograd.mode.LeanAutograd`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_layerkd._autograd.convolution import gradient_needed

if TYPE_CHECKING:
    from lightning_layerkd._autograd.mode import LeanAutograd


def native_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    owner: LeanAutograd | None = None,
) -> Tensor:
    """``F.batch_norm`` (same arguments, same values, same running-statistics update) through
    :class:`_BatchNorm`, whose backward is cheap to differentiate again, where it applies
    (training mode, a gradient to record, no autocast); otherwise ``F.batch_norm`` itself."""
    differentiable = any(t is not None and t.requires_grad for t in (x, weight, bias))
    if (
        not training
        or x.dim() < 2
        or not differentiable
        or not torch.is_grad_enabled()
        or torch.is_autocast_enabled(x.device.type)
    ):
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    F._verify_batch_size(x.size())  # type: ignore[attr-defined]
    args = (running_mean, running_var, True, momentum, eps, True, owner)
    return _BatchNorm.apply(x, weight, bias, *args)[0]


class _BatchNorm(torch.autograd.Function):
    """Batch norm with our reverse and forward-mode rules. With ``closed_form`` (batch
    statistics, a gradient that is differentiated again) its backward is
    :class:`_BatchNormBackward`, which has a closed-form (cheap) derivative of its own;
    otherwise the native backward kernel (which PyTorch can differentiate). ``jvp``: the input
    Jacobian is symmetric, so the tangent is the same backward applied to the input's tangent.
    The batch statistics come out too, as constants."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
        closed_form: bool,
        owner: LeanAutograd | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        ctx.set_materialize_grads(False)  # absent tangents stay None in jvp
        out, mean, invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, training, momentum, eps
        )
        ctx.mark_non_differentiable(mean, invstd)
        # eval mode normalises by the running statistics, which its backward reads
        running = (None, None) if training else (running_mean, running_var)
        ctx.save_for_backward(x, weight, mean, invstd, *running)
        ctx.save_for_forward(x, weight, mean, invstd, *running)
        ctx.owner, ctx.eps, ctx.training, ctx.closed_form = owner, eps, training, closed_form
        ctx.affine = (weight is not None, bias is not None)
        ctx.input_ids = tuple(None if t is None else id(t) for t in (x, weight, bias))
        return out, mean, invstd

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_out: Tensor | None, *_: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        nones = (None,) * 7
        if grad_out is None:
            return (None, None, None, *nones)
        x, weight, mean, invstd, running_mean, running_var = ctx.saved_tensors
        mask = (
            gradient_needed(ctx, 0),
            ctx.affine[0] and gradient_needed(ctx, 1),
            ctx.affine[1] and gradient_needed(ctx, 2),
        )
        if ctx.closed_form:
            grads = _BatchNormBackward.apply(
                grad_out, x, weight, mean, invstd, ctx.eps, mask, ctx.owner
            )
            return (*grads, *nones)
        if not any(mask):
            return (None, None, None, *nones)
        grads = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, weight, running_mean, running_var, mean, invstd, ctx.training, ctx.eps,
            list(mask),
        )  # fmt: skip
        return (*(g if m else None for g, m in zip(grads, mask, strict=True)), *nones)

    @staticmethod
    def jvp(  # type: ignore[override]
        ctx: Any, x_t: Tensor | None, w_t: Tensor | None, b_t: Tensor | None, *_: Any
    ) -> tuple[Tensor | None, None, None]:
        x, weight, mean, invstd, running_mean, running_var = ctx.saved_tensors
        shape = [1, -1] + [1] * (x.dim() - 2)
        tangent = None
        if x_t is not None and ctx.closed_form:
            mask = (True, False, False)
            tangent = _BatchNormBackward.apply(
                x_t, x, weight, mean, invstd, ctx.eps, mask, ctx.owner
            )[0]
        elif x_t is not None:
            # in training mode the kernel's derivative follows the batch statistics
            tangent = torch.ops.aten.native_batch_norm_backward(
                x_t, x, weight, running_mean, running_var, mean, invstd, ctx.training, ctx.eps,
                [True, False, False],
            )[0]  # fmt: skip
        if w_t is not None:
            # x normalised, its batch statistics differentiable in x (no map pass gets here)
            x_hat = F.batch_norm(
                x, running_mean, running_var, None, None, ctx.training, 0.0, ctx.eps
            )
            term = x_hat * w_t.view(shape)
            tangent = term if tangent is None else tangent + term
        if b_t is not None:
            term = b_t.view(shape)
            tangent = term.expand(x.shape) if tangent is None else tangent + term
        return tangent, None, None


class _BatchNormBackward(torch.autograd.Function):
    """``(dx, dgamma, dbeta)`` of batch norm with batch statistics, and its backward.

    Per channel, over its ``M`` values: ``xh = (x - mu) * s`` with ``s = 1 / sqrt(var + eps)``,
    ``y = gamma * xh + beta``. From the output gradient ``g``, with ``A = sum(g)`` and
    ``B = sum(g * xh)``: ``dx = gamma * s * (g - A / M - xh * B / M)``, ``dgamma = B``,
    ``dbeta = A``. The backward of ``<ggx, dx> + <ggg, dgamma> + <ggb, dbeta>``, with
    ``Q = sum(ggx * xh)``, ``P = sum(ggx * g) - A * sum(ggx) / M`` and ``k = gamma * s^2 / M``:

    * ``d/dg = gamma * s * (ggx - mean(ggx) - xh * Q / M) + ggg * xh + ggb`` (the first term is
      batch norm's input gradient at ``ggx``: one native backward kernel, which also gives ``Q``
      and ``sum(ggx)``);
    * ``d/dgamma = s * (P - B * Q / M)``;
    * ``d/dx = a * xh + b * (g - A / M) + c * (ggx - mean(ggx))`` with per-channel
      ``a = k * (3 * B * Q / M - P) - ggg * s * B / M``, ``b = ggg * s - k * Q``, ``c = -k * B``
      (from ``d xh_i / d x_j = s * (delta_ij - 1 / M - xh_i * xh_j / M)`` and
      ``d s / d x_j = -s^2 * xh_j / M``).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        grad_out: Tensor,
        x: Tensor,
        weight: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        eps: float,
        mask: tuple[bool, bool, bool],
        owner: LeanAutograd | None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        ctx.set_materialize_grads(False)
        ctx.owner = owner
        ctx.eps = eps
        ctx.input_ids = (None, id(x), None if weight is None else id(weight))
        # The sums A = dbeta and B = dgamma come with dx from the same kernel; the backward
        # needs them.
        dx, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, weight, None, None, mean, invstd, True, eps, [mask[0], True, True]
        )
        ctx.save_for_backward(grad_out, x, weight, mean, invstd, dgamma, dbeta)
        return (dx if mask[0] else None, dgamma if mask[1] else None, dbeta if mask[2] else None)

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, ggx: Tensor | None, ggg: Tensor | None, ggb: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        g, x, weight, mean, invstd, sum_gxh, sum_g = ctx.saved_tensors
        need_g, need_x = gradient_needed(ctx, 0), gradient_needed(ctx, 1)
        need_w = weight is not None and gradient_needed(ctx, 2)
        shape = [1, -1] + [1] * (x.dim() - 2)
        m = x.numel() // x.shape[1]
        s = invstd
        d_g = d_x = d_w = None
        # d_x = const - (a * xh + b * g + c * ggx) / M with per-channel a, b, c and const
        a = b = c = const = None
        if ggx is not None and (need_g or need_x or need_w):
            stats = need_x or need_w
            dxx, sum_q, sum_ggx = torch.ops.aten.native_batch_norm_backward(
                ggx, x, weight, None, None, mean, invstd, True, ctx.eps, [need_g, stats, stats]
            )
            if need_g:
                d_g = dxx
            if stats:
                # p = P = sum(ggx * g) - A * sum(ggx) / M, with scalars folded into addcmul
                p = (ggx * g).sum([0, *range(2, x.dim())])
                p = torch.addcmul(p, sum_g, sum_ggx, value=-1 / m)
                if need_w:
                    d_w = s * torch.addcmul(p, sum_gxh, sum_q, value=-1 / m)
                if need_x:
                    # M * k = gamma * s^2; a = M * k * (P - 3 * B * Q / M), etc.
                    mk = s * s if weight is None else weight * s * s
                    a = mk * torch.addcmul(p, sum_gxh, sum_q, value=-3 / m)
                    b = mk * sum_q
                    c = mk * sum_gxh
                    # the centring constant k * (Q * A + B * sum(ggx)) / M
                    const = torch.addcmul(b * sum_g, c, sum_ggx).div_(m * m)
        if ggg is not None:
            if need_g:
                xh = (x - mean.view(shape)) * s.view(shape)
                d_g = (
                    xh * ggg.view(shape) if d_g is None else torch.addcmul(d_g, xh, ggg.view(shape))
                )
            if need_x:
                # ggg * s * (g - A / M - xh * B / M), in the same form
                gs = ggg * s
                a_g, b_g = gs * sum_gxh, gs * -m
                const_g = (gs * sum_g).div_(-m)
                if a is None or b is None or const is None:
                    a, b, const = a_g, b_g, const_g
                else:
                    a, b, const = a + a_g, b + b_g, const + const_g
        if need_x and a is not None and b is not None and const is not None:
            # xh = s * (x - mean): the x term takes s, the constant the mean (no whole-tensor xh)
            a = a * s
            const = torch.addcmul(const, a, mean, value=1 / m)
            d_x = torch.addcmul(const.view(shape), x, a.view(shape), value=-1 / m)
            d_x = torch.addcmul(d_x, g, b.view(shape), value=-1 / m)
            if c is not None and ggx is not None:
                d_x = torch.addcmul(d_x, ggx, c.view(shape), value=-1 / m)
        if need_g and ggb is not None:
            d_g = ggb.view(shape).expand_as(g) if d_g is None else d_g + ggb.view(shape)
        return d_g, d_x, d_w, None, None, None, None, None


def batch_norm_jvp(
    func: Any,
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    *,
    closed_form: bool = False,
    owner: LeanAutograd | None = None,
) -> Tensor:
    """``func`` (``F.batch_norm``) in forward mode through :class:`_BatchNorm`, which takes
    the dual input itself: the tangent is batch norm's backward applied to the input's tangent,
    one fused call instead of PyTorch's composite formula; no tangent is unpacked or packed
    and the output is a fresh tensor, not a view (an in-place ReLU or residual ``+=`` after a
    view would put a CopySlices node into the map loss's graph). With ``closed_form`` and batch
    statistics, primal and tangent run through :class:`_BatchNormBackward`, whose reverse is a
    closed formula rather than PyTorch's composite ``batchnorm_double_backward``."""
    args = (x, running_mean, running_var, weight, bias, training, momentum, eps)
    if (
        x.dim() < 2
        or (not training and (running_mean is None or running_var is None))
        or torch.is_autocast_enabled(x.device.type)
    ):
        return func(*args)
    if training:
        F._verify_batch_size(x.size())  # type: ignore[attr-defined]
    rest = (training, momentum, eps, closed_form and training, owner)
    return _BatchNorm.apply(x, weight, bias, running_mean, running_var, *rest)[0]
