"""Batch norm for the derivative-map passes: batch statistics whose backward has a
closed-form, cheap derivative (:func:`native_batch_norm`, for a gradient that is differentiated
again) and a forward-mode rule through batch norm's own backward kernel
(:func:`batch_norm_jvp`, through the same closed-form nodes where its tangent is
backpropagated); both are routed by
:class:`~lightning_layerkd.lean_autograd.LeanAutograd`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_layerkd.lean_convolution import gradient_needed

if TYPE_CHECKING:
    from lightning_layerkd.lean_autograd import LeanAutograd

__all__ = ["batch_norm_jvp", "native_batch_norm"]


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
    return _BatchNorm.apply(x, weight, bias, running_mean, running_var, momentum, eps, owner)[0]


class _BatchNorm(torch.autograd.Function):
    """Batch norm with batch statistics whose backward, :class:`_BatchNormBackward`, has a
    closed-form (cheap) derivative of its own."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
        owner: LeanAutograd | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        out, mean, invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps
        )
        # the batch statistics come out too, as constants: a tangent rule needs them
        ctx.mark_non_differentiable(mean, invstd)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.owner = owner
        ctx.eps = eps
        ctx.affine = (weight is not None, bias is not None)
        ctx.input_ids = tuple(None if t is None else id(t) for t in (x, weight, bias))
        return out, mean, invstd

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_out: Tensor | None, *_: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        if grad_out is None:
            return (None,) * 8
        x, weight, mean, invstd = ctx.saved_tensors
        mask = (
            gradient_needed(ctx, 0),
            ctx.affine[0] and gradient_needed(ctx, 1),
            ctx.affine[1] and gradient_needed(ctx, 2),
        )
        grads = _BatchNormBackward.apply(
            grad_out, x, weight, mean, invstd, ctx.eps, mask, ctx.owner
        )
        return (*grads, None, None, None, None, None)


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
        xh = (x - mean.view(shape)) * s.view(shape) if ggg is not None or need_x else x
        d_g = d_x = d_w = None
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
                    # M * k = gamma * s^2; a = -M * k * (P - 3 * B * Q / M) / M, etc.
                    mk = s * s if weight is None else weight * s * s
                    a = mk * torch.addcmul(p, sum_gxh, sum_q, value=-3 / m)
                    b = mk * sum_q
                    c = mk * sum_gxh
                    # the centring constant k * (Q * A + B * sum(ggx)) / M
                    const = torch.addcmul(b * sum_g, c, sum_ggx).div_(m * m)
                    d_x = torch.addcmul(const.view(shape), ggx, c.view(shape), value=-1 / m)
                    coef_scale = -1 / m
        if ggg is not None:
            if need_g:
                d_g = (
                    xh * ggg.view(shape) if d_g is None else torch.addcmul(d_g, xh, ggg.view(shape))
                )
            if need_x:
                # ggg * s * (g - A / M - xh * B / M), scaled to the ggx terms' -1 / M
                gs = ggg * s
                a_g, b_g = gs * sum_gxh, gs * -m
                const_g = (gs * sum_g).div_(-m)
                if d_x is None:
                    a, b, d_x = a_g, b_g, const_g.view(shape).expand_as(x)
                    coef_scale = -1 / m
                else:
                    a, b, d_x = a + a_g, b + b_g, d_x + const_g.view(shape)
        if need_x and d_x is not None:
            d_x = torch.addcmul(d_x, xh, a.view(shape), value=coef_scale)
            d_x = torch.addcmul(d_x, g, b.view(shape), value=coef_scale)
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
    owner: LeanAutograd | None = None,
) -> Tensor:
    """``func`` (``F.batch_norm``) on a dual input: the tangent is batch norm's backward kernel
    applied to the input's tangent (its input Jacobian is symmetric). With ``owner`` (a gradient
    that is differentiated again) and batch statistics, the primal and the tangent run as
    :class:`_BatchNorm` and :class:`_BatchNormBackward`, whose reverse is a closed formula
    rather than PyTorch's composite ``batchnorm_double_backward`` (some 90 ops each)."""
    args = (x, running_mean, running_var, weight, bias, training, momentum, eps)
    x_p, x_t = fwAD.unpack_dual(x)
    affine_tangent = any(
        t is not None and fwAD.unpack_dual(t).tangent is not None for t in (weight, bias)
    )
    if x_t is None or affine_tangent:
        return func(*args) if owner is None else native_batch_norm(*args, owner=owner)
    if (
        owner is not None
        and training
        and x.dim() >= 2
        and torch.is_grad_enabled()
        and not torch.is_autocast_enabled(x.device.type)
    ):
        F._verify_batch_size(x.size())  # type: ignore[attr-defined]
        primal, mean, invstd = _BatchNorm.apply(
            x_p, weight, bias, running_mean, running_var, momentum, eps, owner
        )
        # dx of batch norm's backward at g = x_t; its backward differentiates the batch
        # statistics too
        tangent = _BatchNormBackward.apply(
            x_t, x_p, weight, mean, invstd, eps, (True, False, False), owner
        )[0]
    else:
        primal, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            x_p, weight, bias, running_mean, running_var, training, momentum, eps
        )
        # The batch statistics' dependence on x is inside the kernel's double backward.
        tangent = torch.ops.aten.native_batch_norm_backward(
            x_t,
            x_p,
            weight,
            running_mean,
            running_var,
            save_mean.detach(),
            save_invstd.detach(),
            training,
            eps,
            [True, False, False],
        )[0]
    # ``make_dual`` returns a view of ``primal``; the in-place ReLU or residual ``+=`` that
    # usually follows batch norm would then put a CopySlices node (a clone of the whole tensor
    # and an as_strided backward) into the graph of the student's map loss, twice per layer.
    # One clone here is cheaper (about 10% of a Hessian-map step on the paper's ResNets).
    return fwAD.make_dual(primal, tangent).clone()
