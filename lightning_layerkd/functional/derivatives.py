"""Derivative maps: Jacobian (eq. 4) and Hessian (eq. 6) maps of crucial layers.

:func:`compute_maps` is the engine that the map methods and the functional maps share: one
forward pass yields the logits and, through persistent hooks, every crucial layer's map.
:func:`jacobian_map`, :func:`hessian_map` and :func:`constant_map_layers` are its functional
front ends. The cheaper autograd rules it runs under live in
:mod:`lightning_layerkd._autograd.mode`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any, Literal

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_layerkd._autograd.attention import ComposedAttention
from lightning_layerkd._autograd.mode import LeanAutograd
from lightning_layerkd._common import Task, eval_mode
from lightning_layerkd.functional._probes import batchable, batched_probe_pass, plan_key
from lightning_layerkd.functional.maps import (
    WRTS,
    Wrt,
    attention_map,
    channel_sum,
    default_target,
    score,
    score_curvature,
)
from lightning_layerkd.layers.hooks import FeatureHooks, ProbeKind
from lightning_layerkd.layers.specs import conversion_conv, resolve_module
from lightning_layerkd.layers.tokens import token_layout

MapKind = Literal["attention", "jacobian", "hessian"]
MAP_KINDS: tuple[str, ...] = ("attention", "jacobian", "hessian")


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
def running_stats_kept(model: nn.Module) -> Iterator[None]:
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


def compute_maps(
    model: nn.Module,
    x: Tensor,
    hooks: FeatureHooks,
    *,
    method: MapKind,
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
    Hessian probes of a model in eval mode without a graph (the teacher) share one pass over
    the batch repeated ``num_probes`` times, with ``num_probes`` times the activation memory
    (:mod:`lightning_layerkd.functional._probes`); the first call for an input layout runs one
    probe alone to
    plan the draws. Otherwise each probe is a pass of its own.
    """
    if method not in MAP_KINDS:
        raise ValueError(f"method must be one of {list(MAP_KINDS)}, got {method!r}")
    if wrt not in WRTS:
        raise ValueError(f"wrt must be one of {WRTS}, got {wrt!r}")
    if num_probes < 1:
        raise ValueError(f"num_probes must be at least 1, got {num_probes}")

    if method == "attention":
        with torch.no_grad() if not create_graph else nullcontext(), hooks.record() as recording:
            logits = model(x)
            features = hooks.outputs(recording)
            layout = token_layout(model)
            maps = [
                attention_map(f, layer=p, layout=layout)
                for f, p in zip(features, hooks.paths, strict=True)
            ]
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
    # weights), so Hessian passes run in full precision (maps are float32 anyway, section 3).
    precision = (
        torch.autocast(x.device.type, enabled=False) if method == "hessian" else nullcontext()
    )
    # The teacher's probes share one pass over a repeated batch
    # (lightning_layerkd.functional._probes),
    # once a first pass has planned their draws for this input layout.
    batched = num_probes > 1 and batchable(model, hooks, probe, create_graph)  # no probe: no
    key = plan_key(x, probe) if batched else None
    passes = partial(_derivative_pass, model, x, hooks, method, probe, weights)
    with torch.enable_grad(), _requires_grad(weights), precision, ComposedAttention():
        if batched and probe is not None and getattr(hooks.probe_plan, "key", None) == key:
            logits, target, diagonals = batched_probe_pass(
                model, x, hooks, probe, target, task, num_probes, generator
            )
        else:
            logits, target, diagonals = passes(target, task, create_graph, generator, plan=key)
            if batched and probe is not None:  # the other probes, as the first pass planned
                _, _, diagonals = batched_probe_pass(
                    model, x, hooks, probe, target, task, num_probes - 1, generator, diagonals
                )
            elif method == "hessian" and num_probes > 1:
                with running_stats_kept(model):
                    for _ in range(num_probes - 1):
                        _, _, diagonals = passes(
                            target, task, create_graph, generator, accumulate=diagonals
                        )
        if method == "hessian" and num_probes > 1:
            diagonals = [d / num_probes for d in diagonals]
    if not create_graph:
        logits = logits.detach()

    maps, layout = [], token_layout(model)
    for d, path in zip(diagonals, hooks.paths, strict=True):
        m = d.square() if method == "jacobian" else d.abs()
        maps.append(m if wrt == "weight" else channel_sum(m, path, layout))
    return logits, maps


def _derivative_pass(
    model: nn.Module,
    x: Tensor,
    hooks: FeatureHooks,
    method: MapKind,
    probe: ProbeKind | None,
    weights: list[Tensor],
    target: Tensor | None,
    task: Task,
    create_graph: bool,
    generator: torch.Generator | None,
    accumulate: list[Tensor] | None = None,
    plan: object = None,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Forward once; return logits, the target and the gradients (Jacobian) or probe products
    (Hessian), the latter added to ``accumulate`` when given (a later probe). A ``plan`` key
    keeps the probe draws for :func:`~lightning_layerkd.functional._probes.batched_probe_pass`."""
    dual = fwAD.dual_level() if probe is not None else nullcontext()
    lean = LeanAutograd(tangents=probe is not None, double_backward=create_graph)
    active = lean if probe is not None or create_graph else nullcontext()
    with hooks.record(probe, generator, plan=plan) as recording:
        with dual, active:
            out = model(x)
            logits, tangent = fwAD.unpack_dual(out) if probe is not None else (out, None)
        # The reverse pass runs after the dual level has closed: inside it, every backward op
        # would also carry the saved tensors' tangents (forward-over-reverse), tripling its cost.
        features = hooks.outputs(recording)
        wrt_tensors = weights if weights else features
        # (the target is no function of the logits' graph: arg-max or a comparison)
        y = default_target(logits, task) if target is None else target
        if method == "jacobian":
            s = score(logits, y, task).sum()  # sum_i s_i
            grads = lean.grad(s, wrt_tensors, create_graph=create_graph)
            return logits, y, list(grads)
        if tangent is None:
            raise RuntimeError("the forward pass carried no probe tangent to the logits")
        # Gauss-Newton: H v = J^T H_z (J v); J v is the tangent of the logits (forward mode).
        curvature = score_curvature(logits, tangent, y, task)
        if curvature.dtype != logits.dtype:
            curvature = curvature.to(logits.dtype)
        hv = lean.grad(logits, wrt_tensors, grad_outputs=curvature, create_graph=create_graph)
        probes = [p for p in recording.probes if p is not None]
        # Hutchinson: v * (H v); v = +-1, so the product is exact and addcmul adds the same
        if accumulate is None:
            return logits, y, [v * h for v, h in zip(probes, hv, strict=True)]
        terms = zip(accumulate, probes, hv, strict=True)
        return logits, y, [torch.addcmul(a, v, h) for a, v, h in terms]


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
