"""Cheaper autograd rules for the derivative-map passes: same values, same gradients.

:class:`LeanAutograd` is a ``TorchFunctionMode`` that, inside a map pass, replaces PyTorch's
forward-mode rules for convolution and batch norm with cheaper ones and records convolutions
whose double backward runs native kernels (:func:`native_convolution`); where a gradient is
differentiated again, it also replaces the activations whose derivatives PyTorch lacks
(:mod:`lightning_layerkd.activations`). The mode instance owns
all the state the rules need (which leaves the running ``grad`` call asks for); the module
holds none.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

from lightning_layerkd import activations

__all__ = ["LeanAutograd", "native_batch_norm", "native_convolution"]

_CONVOLUTIONS = (F.conv1d, F.conv2d, F.conv3d)
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
      tangent exists.
    * Batch norm: its input Jacobian is symmetric, so the tangent of the output is batch norm's
      own backward kernel applied to the input's tangent: one fused call instead of PyTorch's
      composite formula (about four times the cost). The output is a fresh tensor, not a view,
      so in-place ops after it stay cheap in reverse mode.

    With ``double_backward`` (the student's map pass, whose gradient is backpropagated again):
    convolutions record :class:`_Convolution`, whose double backward runs the native forward and
    backward kernels. PyTorch's own computes the weight-gradient term as a convolution of
    transposed tensors, 1.5-2.7 times slower on CPU (ResNet layer shapes, batch 32). And
    ``F.hardsigmoid``, whose backward PyTorch cannot differentiate (the squeeze-excite gates of
    MobileNetV3), runs as :func:`~lightning_layerkd.activations.hardsigmoid`: same values, a
    backward and a forward-mode rule made of differentiable ops. Without ``double_backward``
    PyTorch's own suffices (first derivatives and forward mode exist) and is kept.

    Batch norm in training mode (batch statistics) records :class:`_BatchNorm`, whose backward
    is differentiated again by a closed formula: about 25 aten ops (8 on whole tensors) where
    PyTorch's composite ``batchnorm_double_backward`` runs some 90. (With ``tangents`` too, the
    forward-mode rule above applies instead.)

    The tangents are built from ordinary differentiable ops, so reverse mode through them (the
    student's map loss) is unchanged.
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
        if self.double_backward and func in _TWICE_DIFFERENTIABLE:
            return _TWICE_DIFFERENTIABLE[func](*args, **kwargs)
        if func in _CONVOLUTIONS and not kwargs and len(args) >= 2:
            conv = partial(native_convolution, func, owner=self) if self.double_backward else func
            return _convolution_jvp(conv, *args) if self.tangents else conv(*args)
        if func is F.batch_norm and self.tangents:  # dispatched as (input, mean, var) + keywords
            bound = _BATCH_NORM_SIGNATURE.bind(*args, **kwargs)
            bound.apply_defaults()
            return _batch_norm_jvp(func, *bound.args)
        if func is F.batch_norm and self.double_backward:
            bound = _BATCH_NORM_SIGNATURE.bind(*args, **kwargs)
            bound.apply_defaults()
            return native_batch_norm(*bound.args, owner=self)
        return func(*args, **kwargs)


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
    nd = _CONVOLUTIONS.index(func) + 1
    if (
        isinstance(padding, str)
        or x.dim() != nd + 2
        or not torch.is_grad_enabled()
        or torch.is_autocast_enabled(x.device.type)
    ):
        return func(x, weight, bias, stride, padding, dilation, groups)
    params = tuple(_ntuple(v, nd) for v in (stride, padding, dilation))
    return _Convolution.apply(x, weight, bias, *params, groups, owner)


def _needed(ctx: Any, index: int) -> bool:
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
    """A convolution whose backward, :class:`_ConvolutionBackward`, is itself differentiable
    through native kernels (used where the gradient is backpropagated again)."""

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
        owner: LeanAutograd | None,
    ) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.owner = owner
        ctx.params = (stride, padding, dilation, groups, bias is not None)
        ctx.input_ids = (id(x), id(weight), None if bias is None else id(bias))
        return torch.ops.aten.convolution(
            x, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups
        )

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        mask = (_needed(ctx, 0), _needed(ctx, 1), ctx.params[4] and _needed(ctx, 2))
        grads = _ConvolutionBackward.apply(grad_out, x, weight, ctx.params, mask, ctx.owner)
        return (*grads, None, None, None, None, None)


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
        need_g, need_x, need_w = (_needed(ctx, i) for i in range(3))
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
    return _BatchNorm.apply(x, weight, bias, running_mean, running_var, momentum, eps, owner)


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
    ) -> Tensor:
        out, mean, invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps
        )
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.owner = owner
        ctx.eps = eps
        ctx.affine = (weight is not None, bias is not None)
        ctx.input_ids = tuple(None if t is None else id(t) for t in (x, weight, bias))
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, mean, invstd = ctx.saved_tensors
        mask = (
            _needed(ctx, 0),
            ctx.affine[0] and _needed(ctx, 1),
            ctx.affine[1] and _needed(ctx, 2),
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
        need_g, need_x = _needed(ctx, 0), _needed(ctx, 1)
        need_w = weight is not None and _needed(ctx, 2)
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


def _convolution_jvp(
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


def _batch_norm_jvp(
    func: Any,
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    args = (x, running_mean, running_var, weight, bias, training, momentum, eps)
    x_p, x_t = fwAD.unpack_dual(x)
    affine_tangent = any(
        t is not None and fwAD.unpack_dual(t).tangent is not None for t in (weight, bias)
    )
    if x_t is None or affine_tangent:
        return func(*args)
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
