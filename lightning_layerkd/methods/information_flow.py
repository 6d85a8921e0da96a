"""Information-flow distillation (Passalis et al. 2020) as a distillation method: PKT (eq. 7)
per crucial layer pair and at the outputs, combined by eq. 9 with eq. 10's critical-period
weights. The maths are in :mod:`lightning_layerkd.functional.information_flow`."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import torch
from torch import Tensor

from lightning_layerkd._common import check_choice
from lightning_layerkd.functional.information_flow import (
    LOSS_KERNELS,
    REDUCTIONS,
    LossKernel,
    Reduction,
    critical_period_weights,
    pkt_loss,
    weighted_sum,
)
from lightning_layerkd.methods.base import (
    DistillationMethod,
    MethodOutput,
    Networks,
    register_method,
)
from lightning_layerkd.methods.features import forward_recording
from lightning_layerkd.methods.logit_losses import LogitLoss


@register_method("information_flow")
class InformationFlow(DistillationMethod):
    """PKT between the features of each crucial layer pair and between the outputs (the last
    "layer"), weighted by eq. 9; the per-layer PKT values are the divergences (one per batch,
    repeated per sample). With no crucial layers it distils the outputs alone.

    Args:
        kernel: eq. 7's ``"hybrid"`` (cosine + Student-t), ``"cosine"`` or ``"student_t"``.
        reduction: the Jeffreys divergence (eq. 8) averaged (``"mean"``) or summed over pairs.
        critical_period: ``{"alpha_init": 100, "gamma": 0.7}`` weighs the intermediate layers
            ``alpha_init * gamma^epoch`` and the output 1 (eq. 10); ``None``: all weights 1.
        auxiliary: the teacher should be an auxiliary network (the student's architecture at
            twice the width) distilled from the real teacher first (their section 3.2).
            ``layerkd-train`` builds and trains it; in the Python API, pass that network as the
            module's teacher.
        map_weight: ``lambda``, the weight of eq. 9's sum.
        task_loss, logit_weight, temperature, logit_loss: see :class:`DistillationMethod`.
    """

    divergence_name = "pkt"
    allows_no_layers = True
    supports_layer_weights = True

    def __init__(
        self,
        *,
        kernel: LossKernel = "hybrid",
        reduction: Reduction = "mean",
        critical_period: Mapping[str, float] | None = None,
        auxiliary: bool = False,
        map_weight: float = 1.0,
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
        check_choice("kernel", kernel, LOSS_KERNELS)
        check_choice("reduction", reduction, REDUCTIONS)
        if critical_period is not None:
            unknown = set(critical_period) - {"alpha_init", "gamma"}
            if unknown:
                raise ValueError(
                    "critical_period takes alpha_init and gamma (eq. 10), got "
                    f"{sorted(critical_period)}"
                )
            critical_period = {k: float(v) for k, v in critical_period.items()}
        if map_weight < 0:
            raise ValueError(f"map_weight must be non-negative, got {map_weight}")
        self.kernel = kernel
        self.reduction = reduction
        self.critical_period = critical_period
        self.auxiliary = bool(auxiliary)
        self.map_weight = float(map_weight)

    def compute(self, nets: Networks, x: Tensor, y: Tensor, *, create_graph: bool) -> MethodOutput:
        assert nets.teacher is not None and nets.teacher_hooks and nets.student_hooks
        with torch.no_grad():
            t_logits, t_feats = forward_recording(nets.teacher, nets.teacher_hooks, x)
        logits, s_feats = forward_recording(nets.student, nets.student_hooks, x)
        pkt = partial(pkt_loss, kernel=self.kernel, reduction=self.reduction)
        names = nets.layer_names
        losses = [pkt(s, t) for s, t in zip(s_feats, t_feats, strict=True)]
        weights = [1.0] * (len(names) + 1)
        if self.critical_period is not None:  # eq. 10
            weights = critical_period_weights(len(names) + 1, nets.epoch, **self.critical_period)
        for i, name in enumerate(names):  # the layer-wise rule's per-layer weights, if any
            weights[i] *= nets.layer_weights.get(name, 1.0)
        total = weighted_sum([*losses, pkt(logits, t_logits)], weights)  # eq. 9, outputs last
        divergences = {
            name: loss.expand(x.shape[0]) for name, loss in zip(names, losses, strict=True)
        }
        return MethodOutput(logits, t_logits, divergences, {"map_loss": self.map_weight * total})
