"""Attention, Jacobian and Hessian maps of crucial layers (Kokane et al. 2024, eqs. 2, 4, 6).

The functional building blocks are :func:`attention_map`, :func:`jacobian_map`,
:func:`hessian_map` and :func:`to_distribution`. :func:`compute_maps` is the engine that
:class:`~lightning_layerkd.DistillationModule` and the functional maps share: one forward pass
yields the logits and, through persistent hooks, every crucial layer's map.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any, Literal

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from lightning_layerkd.layers import (
    FeatureHooks,
    ProbeKind,
    conversion_conv,
    eval_mode,
    resolve_module,
)

__all__ = [
    "Method",
    "Task",
    "WeightAlignment",
    "Wrt",
    "attention_map",
    "compute_maps",
    "constant_map_layers",
    "hessian_map",
    "jacobian_map",
    "match_maps",
    "score",
    "to_distribution",
]

Method = Literal["attention", "jacobian", "hessian"]
Wrt = Literal["weight", "activation"]
Task = Literal["multiclass", "multilabel"]
WeightAlignment = Literal["sorted", "index"]
METHODS: tuple[str, ...] = ("attention", "jacobian", "hessian")
WRTS: tuple[str, ...] = ("weight", "activation")
TASKS: tuple[str, ...] = ("multiclass", "multilabel")
WEIGHT_ALIGNMENTS: tuple[str, ...] = ("sorted", "index")


def attention_map(features: Tensor, p: float = 2.0) -> Tensor:
    """Activation-based attention ``a(F) = sum_c |F_c|^p`` (eq. 2; Zagoruyko & Komodakis 2017).

    Args:
        features: ``(B, C, H, W)`` feature maps.
        p: the exponent (2 in the paper).

    Returns:
        ``(B, H, W)`` non-negative maps, in float32.
    """
    if features.dim() != 4:
        raise ValueError(
            f"attention_map needs (B, C, H, W) features, got shape {tuple(features.shape)}"
        )
    return features.float().abs().pow(p).sum(dim=1)


def to_distribution(m: Tensor, eps: float = 1e-8) -> Tensor:
    """Normalise non-negative maps into distributions ``p = (m + d) / sum(m + d)`` (section 3).

    Every dimension after the first is flattened into the support, so ``(B, H, W)`` maps give
    ``B`` distributions over ``H * W``. ``d = eps * mean(m) + tiny`` is relative to the map's
    mass, so the result does not depend on the scale of ``m`` (tiny Hessian maps are not washed
    out) and an all-zero map becomes uniform. Computed in float32 even under mixed precision.
    """
    if m.dim() < 2:
        raise ValueError(f"to_distribution needs a batch dimension, got shape {tuple(m.shape)}")
    flat = m.float().flatten(1)
    d = eps * flat.mean(dim=1, keepdim=True) + torch.finfo(torch.float32).tiny
    shifted = flat + d
    return shifted / shifted.sum(dim=1, keepdim=True)


def match_maps(
    student: Tensor, teacher: Tensor, weight_alignment: WeightAlignment = "sorted"
) -> tuple[Tensor, Tensor]:
    """Bring a student map and a teacher map onto one support (design.md section 3).

    Per-sample ``(B, H, W)`` maps: adaptive average pooling of the larger map to the smaller
    spatial size (pixels correspond between any two networks).

    Weight maps (the shape of a convolution weight, one per batch) are reduced to one energy per
    output channel. Channel ``k`` of the teacher has nothing to do with channel ``k`` of the
    student (permuting a network's hidden channels leaves its function unchanged but permutes
    its weight maps), so ``weight_alignment="sorted"`` compares the energies sorted in
    decreasing order, which is invariant to any permutation of input or output channels;
    ``"index"`` compares channel ``k`` with channel ``k`` (the full map when the shapes agree).
    Either way, different channel counts are adaptively pooled to the smaller one.
    Returns ``(B, K)`` or ``(1, K)`` non-negative maps.
    """
    if student.dim() == 3 and teacher.dim() == 3:
        size = (min(student.shape[1], teacher.shape[1]), min(student.shape[2], teacher.shape[2]))
        return (
            F.adaptive_avg_pool2d(student.unsqueeze(1), size).squeeze(1).flatten(1),
            F.adaptive_avg_pool2d(teacher.unsqueeze(1), size).squeeze(1).flatten(1),
        )
    if weight_alignment not in WEIGHT_ALIGNMENTS:
        raise ValueError(
            f"weight_alignment must be one of {list(WEIGHT_ALIGNMENTS)}, got {weight_alignment!r}"
        )
    if weight_alignment == "index" and student.shape == teacher.shape:
        return student.reshape(1, -1), teacher.reshape(1, -1)
    s = student.flatten(1).sum(dim=1)
    t = teacher.flatten(1).sum(dim=1)
    if weight_alignment == "sorted":
        s = s.sort(descending=True).values
        t = t.sort(descending=True).values
    channels = min(s.numel(), t.numel())
    return (
        F.adaptive_avg_pool1d(s.view(1, 1, -1), channels).view(1, -1),
        F.adaptive_avg_pool1d(t.view(1, 1, -1), channels).view(1, -1),
    )


def _at_least_float32(t: Tensor) -> Tensor:
    # half precision is upcast; float64 stays float64
    return t.to(torch.promote_types(t.dtype, torch.float32))


def score(logits: Tensor, target: Tensor, task: Task = "multiclass") -> Tensor:
    """``s_i``, the per-sample scalar a derivative map differentiates (design.md section 1).

    Multi-class: ``log_softmax(z_i)[y_i]`` with ``target`` the class indices. Multi-label:
    ``sum_k y_ik log sigmoid(z_ik)`` over the positive labels, ``target`` a 0/1 matrix.
    """
    z = _at_least_float32(logits)
    if task == "multiclass":
        return torch.log_softmax(z, dim=-1).gather(1, target.long().view(-1, 1)).squeeze(1)
    return (F.logsigmoid(z) * target.to(z.dtype)).sum(dim=-1)


def _score_curvature(logits: Tensor, u: Tensor, target: Tensor, task: Task) -> Tensor:
    """``H_z u`` with ``H_z = -d^2 s / dz^2`` per sample (positive semi-definite)."""
    z = _at_least_float32(logits)
    u = u.to(z.dtype)
    if task == "multiclass":
        p = torch.softmax(z, dim=-1)
        return p * u - p * (p * u).sum(dim=-1, keepdim=True)  # (diag(p) - p p^T) u
    sig = torch.sigmoid(z)
    return sig * (1 - sig) * u * target.to(z.dtype)


def default_target(logits: Tensor, task: Task) -> Tensor:
    """The label-free target: the arg-max class, or the labels with positive logits."""
    if task == "multiclass":
        return logits.argmax(dim=-1)
    return (logits > 0).to(logits.dtype)


@contextmanager
def _requires_grad(tensors: Sequence[Tensor]) -> Iterator[None]:
    """Temporarily let frozen tensors (teacher weights) be differentiated; restored after."""
    frozen = [t for t in tensors if not t.requires_grad]
    for t in frozen:
        t.requires_grad_(True)
    try:
        yield
    finally:
        for t in frozen:
            t.requires_grad_(False)


@contextmanager
def _running_stats_kept(model: nn.Module) -> Iterator[None]:
    """Keep batch-norm running statistics unchanged across extra probe passes."""
    saved = [
        (m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for m in model.modules()
        if isinstance(m, _BatchNorm)
        and m.training
        and m.track_running_stats
        and m.running_mean is not None
        and m.running_var is not None
        and m.num_batches_tracked is not None
    ]
    try:
        yield
    finally:
        # Through ``.data``: batch norm saves its running stats for backward, and a restore that
        # bumped their version counters would void the graph of the step's main pass.
        for m, mean, var, count in saved:
            m.running_mean.data.copy_(mean)  # type: ignore[union-attr]
            m.running_var.data.copy_(var)  # type: ignore[union-attr]
            m.num_batches_tracked.data.copy_(count)  # type: ignore[union-attr]


_CONVOLUTIONS = (F.conv1d, F.conv2d, F.conv3d)
_BATCH_NORM_SIGNATURE = inspect.signature(F.batch_norm)


class _LeanAutograd(TorchFunctionMode):
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
    transposed tensors, 1.5-2.7 times slower on CPU (ResNet layer shapes, batch 32).

    The tangents are built from ordinary differentiable ops, so reverse mode through them (the
    student's map loss) is unchanged.
    """

    def __init__(self, *, tangents: bool, double_backward: bool) -> None:
        super().__init__()
        self.tangents, self.double_backward = tangents, double_backward

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in _CONVOLUTIONS and not kwargs and len(args) >= 2:
            conv = partial(_convolution, func) if self.double_backward else func
            return _convolution_jvp(conv, *args) if self.tangents else conv(*args)
        if func is F.batch_norm and self.tangents:  # dispatched as (input, mean, var) + keywords
            bound = _BATCH_NORM_SIGNATURE.bind(*args, **kwargs)
            bound.apply_defaults()
            return _batch_norm_jvp(func, *bound.args)
        return func(*args, **kwargs)


