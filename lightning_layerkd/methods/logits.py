"""Methods that read the networks' outputs only: logit distillation (Hinton et al. 2015) and
the student alone. Neither has crucial layers, so the optimizer has one param group."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_layerkd.methods.base import (
    DistillationMethod,
    MethodOutput,
    Networks,
    register_method,
)


@register_method("logits")
class LogitDistillation(DistillationMethod):
    """Logit distillation: cross-entropy plus ``logit_weight * T^2 KL(softmax(z_T / T) ||
    softmax(z_S / T))`` (Hinton et al. 2015, section 2;
    :func:`~lightning_layerkd.functional.divergence.logit_distillation_loss`), the baseline to
    compare
    feature methods with. Any other method adds the same term with its own ``logit_weight``.

    Args:
        logit_weight: weight of the distillation term.
        temperature: ``T``, the softmax temperature.
        task_loss: add the cross-entropy.
    """

    divergence_name = "kl"
    uses_layers = False

    def __init__(
        self, *, logit_weight: float = 1.0, temperature: float = 4.0, task_loss: bool = True
    ) -> None:
        super().__init__(task_loss=task_loss, logit_weight=logit_weight, temperature=temperature)

    @property
    def label(self) -> str:
        """``logits``: logit distillation is this method's own term, not an addition."""
        return self.name

    def compute(self, nets: Networks, x: Tensor, y: Tensor, *, create_graph: bool) -> MethodOutput:
        assert nets.teacher is not None
        with torch.no_grad():
            teacher_logits = nets.teacher(x)
        return MethodOutput(nets.student(x), teacher_logits, {}, {})


@register_method("none")
class StudentOnly(DistillationMethod):
    """The student alone: the task loss and nothing else (and no teacher)."""

    divergence_name = "none"
    needs_teacher = False
    uses_layers = False

    def __init__(self, *, task_loss: bool = True) -> None:
        if not task_loss:
            raise ValueError("the student alone needs task_loss=True: it has no other loss")
        super().__init__(task_loss=task_loss)

    def compute(self, nets: Networks, x: Tensor, y: Tensor, *, create_graph: bool) -> MethodOutput:
        return MethodOutput(nets.student(x), None, {}, {})
