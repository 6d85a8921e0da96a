"""Guards against silent failure: the checks :class:`~lightning_layerkd.DistillationModule`
runs so that a run which cannot learn stops with an error that says why."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def check_finite_loss(
    loss: Tensor, terms: Mapping[str, Tensor], x: Tensor, *, epoch: int, batch_idx: int
) -> None:
    """Raise :class:`NonFiniteLossError` if ``loss`` is not finite, naming the loss terms that
    are not and the batch's non-finite inputs. One host sync per call."""
    if bool(torch.isfinite(loss.detach()).all()):
        return
    bad_terms = {k: float(v.detach().float().mean()) for k, v in terms.items()}
    bad_terms = {k: v for k, v in bad_terms.items() if not math.isfinite(v)}
    bad_inputs = int((~torch.isfinite(x.detach())).sum()) if x.is_floating_point() else 0
    causes = []
    if bad_inputs:
        causes.append(f"the batch has {bad_inputs:,} non-finite input values: clean the data")
    causes.append("the learning rate may be too high for this model: lower lr")
    raise NonFiniteLossError(
        f"the training loss is {float(loss.detach().float())} at epoch {epoch}, batch "
        f"{batch_idx} (non-finite terms: {bad_terms or 'none'}); the run is stopped before the "
        f"student's weights turn non-finite. Likely causes: {'; '.join(causes)}"
    )


def check_trainable(model: nn.Module, role: str = "student") -> None:
    """A model with no parameter that requires a gradient cannot be trained."""
    params = list(model.parameters())
    if not any(p.requires_grad for p in params):
        raise ValueError(
            f"the {role} has no trainable parameters ({len(params)} parameters, all with "
            "requires_grad=False): unfreeze the layers to train, e.g. "
            f"{role}.requires_grad_(True)"
        )


def check_not_compiled(model: nn.Module | None, role: str, method: str) -> None:
    """Derivative methods differentiate through forward-mode AD and custom double-backward
    functions, which ``torch.compile`` does not trace: refuse a compiled network."""
    if model is not None and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        raise ValueError(
            f"the {role} is compiled with torch.compile, but method {method!r} takes derivatives "
            "of its features (forward-mode AD and double backward), which torch.compile cannot "
            f"trace; pass the uncompiled module ({role}._orig_mod), or use method='attention'"
        )


def check_separate(teacher: nn.Module | None, student: nn.Module) -> None:
    """A ``ValueError`` with the fix when the teacher is the student or shares parameters with
    it: freezing the teacher would freeze the student too."""
    if teacher is None:
        return
    student_params = {id(p) for p in student.parameters()}
    shared = sum(id(p) in student_params for p in teacher.parameters())
    if teacher is student or shared:
        what = "the same module" if teacher is student else f"{shared} parameters"
        raise ValueError(
            f"teacher and student share {what}: the teacher is frozen "
            "(requires_grad_(False)), which would freeze the student with it; pass a "
            "separate teacher, e.g. copy.deepcopy(student) for self-distillation"
        )


def check_layer_weights(weights: Mapping[str, float], layers: Sequence[str]) -> dict[str, float]:
    """The per-layer loss weights as floats; a ``ValueError`` for a layer that is not crucial
    or a weight that is negative or not finite."""
    unknown = sorted(set(weights) - set(layers))
    if unknown:
        raise ValueError(f"no crucial layers {unknown}; the crucial layers: {list(layers)}")
    bad = {k: v for k, v in weights.items() if not (math.isfinite(v) and v >= 0)}
    if bad:
        raise ValueError(f"layer loss weights must be finite and non-negative, got {bad}")
    return {k: float(v) for k, v in weights.items()}


def check_networks(
    teacher: nn.Module | None,
    student: nn.Module,
    method: str,
    needs_teacher: bool,
    needs_autograd: bool,
) -> None:
    """The networks ``method`` can distil: a teacher if it needs one, separate from a trainable
    student, neither compiled if the method differentiates through their features."""
    if teacher is None and needs_teacher:
        raise ValueError(f"method {method!r} needs a teacher; pass one or use method='none'")
    check_separate(teacher, student)
    check_trainable(student)
    if needs_autograd:
        check_not_compiled(student, "student", method)
        check_not_compiled(teacher, "teacher", method)