def _convolution(
    func: Any,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
) -> Tensor:
    """``func(x, weight, ...)`` through :class:`_Convolution` where it applies (batched input,
    numeric padding, no autocast, grad mode on); otherwise ``func`` itself."""
    nd = _CONVOLUTIONS.index(func) + 1
    if (
        isinstance(padding, str)
        or x.dim() != nd + 2
        or not torch.is_grad_enabled()
        or torch.is_autocast_enabled(x.device.type)
    ):
        return func(x, weight, bias, stride, padding, dilation, groups)
    params = tuple(_ntuple(v, nd) for v in (stride, padding, dilation))
    return _Convolution.apply(x, weight, bias, *params, groups)


#: ids of the leaf tensors the running ``torch.autograd.grad`` call asks for (``_grad``);
#: a custom backward cannot ask the engine whether a leaf's gradient is needed there.
_REQUESTED_LEAVES: set[int] | None = None


def _grad(outputs: Tensor, inputs: Sequence[Tensor], **options: Any) -> tuple[Tensor, ...]:
    """``torch.autograd.grad`` that tells :class:`_Convolution` which leaves it asks for."""
    global _REQUESTED_LEAVES
    previous, _REQUESTED_LEAVES = _REQUESTED_LEAVES, {id(t) for t in inputs}
    try:
        return torch.autograd.grad(outputs, inputs, **options)
    finally:
        _REQUESTED_LEAVES = previous


