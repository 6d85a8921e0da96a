"""Every Hutchinson probe of a Hessian map (eq. 6, Kokane et al. 2024) in one pass.

A frozen model in eval mode treats its samples independently, so ``k`` probes can run as one
forward and reverse pass over the batch repeated ``k`` times, copy ``i`` carrying probe ``i``:
the same estimator, with the probes drawn in the order of ``k`` sequential passes
(:meth:`~lightning_layerkd.layers.hooks.FeatureHooks.draw_probes`), at the cost of activations for
``k`` batches. :func:`~lightning_layerkd.functional.derivatives.compute_maps` takes this path for
the
teacher.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from lightning_layerkd._autograd.mode import LeanAutograd
from lightning_layerkd._common import Task
from lightning_layerkd.functional.maps import default_target, score_curvature
from lightning_layerkd.layers.hooks import FeatureHooks, ProbeKind


def batchable(model: nn.Module, hooks: FeatureHooks, probe: ProbeKind | None, graph: bool) -> bool:
    """Whether the probes of ``model``'s Hessian maps may share one pass over a repeated batch:
    no graph through the maps (the teacher) and every module in eval mode (no batch statistics,
    which would mix the copies); weight probes also need plain zero-padded convolutions, whose
    weight gradient :func:`batched_probe_pass` takes per copy."""
    if probe is None or graph or any(m.training for m in model.modules()):
        return False
    return probe == "output" or all(_plain_convolution(m) for m in hooks.modules)


def _plain_convolution(module: nn.Module) -> bool:
    return (
        isinstance(module, _ConvNd)
        and not module.transposed
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def plan_key(x: Tensor, probe: ProbeKind | None) -> tuple:
    """What a recorded probe plan depends on: the probe kind and the input's layout."""
    return (probe, tuple(x.shape), x.dtype, x.device)


def batched_probe_pass(
    model: nn.Module,
    x: Tensor,
    hooks: FeatureHooks,
    probe: ProbeKind,
    target: Tensor | None,
    task: Task,
    chunks: int,
    generator: torch.Generator | None,
    accumulate: list[Tensor] | None = None,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """``chunks`` probes of eq. 6 in one pass over ``x`` repeated ``chunks`` times: the logits
    of ``x`` (the first copy), the target and ``sum_i v_i * (H v_i)`` per hooked layer (added to
    ``accumulate`` when given). ``hooks.probe_plan`` must describe ``x`` (:func:`plan_key`).

    The forward runs on ``chunks * len(x)`` samples, so it holds ``chunks`` times the
    activations of one pass. ``probe="output"``: the gradient w.r.t. the repeated output splits
    by copy. ``probe="weight"``: a weight gradient would sum over the copies and mix the probes,
    so the reverse pass stops at each convolution's output and copy ``i``'s weight gradient is
    the native weight-gradient kernel on copy ``i``'s input and output gradient.
    """
    probes = hooks.draw_probes(chunks, generator)  # before the forward: in sequential order
    rows = x.shape[0]
    lean = LeanAutograd(tangents=True, double_backward=False)
    with hooks.record(probe, generator, chunks=chunks, probes=probes) as recording:
        with fwAD.dual_level(), lean:
            out, tangent = fwAD.unpack_dual(model(x.repeat(chunks, *[1] * (x.dim() - 1))))
        # reverse pass outside the dual level, as in one-probe passes (no forward-over-reverse)
        features = hooks.outputs(recording)
        logits = out[:rows]
        y = default_target(logits, task) if target is None else target
        # the multiclass curvature does not read the target; the multilabel one weighs by it
        ys = y if task == "multiclass" else y.repeat(chunks, *[1] * (y.dim() - 1))
        if tangent is None:
            raise RuntimeError("the forward pass carried no probe tangent to the logits")
        curvature = score_curvature(out, tangent, ys, task)
        if curvature.dtype != out.dtype:
            curvature = curvature.to(out.dtype)
        grads = lean.grad(out, features, grad_outputs=curvature)
    diagonals = []
    for index, (module, g) in enumerate(zip(hooks.modules, grads, strict=True)):
        v = recording.probes[index]
        assert v is not None
        if probe == "weight":
            inputs = recording.inputs[index]
            assert inputs is not None
            with torch.no_grad():  # no graph through the teacher's maps
                pairs = zip(inputs, g.chunk(chunks), strict=True)
                g = torch.stack([_weight_gradient(module, x_i, g_i) for x_i, g_i in pairs])
        else:
            g = g.view_as(v)  # (copies * batch, ...) -> (copies, batch, ...)
        # Hutchinson: v = +-1, so v * (H v) is exact; summed over the copies
        d = (v * g).sum(0)
        diagonals.append(d if accumulate is None else accumulate[index] + d)
    return logits, y, diagonals


def _weight_gradient(conv: nn.Module, x: Tensor, grad_out: Tensor) -> Tensor:
    """The gradient of ``<grad_out, conv(x, W)>`` w.r.t. ``W``: the weight kernel alone."""
    nd = x.dim() - 2
    return torch.ops.aten.convolution_backward(
        grad_out, x, conv.weight, None, conv.stride, conv.padding, conv.dilation, False,
        [0] * nd, conv.groups, [False, True, False],
    )[1]  # fmt: skip
