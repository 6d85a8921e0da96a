"""Jacobian matching (Srinivas & Fleuret 2018): input Jacobians, eq. 10, Props. 1-2.

A functional core that works on any ``nn.Module`` returning ``(B, K)`` logits:

* :func:`input_jacobian`: ``J_i = d z_i[c_i] / d x_i``, the input gradient of one logit per
  sample (the true class, or the model's own arg-max; their section 4.1);
* :func:`attention_pixel_jacobian`: the input gradient of the largest pixel of an intermediate
  layer's average-pooled attention map (their sections 5.2.1 and 6.3.2);
* :func:`layer_jacobians`: both of the above for every hooked layer from one forward pass (what
  :class:`~lightning_layerkd.DistillationModule` uses);
* :func:`jacobian_matching_loss`: eq. 10, squared distance of L2-normalised Jacobians;
* :func:`activation_matching_loss`: the squared error of the outputs (Prop. 1);
* :func:`jacobian_norm_penalty`: ``sum_k ||d z_k / d x||^2`` (Prop. 2, Table 2).

Derivatives are taken with one backward pass for the whole batch (of ``sum_i``), which gives
each sample's own gradient exactly when the samples do not interact: true in eval mode, but
batch norm in training mode couples the samples through the batch statistics, so ``J_i`` then
also holds the (small) cross terms ``d z_j[c_j] / d x_i``, ``j != i``. ``create_graph=True``
keeps the graph so that a loss on ``J`` trains the model (double backward); the input is always
differentiated as a fresh leaf, so no gradient flows into whatever produced ``x``. The functions
need autograd and so fail under ``torch.inference_mode()`` (they do work under ``no_grad``).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_layerkd._autograd.mode import LeanAutograd
from lightning_layerkd.functional.maps import at_least_float32
from lightning_layerkd.layers.hooks import FeatureHooks
from lightning_layerkd.layers.specs import resolve_module


def _leaf(x: Tensor) -> Tensor:
    """``x`` as a fresh leaf that requires grad (a frozen teacher's input is differentiable)."""
    return x.detach().requires_grad_(True)


def _check_logits(logits: object) -> Tensor:
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        seen = (
            f"a tensor of shape {tuple(logits.shape)}"
            if isinstance(logits, Tensor)
            else type(logits).__name__
        )
        raise ValueError(f"the model must return (B, K) logits, got {seen}")
    return logits


def _classes(logits: Tensor, target: Tensor | None) -> Tensor:
    """``c_i``: ``target`` (class indices) or the model's own arg-max class."""
    if target is None:
        return logits.detach().argmax(dim=1)
    target = target.to(device=logits.device, dtype=torch.long).reshape(-1)
    if target.numel() != logits.shape[0]:
        raise ValueError(
            f"target must hold one class index per sample ({logits.shape[0]}), "
            f"got {target.numel()} values"
        )
    return target


def input_jacobian(
    model: nn.Module,
    x: Tensor,
    target: Tensor | None = None,
    *,
    create_graph: bool = False,
) -> tuple[Tensor, Tensor]:
    """Logits and input Jacobians ``J_i = d z_i[c_i] / d x_i`` of one logit per sample.

    ``c_i`` is ``target[i]`` (the true class, or the teacher's class for a student) or, with
    ``target=None``, the model's own arg-max: the "output variable with the largest magnitude"
    of section 4.1, which "often corresponds to the right label". The paper's heuristic keeps
    one row of the full ``K x D`` Jacobian (section 4.1) and differentiates the *logits*: their
    distillation uses the squared-error loss of Prop. 1 on the raw outputs (section 6.1), not
    the softmax outputs of eqs. 2-3.

    One backward of ``sum_i z_i[c_i]`` for the whole batch (exact per sample in eval mode; see
    the module notes for batch norm in training mode).

    Args:
        model: maps ``x`` to ``(B, K)`` logits.
        x: one batch, ``(B, ...)``.
        target: ``(B,)`` class indices, or ``None`` for the arg-max.
        create_graph: keep the graph (the student), so that a loss on ``J`` and on the logits
            trains the model; with ``False`` both are returned detached (the teacher).

    Returns:
        ``(logits, J)`` with ``J`` of the shape of ``x``.
    """
    with torch.enable_grad():
        x = _leaf(x)
        logits = _check_logits(model(x))
        c = _classes(logits, target)
        picked = logits.gather(1, c.view(-1, 1)).sum()
        (j,) = torch.autograd.grad(picked, x, create_graph=create_graph)
    return (logits if create_graph else logits.detach()), j


def jacobian_matching_loss(
    j_student: Tensor, j_teacher: Tensor, eps: float = 1e-12, reduction: str = "mean"
) -> Tensor:
    """Eq. 10: ``mean_i || J^s_i / ||J^s_i||_2 - J^t_i / ||J^t_i||_2 ||_2^2``.

    Each sample's Jacobian is flattened and divided by its own L2 norm (clamped below by
    ``eps``, so an all-zero Jacobian stays zero), the squared Euclidean distance is taken per
    sample and averaged over the batch (``reduction="none"``: per sample). No further
    constant: eq. 10 has none (the ``sigma^2`` of Prop. 1 belongs to the unnormalised form and
    is left to the loss weight). The value is
    ``2 - 2 cos(J^s_i, J^t_i)`` per sample, so it lies in ``[0, 4]``, is invariant to the scale
    of either Jacobian and is zero when they agree up to a positive factor. The teacher term is
    a constant (detached). Computed in at least float32.
    """
    if j_student.shape != j_teacher.shape:
        raise ValueError(
            "jacobian_matching_loss needs Jacobians of the same shape, got "
            f"{tuple(j_student.shape)} and {tuple(j_teacher.shape)}"
        )
    s = F.normalize(at_least_float32(j_student).flatten(1), dim=1, eps=eps)
    t = F.normalize(at_least_float32(j_teacher.detach()).flatten(1), dim=1, eps=eps)
    per_sample = (s - t).square().sum(dim=1)
    if reduction == "none":
        return per_sample
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return per_sample.mean()


def activation_matching_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Prop. 1's activation term: ``mean_i sum_k (T^k(x_i) - S^k(x_i))^2`` on the logits.

    Summed over the ``K`` outputs as in Prop. 1 (so ``K`` times ``F.mse_loss``), averaged over
    the batch; the teacher logits are a constant (detached). Computed in at least float32.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "activation_matching_loss needs outputs of the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    s = at_least_float32(student_logits).flatten(1)
    t = at_least_float32(teacher_logits.detach()).flatten(1)
    return (s - t).square().sum(dim=1).mean()


def jacobian_norm_penalty(
    model: nn.Module, x: Tensor, target: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Logits and the Jacobian-norm penalty of Prop. 2: ``mean_i sum_k ||d z_ik / d x_i||^2``.

    With ``target=None`` this is Prop. 2's regulariser exactly, the squared Frobenius norm of
    the full ``K x D`` input Jacobian of the logits, costing ``K`` backward passes. With
    ``target`` given, only the true-class row ``||d z_i[c_i] / d x_i||^2`` is kept, the paper's
    cheaper approximation of the full Jacobian (section 4.1). The ``sigma^2`` of Prop. 2 is the
    strength ``lambda`` of Table 2, left to the caller. The graph is kept (double backward), so
    ``loss + lambda * penalty`` trains the model; the logits keep their graph too, for the
    cross-entropy of the same forward pass. Averaged over the batch, at least float32.
    """
    with torch.enable_grad():
        x = _leaf(x)
        with LeanAutograd(tangents=False, double_backward=True):  # differentiated again
            logits = _check_logits(model(x))
        if target is not None:
            c = _classes(logits, target)
            (j,) = torch.autograd.grad(logits.gather(1, c.view(-1, 1)).sum(), x, create_graph=True)
            total = at_least_float32(j).flatten(1).square().sum(dim=1)
        else:
            total = x.new_zeros(x.shape[0], dtype=torch.promote_types(x.dtype, torch.float32))
            for k in range(logits.shape[1]):
                (j,) = torch.autograd.grad(
                    logits[:, k].sum(), x, create_graph=True, retain_graph=True
                )
                total = total + at_least_float32(j).flatten(1).square().sum(dim=1)
    return logits, total.mean()


# ---------------------------------------------------------------- attention-map pixels


class PixelJacobian(NamedTuple):
    """What :func:`attention_pixel_jacobian` returns (unpacks as a tuple)."""

    #: ``(B, K)`` logits of the same forward pass.
    logits: Tensor
    #: ``(B, ...)`` input Jacobians of the chosen pooled-attention pixel, the shape of ``x``.
    jacobian: Tensor
    #: ``(B, 2)`` row and column of the chosen pixel in the pooled ``(H', W')`` map; pass the
    #: teacher's to the student call.
    pixel: Tensor
    #: ``(B, H', W')`` average-pooled attention maps (detached).
    pooled: Tensor


def pool_window(size: tuple[int, int], fraction: float = 0.2) -> tuple[int, int]:
    """The average-pooling window of section 6.3.2: ``(feature size) / 5`` per side.

    Each side is ``round(fraction * s)`` and at least 1 (``s / 5`` never ends in ``.5``), e.g.
    56 -> 11, 32 -> 6, 28 -> 6, 14 -> 3, 8 -> 2, 4 -> 1.
    """
    return tuple(max(1, int(fraction * s + 0.5)) for s in size)  # type: ignore[return-value]


def attention_pixel_jacobian(
    model: nn.Module,
    x: Tensor,
    layer_module: nn.Module | str,
    teacher_pixel: Tensor | PixelJacobian | None = None,
    *,
    window: int | tuple[int, int] | None = None,
    stride: int | tuple[int, int] = 1,
    create_graph: bool = False,
) -> PixelJacobian:
    """Input Jacobian of an average-pooled attention map's largest pixel (sections 5.2.1, 6.3.2).

    The layer's output ``Z`` (read with a temporary forward hook, removed afterwards) gives the
    attention map ``A = sum_c |Z_c|^2`` (eq. 8), which is average-pooled with ``window``
    (default: :func:`pool_window`, map size / 5, the best of their Table 5) and ``stride``
    (default 1, a sliding window; the paper does not say). The pixel ``(i, j)`` of the pooled
    map is its arg-max per sample, or ``teacher_pixel`` when given, and ``J = d P[i, j] / d x``
    (one backward for the batch). The teacher call chooses the pixel; the student call takes
    the teacher's ``pixel`` (same index, section 5.2.1), so both layers must give pooled maps
    of the same size. Pooling averages (not sums) the window, which eq. 10 cannot tell apart.

    Args:
        model: maps ``x`` to ``(B, K)`` logits.
        x: one batch, ``(B, C, H, W)`` images.
        layer_module: the intermediate layer (a submodule of ``model`` or its path); it must
            run once per forward and return a ``(B, C, H, W)`` tensor.
        teacher_pixel: the teacher's result (its pooled size is then checked too) or its
            ``(B, 2)`` ``pixel`` (row and column in the pooled map); ``None`` takes each
            sample's arg-max (the teacher call).
        window: pooling window (one int for both sides); ``None`` for map size / 5.
        stride: pooling stride.
        create_graph: keep the graph (the student); with ``False`` the logits and ``J`` are
            detached (the teacher).

    Returns:
        A :class:`PixelJacobian` ``(logits, jacobian, pixel, pooled)``.
    """
    path = layer_module if isinstance(layer_module, str) else ""
    module = resolve_module(model, layer_module) if isinstance(layer_module, str) else layer_module
    if not path:
        path = next((n for n, m in model.named_modules() if m is module), type(module).__name__)
    hooks = FeatureHooks([module], [path])
    with torch.enable_grad():
        x = _leaf(x)
        try:
            with hooks.record() as recording:
                logits = _check_logits(model(x))
            (features,) = hooks.outputs(recording)
        finally:
            hooks.remove()
        picked, index, pooled = _pooled_pixel(features, path, teacher_pixel, window, stride)
        (j,) = torch.autograd.grad(picked, x, create_graph=create_graph)
    return PixelJacobian(
        logits=logits if create_graph else logits.detach(),
        jacobian=j,
        pixel=index,
        pooled=pooled.detach(),
    )


def _pooled_pixel(
    features: Tensor,
    path: str,
    teacher_pixel: Tensor | PixelJacobian | None,
    window: int | tuple[int, int] | None,
    stride: int | tuple[int, int],
) -> tuple[Tensor, Tensor, Tensor]:
    """``(sum_i P_i[pixel_i], pixel, P)``: eq. 8's attention map of ``features``, average-pooled
    (section 6.3.2), and its arg-max pixel per sample or the teacher's."""
    if features.dim() != 4:
        raise ValueError(
            f"layer '{path}' must output (B, C, H, W) features, got shape {tuple(features.shape)}"
        )
    attention = at_least_float32(features).square().sum(dim=1, keepdim=True)  # eq. 8
    size = (attention.shape[-2], attention.shape[-1])
    kernel = pool_window(size) if window is None else window
    pooled = F.avg_pool2d(attention, kernel, stride=stride).squeeze(1)  # (B, H', W')
    width = pooled.shape[-1]
    if teacher_pixel is None:
        flat = pooled.detach().flatten(1).argmax(dim=1)
        index = torch.stack((flat // width, flat % width), dim=1)
    else:
        index = _check_index(teacher_pixel, pooled, path)
        flat = index[:, 0] * width + index[:, 1]
    return pooled.flatten(1).gather(1, flat.view(-1, 1)).sum(), index, pooled.detach()


class LayerJacobians(NamedTuple):
    """What :func:`layer_jacobians` returns: one forward pass's logits and input Jacobians."""

    #: ``(B, K)`` logits.
    logits: Tensor
    #: ``(B, ...)`` input Jacobians of the class logit, as :func:`input_jacobian`.
    output: Tensor
    #: per hooked layer, as :func:`attention_pixel_jacobian`.
    pixels: list[PixelJacobian]
    #: Prop. 2's penalty of the same pass, as :func:`jacobian_norm_penalty` (``norm_penalty``).
    norm_penalty: Tensor | None = None


def layer_jacobians(
    model: nn.Module,
    x: Tensor,
    hooks: FeatureHooks,
    target: Tensor | None = None,
    teacher: LayerJacobians | None = None,
    *,
    window: int | tuple[int, int] | None = None,
    stride: int | tuple[int, int] = 1,
    create_graph: bool = False,
    norm_penalty: bool = False,
) -> LayerJacobians:
    """:func:`input_jacobian` and, for every layer ``hooks`` sits on,
    :func:`attention_pixel_jacobian`, all from one forward pass of ``model``.

    One backward per Jacobian (``1 + len(hooks)``) through the same graph, instead of a forward
    and a backward each; the values are those of the separate calls (with batch norm in
    training mode, the running statistics are updated once). ``teacher`` is the teacher's
    result: its pixels are used, layer by layer, and the student's pooled maps must match.
    ``norm_penalty`` (needs ``create_graph``) adds Prop. 2's penalty over all ``K`` logits,
    :func:`jacobian_norm_penalty` with ``target=None``, from the same forward pass: ``K`` more
    backward passes, but no second forward (nor its backward in the training step).
    """
    if teacher is not None and len(teacher.pixels) != len(hooks.modules):
        raise ValueError(
            f"the teacher has {len(teacher.pixels)} hooked layers, this model "
            f"{len(hooks.modules)}; pair them one to one"
        )
    if norm_penalty and not create_graph:
        raise ValueError("norm_penalty=True needs create_graph=True: the penalty trains the model")
    # the student's Jacobians are differentiated again: convolutions with a native double backward
    lean = LeanAutograd(tangents=False, double_backward=True)
    active = lean if create_graph else nullcontext()
    with torch.enable_grad():
        x = _leaf(x)
        with hooks.record() as recording, active:
            logits = _check_logits(model(x))
            features = hooks.outputs(recording)
        c = _classes(logits, target)
        scalars = [logits.gather(1, c.view(-1, 1)).sum()]
        chosen = []
        for k, (path, f) in enumerate(zip(hooks.paths, features, strict=True)):
            picked, index, pooled = _pooled_pixel(
                f, path, None if teacher is None else teacher.pixels[k], window, stride
            )
            scalars.append(picked)
            chosen.append((index, pooled))
        if norm_penalty:  # Prop. 2: one row of the full K x D Jacobian per logit
            scalars += [logits[:, k].sum() for k in range(logits.shape[1])]
        last = len(scalars) - 1
        jacobians = [
            lean.grad(
                scalar, [x], create_graph=create_graph, retain_graph=create_graph or k < last
            )[0]
            for k, scalar in enumerate(scalars)
        ]
    penalty = None
    if norm_penalty:
        rows = jacobians[1 + len(chosen) :]
        total = x.new_zeros(x.shape[0], dtype=torch.promote_types(x.dtype, torch.float32))
        for j in rows:
            total = total + at_least_float32(j).flatten(1).square().sum(dim=1)
        penalty = total.mean()
    out_logits = logits if create_graph else logits.detach()
    pixels = [
        PixelJacobian(logits=out_logits, jacobian=j, pixel=index, pooled=pooled)
        for j, (index, pooled) in zip(jacobians[1 : 1 + len(chosen)], chosen, strict=True)
    ]
    return LayerJacobians(out_logits, jacobians[0], pixels, penalty)


def _check_index(teacher_pixel: Tensor | PixelJacobian, pooled: Tensor, path: str) -> Tensor:
    """The teacher's ``(B, 2)`` pixel coordinates, checked against the student's pooled map."""
    batch, height, width = pooled.shape
    if isinstance(teacher_pixel, PixelJacobian):
        if teacher_pixel.pooled.shape[-2:] != pooled.shape[-2:]:
            raise ValueError(
                f"the teacher's pooled attention map is {tuple(teacher_pixel.pooled.shape[-2:])} "
                f"but that of layer '{path}' is {(height, width)}; the teacher's and the "
                "student's layers must give attention maps of the same spatial size"
            )
        teacher_pixel = teacher_pixel.pixel
    index = teacher_pixel.to(device=pooled.device, dtype=torch.long)
    if index.shape != (batch, 2):
        raise ValueError(
            f"teacher_pixel must be ({batch}, 2) row and column indices, "
            f"got shape {tuple(index.shape)}"
        )
    rows, cols = index[:, 0], index[:, 1]
    if bool(((rows < 0) | (rows >= height) | (cols < 0) | (cols >= width)).any()):
        raise ValueError(
            f"teacher_pixel out of range for the {height}x{width} pooled attention map of layer "
            f"'{path}'; the teacher's and the student's layers must give attention maps of the "
            "same spatial size"
        )
    return index