def _needed(ctx: Any, index: int) -> bool:
    """Whether the running backward needs the gradient of input ``index`` (as PyTorch's own
    convolution asks the engine), so that a gradient w.r.t. four layers' weights does not
    compute every layer's weight gradient."""
    if not ctx.needs_input_grad[index]:
        return False
    node = ctx.next_functions[index][0]
    if node is None:
        return False
    if (
        _REQUESTED_LEAVES is not None
        and ctx.input_ids[index] is not None
        and node.name() == "torch::autograd::AccumulateGrad"
    ):
        return ctx.input_ids[index] in _REQUESTED_LEAVES
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
    ) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.params = (stride, padding, dilation, groups, bias is not None)
        ctx.input_ids = (id(x), id(weight), None if bias is None else id(bias))
        return torch.ops.aten.convolution(
            x, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups
        )

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        mask = (_needed(ctx, 0), _needed(ctx, 1), ctx.params[4] and _needed(ctx, 2))
        grads = _ConvolutionBackward.apply(grad_out, x, weight, ctx.params, mask)
        return (*grads, None, None, None, None)


class _ConvolutionBackward(torch.autograd.Function):
    """``(dx, dW, db)`` of a convolution from the output gradient ``g``, and its backward.

    ``dx = conv_transpose(g, W)`` and ``dW = corr(x, g)`` are bilinear, so the backward of
    ``<ggx, dx> + <ggW, dW> + <ggb, db>`` is: ``d/dg = conv(ggx, W) + conv(x, ggW) + ggb``,
    ``d/dx`` = the input gradient of ``conv(., ggW)`` at ``g``, ``d/dW`` = the weight gradient of
    ``conv(ggx, .)`` at ``g``: two forward and two backward kernels at most.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, grad_out: Tensor, x: Tensor, weight: Tensor, params: tuple, mask: tuple
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        stride, padding, dilation, groups, has_bias = params
        ctx.set_materialize_grads(False)
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
        return d_g, d_x, d_w, None, None


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


def compute_maps(
    model: nn.Module,
    x: Tensor,
    hooks: FeatureHooks,
    *,
    method: Method,
    wrt: Wrt = "activation",
    target: Tensor | None = None,
    task: Task = "multiclass",
    create_graph: bool = False,
    num_probes: int = 1,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """One forward pass of ``model`` that returns its logits and the maps of the hooked layers.

    ``hooks`` sit on the crucial modules (attention and ``wrt="activation"``) or on their
    conversion convolutions (``wrt="weight"``). Jacobian maps (eq. 4) are ``G^2`` with
    ``G = d(sum_i s_i)/dW`` (one map per batch) or ``sum_c G_c^2`` with ``G = d(sum_i s_i)/dF``
    (per sample). Hessian maps (eq. 6) are ``|diag H|`` of the Gauss-Newton matrix (see
    :func:`hessian_map`), estimated as ``mean_k v_k * (H v_k)`` with Rademacher ``v_k`` and
    ``H v = J^T H_z (J v)``: ``J v`` by forward-mode AD in the same pass, ``J^T`` by one
    reverse pass for all layers together.

    ``create_graph=True`` keeps the graph so that a loss on the maps trains the model (the
    student); with ``False`` the maps and logits are constants (the teacher).
    ``target`` is the label (or the teacher's class); ``None`` uses the model's own arg-max.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if wrt not in WRTS:
        raise ValueError(f"wrt must be one of {WRTS}, got {wrt!r}")
    if num_probes < 1:
        raise ValueError(f"num_probes must be at least 1, got {num_probes}")

    if method == "attention":
        with torch.no_grad() if not create_graph else nullcontext(), hooks.record() as recording:
            logits = model(x)
            maps = [attention_map(f) for f in hooks.outputs(recording)]
        return logits, maps

    weights: list[Tensor] = (
        [m.weight for m in hooks.modules if isinstance(m.weight, Tensor)] if wrt == "weight" else []
    )
    if wrt == "activation" and not x.requires_grad:
        x = x.detach().requires_grad_(True)  # so a frozen model's features are differentiable
    probe: ProbeKind | None = None
    if method == "hessian":
        probe = "weight" if wrt == "weight" else "output"

    # Forward-mode AD does not mix with autocast (the probe tangents would meet low-precision
    # weights), so Hessian passes run in full precision; design.md 3 asks for float32 maps anyway.
    precision = (
        torch.autocast(x.device.type, enabled=False) if method == "hessian" else nullcontext()
    )
    with torch.enable_grad(), _requires_grad(weights), precision:
        logits, diagonals = _derivative_pass(
            model, x, hooks, method, probe, weights, target, task, create_graph, generator
        )
        if method == "hessian" and num_probes > 1:
            with _running_stats_kept(model):
                for _ in range(num_probes - 1):
                    _, more = _derivative_pass(
                        model,
                        x,
                        hooks,
                        method,
                        probe,
                        weights,
                        default_target(logits, task) if target is None else target,
                        task,
                        create_graph,
                        generator,
                    )
                    diagonals = [a + b for a, b in zip(diagonals, more, strict=True)]
            diagonals = [d / num_probes for d in diagonals]

    maps = []
    for d in diagonals:
        m = d.square() if method == "jacobian" else d.abs()
        maps.append(m if wrt == "weight" else m.sum(dim=1))
    return logits, maps


def _derivative_pass(
    model: nn.Module,
    x: Tensor,
    hooks: FeatureHooks,
    method: Method,
    probe: ProbeKind | None,
    weights: list[Tensor],
    target: Tensor | None,
    task: Task,
    create_graph: bool,
    generator: torch.Generator | None,
) -> tuple[Tensor, list[Tensor]]:
    """Forward once; return logits and the gradients (Jacobian) or probe products (Hessian)."""
    dual = fwAD.dual_level() if probe is not None else nullcontext()
    lean = (
        _LeanAutograd(tangents=probe is not None, double_backward=create_graph)
        if probe is not None or create_graph
        else nullcontext()
    )
    with hooks.record(probe, generator) as recording:
        with dual, lean:
            out = model(x)
            logits, tangent = fwAD.unpack_dual(out) if probe is not None else (out, None)
        # The reverse pass runs after the dual level has closed: inside it, every backward op
        # would also carry the saved tensors' tangents (forward-over-reverse), tripling its cost.
        features = hooks.outputs(recording)
        wrt_tensors = weights if weights else features
        y = default_target(logits.detach(), task) if target is None else target
        if method == "jacobian":
            s = score(logits, y, task).sum()  # sum_i s_i
            grads = _grad(s, wrt_tensors, create_graph=create_graph)
            return (logits if create_graph else logits.detach()), list(grads)
        if tangent is None:
            raise RuntimeError("the forward pass carried no probe tangent to the logits")
        # Gauss-Newton: H v = J^T H_z (J v); J v is the tangent of the logits (forward mode).
        curvature = _score_curvature(logits, tangent, y, task).to(logits.dtype)
        hv = _grad(logits, wrt_tensors, grad_outputs=curvature, create_graph=create_graph)
        probes = [p for p in recording.probes if p is not None]
        diagonals = [v * h for v, h in zip(probes, hv, strict=True)]  # Hutchinson: v * (H v)
        return (logits if create_graph else logits.detach()), diagonals


def _maps_of_layers(
    model: nn.Module, x: Tensor, layers: Sequence[str], wrt: Wrt, **options: Any
) -> list[Tensor]:
    """Hook ``layers`` (or their conversion convs) for one :func:`compute_maps` call."""
    modules = [resolve_module(model, path, x) for path in layers]
    if wrt == "weight":
        convs = [conversion_conv(m, path) for m, path in zip(modules, layers, strict=True)]
        hooks = FeatureHooks([c for _, c in convs], [p for p, _ in convs])
    else:
        hooks = FeatureHooks(modules, list(layers))
    try:
        _, maps = compute_maps(model, x, hooks, wrt=wrt, **options)
    finally:
        hooks.remove()
    return maps


def jacobian_map(
    model: nn.Module,
    x: Tensor,
    layers: Sequence[str],
    target: Tensor | None = None,
    *,
    wrt: Wrt = "activation",
    task: Task = "multiclass",
    create_graph: bool = False,
) -> list[Tensor]:
    """Jacobian maps of ``layers`` (eq. 4): first derivatives of ``sum_i s_i``.

    ``wrt="weight"``: ``G^2`` for the weight ``W_j`` of each layer's conversion convolution, one
    map of ``W_j``'s shape per batch (the paper's reading). ``wrt="activation"``: ``sum_c G_c^2``
    for the layer output ``F_j``, a ``(B, H, W)`` map per sample. ``target`` defaults to the
    model's arg-max. ``create_graph=True`` keeps the graph for training through the map.
    """
    return _maps_of_layers(
        model,
        x,
        layers,
        wrt,
        method="jacobian",
        target=target,
        task=task,
        create_graph=create_graph,
    )


def hessian_map(
    model: nn.Module,
    x: Tensor,
    layers: Sequence[str],
    target: Tensor | None = None,
    *,
    wrt: Wrt = "activation",
    task: Task = "multiclass",
    num_probes: int = 1,
    generator: torch.Generator | None = None,
    create_graph: bool = False,
) -> list[Tensor]:
    """Hessian maps of ``layers`` (eq. 6): the diagonal of the Gauss-Newton matrix of
    ``sum_i s_i``, ``|diag(J^T H_z J)|``, by Hutchinson probes.

    ``H_z = diag(p) - p p^T`` is the curvature of the log-softmax. The Gauss-Newton diagonal
    equals the Hessian's diagonal wherever the network is piecewise linear in the
    differentiated tensor: a ReLU network with batch norm in eval mode (the teacher), for a
    layer's activation or for one layer's weight. It differs for a network whose batch norm
    is in training mode (the student: the batch statistics make it non-linear in the weight).
    Training-mode batch norm has no third derivative in PyTorch, which rules out training
    through the exact double-backward Hessian.

    Each probe ``v`` (Rademacher) gives ``v * (H v)``, whose mean is ``diag H``; the map is
    ``|mean over num_probes|``. Where the map has many more entries than ``H``'s rank (at most
    batch x (classes - 1); a ResNet layer's weight or activation), the off-diagonal terms
    dominate every entry and the normalised map's noise does not shrink with probes; the
    default ``weight_alignment="sorted"`` sums each output channel's entries, which averages
    that noise (signal-to-noise ratios in ``benchmarks/RESULTS.md``). ``wrt`` and the returned
    shapes are as in :func:`jacobian_map`; probes are drawn from ``generator`` when given.
    """
    return _maps_of_layers(
        model,
        x,
        layers,
        wrt,
        method="hessian",
        target=target,
        task=task,
        create_graph=create_graph,
        num_probes=num_probes,
        generator=generator,
    )


def constant_map_layers(
    model: nn.Module, x: Tensor, layers: Sequence[str], rtol: float = 1e-4
) -> list[str]:
    """The layers among ``layers`` whose activation-gradient map (eq. 4, ``wrt="activation"``)
    is constant over its support for every sample of ``x``.

    The gradient with respect to a feature map that feeds global average pooling directly is
    the same at every pixel, so its distribution is uniform for any network and its JSD is 0:
    a loss without signal. Hessian maps with respect to the activation share that Jacobian and
    are constant in expectation. The model runs in eval mode (batch-norm statistics untouched).
    """
    with eval_mode(model):
        maps = jacobian_map(model, x, layers, wrt="activation")
    constant = []
    for path, m in zip(layers, maps, strict=True):
        flat = m.detach().flatten(1).double()
        spread = flat.amax(dim=1) - flat.amin(dim=1)
        if bool((spread <= rtol * flat.amax(dim=1)).all()):
            constant.append(path)
    return constant
