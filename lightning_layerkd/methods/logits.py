"""Methods that read the networks' outputs only: logit distillation (Hinton et al. 2015),
decoupled KD (Zhao et al. 2022), DIST (Huang et al. 2022), each with logit standardization (Sun
et al. 2024) as an option, and the student alone. None has crucial layers, so the optimizer has
one param group. A feature method adds the same losses with ``logit_loss``
(:mod:`lightning_layerkd.methods.logit_losses`)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_layerkd.methods.base import (
    DistillationMethod,
    MethodOutput,
    Networks,
    register_method,
)
from lightning_layerkd.methods.logit_losses import DISTLoss, DKDLoss, KDLoss, LogitLoss


class OutputMethod(DistillationMethod):
    """A method whose only distillation term is a logit loss: the student's and the teacher's
    logits, no crucial layers. Its label is its logit loss's (``dkd+ls``), not
    ``<name>+<loss>``."""

    divergence_name = "kl"
    uses_layers = False

    def __init__(self, loss: LogitLoss, *, task_loss: bool = True) -> None:
        super().__init__(task_loss=task_loss, logit_loss=loss)

    @property
    def label(self) -> str:
        """The logit loss's label: the loss is this method's own term, not an addition."""
        assert self.logit_term is not None
        return self.logit_term.label

    def compute(self, nets: Networks, x: Tensor, y: Tensor, *, create_graph: bool) -> MethodOutput:
        assert nets.teacher is not None
        with torch.no_grad():
            teacher_logits = nets.teacher(x)
        return MethodOutput(nets.student(x), teacher_logits, {}, {})


@register_method("logits")
class LogitDistillation(OutputMethod):
    """Logit distillation: cross-entropy plus ``logit_weight * T^2 KL(softmax(z_T / T) ||
    softmax(z_S / T))`` (Hinton et al. 2015, section 2;
    :func:`~lightning_layerkd.functional.divergence.logit_distillation_loss`), the baseline to
    compare feature methods with; logged as ``train/logit_loss``. Any other method adds the
    same term with its own ``logit_weight``.

    Args:
        logit_weight: weight of the distillation term.
        temperature: ``T``, the softmax temperature (the base temperature with
            ``standardize``).
        standardize: logit standardization (Sun et al. 2024): z-scored logits before the
            softmax; reported as ``logits+ls``.
        task_loss: add the cross-entropy.
    """

    def __init__(
        self,
        *,
        logit_weight: float = 1.0,
        temperature: float = 4.0,
        standardize: bool = False,
        task_loss: bool = True,
    ) -> None:
        loss = KDLoss(weight=logit_weight, temperature=temperature, standardize=standardize)
        super().__init__(loss, task_loss=task_loss)
        self.logit_weight, self.temperature = loss.weight, loss.temperature
        self.standardize = standardize


@register_method("dkd")
class DecoupledKD(OutputMethod):
    """Decoupled KD (Zhao et al. 2022, eq. 8): cross-entropy plus
    ``w(epoch) (alpha TCKD + beta NCKD)``, logged as ``train/tckd`` and ``train/nckd``
    (:class:`~lightning_layerkd.methods.logit_losses.DKDLoss`, whose options these are).

    Args:
        alpha, beta, temperature, warmup_epochs, standardize: see
            :class:`~lightning_layerkd.methods.logit_losses.DKDLoss`.
        task_loss: add the cross-entropy.
    """

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        warmup_epochs: int = 20,
        standardize: bool = False,
        task_loss: bool = True,
    ) -> None:
        loss = DKDLoss(
            alpha=alpha,
            beta=beta,
            temperature=temperature,
            warmup_epochs=warmup_epochs,
            standardize=standardize,
        )
        super().__init__(loss, task_loss=task_loss)
        self.alpha, self.beta, self.temperature = loss.alpha, loss.beta, loss.temperature
        self.warmup_epochs, self.standardize = warmup_epochs, standardize


@register_method("dist")
class DIST(OutputMethod):
    """DIST (Huang et al. 2022): cross-entropy plus ``beta L_inter + gamma L_intra``, logged as
    ``train/dist_inter`` and ``train/dist_intra``
    (:class:`~lightning_layerkd.methods.logit_losses.DISTLoss`, whose options these are).

    Args:
        beta, gamma, temperature, standardize: see
            :class:`~lightning_layerkd.methods.logit_losses.DISTLoss`.
        task_loss: add the cross-entropy.
    """

    def __init__(
        self,
        *,
        beta: float = 2.0,
        gamma: float = 2.0,
        temperature: float = 4.0,
        standardize: bool = False,
        task_loss: bool = True,
    ) -> None:
        loss = DISTLoss(beta=beta, gamma=gamma, temperature=temperature, standardize=standardize)
        super().__init__(loss, task_loss=task_loss)
        self.beta, self.gamma, self.temperature = loss.beta, loss.gamma, loss.temperature
        self.standardize = standardize


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
