"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017) as a distillation method; the maths
are in :mod:`lightning_layerkd.functional.attention_transfer`."""

from __future__ import annotations

from torch import Tensor

from lightning_layerkd.functional.attention_transfer import attention_transfer_divergence
from lightning_layerkd.methods.base import Networks, register_method
from lightning_layerkd.methods.features import FeatureMethod
from lightning_layerkd.methods.logit_losses import LogitLoss


@register_method("attention_transfer")
class AttentionTransfer(FeatureMethod):
    """Attention transfer: ``CE + beta/2 * sum_j w_j mean_i || Q_S/||Q_S|| - Q_T/||Q_T|| ||^2 /
    (H_j W_j)`` with ``Q = vec(sum_c |A_c|^p)`` (Zagoruyko & Komodakis eq. 2, ``p = 2``, their
    ``beta = 1000``); the per-layer per-sample distances are the divergences. Unlike
    ``"attention"`` (Kokane et al.: the same maps compared by the JSD), the maps are
    L2-normalised and compared by the squared distance. Channel counts may differ; a larger
    map is average-pooled to the smaller size.

    Args:
        beta: the weight ``beta`` of eq. 2 (the loss is ``beta / 2`` times the sum).
        p: the exponent of ``sum_c |A_c|^p``.
        task_loss, logit_weight, temperature, logit_loss: see :class:`DistillationMethod`.
    """

    divergence_name = "at"
    loss_name = "at_loss"

    def __init__(
        self,
        *,
        beta: float = 1000.0,
        p: float = 2.0,
        task_loss: bool = True,
        logit_weight: float = 0.0,
        temperature: float = 4.0,
        logit_loss: LogitLoss | None = None,
    ) -> None:
        if not beta >= 0:
            raise ValueError(f"beta must be non-negative (eq. 2's weight, e.g. 1000), got {beta}")
        if not p > 0:
            raise ValueError(f"p must be positive (the exponent of sum_c |A_c|^p, e.g. 2), got {p}")
        super().__init__(
            feature_weight=beta / 2,
            task_loss=task_loss,
            logit_weight=logit_weight,
            temperature=temperature,
            logit_loss=logit_loss,
        )
        self.beta = float(beta)
        self.p = float(p)

    def pair_divergence(
        self, index: int, layer: str, student: Tensor, teacher: Tensor, nets: Networks
    ) -> Tensor:
        return attention_transfer_divergence(student, teacher, self.p, layer)
