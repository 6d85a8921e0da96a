"""Jacobian matching (Srinivas & Fleuret 2018) as a distillation method: eq. 10 between
L2-normalised input Jacobians, with Props. 1 and 2 as optional terms. The maths are in
:mod:`lightning_layerkd.functional.jacobian_matching`."""

from __future__ import annotations

from torch import Tensor

from lightning_layerkd._common import check_choice
from lightning_layerkd.functional.jacobian_matching import (
    activation_matching_loss,
    jacobian_matching_loss,
    layer_jacobians,
)
from lightning_layerkd.methods.base import (
    DistillationMethod,
    MethodOutput,
    Networks,
    register_method,
)
from lightning_layerkd.methods.logit_losses import LogitLoss


@register_method("jacobian_matching")
class JacobianMatching(DistillationMethod):
    """Eq. 10 between the input Jacobians of the output (true class, or the teacher's
    arg-max) and, per crucial layer pair, of the teacher's largest average-pooled attention
    pixel (their section 6.3.2); the per-layer terms are the divergences.

    Args:
        output_weight: weight of eq. 10 on the output's input Jacobian.
        activation_weight: weight of Prop. 1's squared error of the logits.
        norm_penalty_weight: weight of Prop. 2's Jacobian-norm penalty (their Table 2).
        map_weight: ``lambda``, the weight of eq. 10's terms (output and layers) together.
        map_target: ``"label"`` (the true class) or ``"teacher"`` (its arg-max, label-free).
        task_loss, logit_weight, temperature, logit_loss: see :class:`DistillationMethod`;
            their Table 1 has rows with and without the cross-entropy.
    """

    divergence_name = "jacobian_matching"
    needs_autograd = True
    allows_no_layers = True  # eq. 10 on the output alone

    def __init__(
        self,
        *,
        output_weight: float = 1.0,
        activation_weight: float = 0.0,
        norm_penalty_weight: float = 0.0,
        map_weight: float = 1.0,
        map_target: str = "label",
        task_loss: bool = True,
        logit_weight: float = 0.0,
        temperature: float = 4.0,
        logit_loss: LogitLoss | None = None,
    ) -> None:
        super().__init__(
            task_loss=task_loss,
            logit_weight=logit_weight,
            temperature=temperature,
            logit_loss=logit_loss,
        )
        for name, value in (
            ("output_weight", output_weight),
            ("activation_weight", activation_weight),
            ("norm_penalty_weight", norm_penalty_weight),
            ("map_weight", map_weight),
        ):
            if value < 0:
                raise ValueError(f"{name} must be non-negative, got {value}")
        check_choice("map_target", map_target, ("label", "teacher"))
        self.output_weight = float(output_weight)
        self.activation_weight = float(activation_weight)
        self.norm_penalty_weight = float(norm_penalty_weight)
        self.map_weight = float(map_weight)
        self.map_target = map_target

    def compute(self, nets: Networks, x: Tensor, y: Tensor, *, create_graph: bool) -> MethodOutput:
        assert nets.teacher is not None
        assert nets.teacher_hooks is not None and nets.student_hooks is not None
        label_free = self.map_target == "teacher"
        # one forward per network serves the logits, the output's and every layer's Jacobian
        # and (student, training) Prop. 2's penalty
        teacher = layer_jacobians(nets.teacher, x, nets.teacher_hooks, None if label_free else y)
        t_logits, j_teacher = teacher.logits, teacher.output
        target = t_logits.argmax(1) if label_free else y
        penalty = bool(self.norm_penalty_weight) and create_graph
        student = layer_jacobians(
            nets.student,
            x,
            nets.student_hooks,
            target,
            teacher,
            create_graph=create_graph,
            norm_penalty=penalty,
        )
        logits, j_student = student.logits, student.output
        divergences = {
            name: jacobian_matching_loss(s_pixel.jacobian, t_pixel.jacobian, reduction="none")
            for name, s_pixel, t_pixel in zip(
                nets.layer_names, student.pixels, teacher.pixels, strict=True
            )
        }  # eq. 10 per sample and layer
        matching = self.output_weight * jacobian_matching_loss(j_student, j_teacher)
        matching = matching + sum((d.mean() for d in divergences.values()), x.new_zeros(()))
        losses: dict[str, Tensor] = {"map_loss": self.map_weight * matching}
        if self.activation_weight:
            losses["activation_matching"] = self.activation_weight * activation_matching_loss(
                logits, t_logits
            )  # Prop. 1
        if student.norm_penalty is not None:  # Prop. 2
            losses["jacobian_norm"] = self.norm_penalty_weight * student.norm_penalty
        return MethodOutput(logits, t_logits.detach(), divergences, losses)
