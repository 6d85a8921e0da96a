"""What feature methods share: one recorded forward pass per network, and a base class for
methods that compare the crucial layers' features pair by pair (FitNet, attention transfer),
each pair giving a per-sample divergence that the layer-wise rule reads."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_layerkd.layers.hooks import FeatureHooks
from lightning_layerkd.methods.base import DistillationMethod, MethodOutput, Networks
from lightning_layerkd.methods.logit_losses import LogitLoss


def forward_recording(
    model: nn.Module, hooks: FeatureHooks, x: Tensor
) -> tuple[Tensor, list[Tensor]]:
    """Logits and the hooked layers' outputs of one forward pass."""
    with hooks.record() as recording:
        logits = model(x)
        return logits, hooks.outputs(recording)


class FeatureMethod(DistillationMethod):
    """A method whose loss is ``feature_weight * sum_j w_j mean_i d_ij`` over the crucial layer
    pairs ``j``, with a per-sample divergence ``d_ij`` between the student's and the teacher's
    features (:meth:`pair_divergence`); ``w_j`` are the layer-wise rule's weights (1 unless
    ``LayerwiseLRCallback(target="map_weight")`` sets them).

    Args:
        feature_weight: the weight of the summed layer terms (``beta`` of the method's paper).
        task_loss, logit_weight, temperature, logit_loss: see :class:`DistillationMethod`.
    """

    supports_layer_weights = True
    #: the name of the loss term, logged as ``train/<loss_name>``
    loss_name = "feature_loss"

    def __init__(
        self,
        *,
        feature_weight: float = 1.0,
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
        if not feature_weight >= 0:
            raise ValueError(f"feature_weight must be non-negative, got {feature_weight}")
        self.feature_weight = float(feature_weight)

    def pair_divergence(
        self, index: int, layer: str, student: Tensor, teacher: Tensor, nets: Networks
    ) -> Tensor:
        """The ``(B,)`` divergence of crucial layer pair ``index`` (named ``layer``) between the
        student's features (in the graph) and the teacher's (constants)."""
        raise NotImplementedError(f"{type(self).__name__} must implement pair_divergence()")

    def pair_divergences(
        self, student: list[Tensor], teacher: list[Tensor], nets: Networks
    ) -> list[Tensor]:
        """Every pair's ``(B,)`` divergence, in the layers' order: :meth:`pair_divergence` pair
        by pair unless a method relates the pairs (ReviewKD's fusion)."""
        pairs = zip(nets.layer_names, student, teacher, strict=True)
        return [self.pair_divergence(j, name, s, t, nets) for j, (name, s, t) in enumerate(pairs)]

    def compute(self, nets: Networks, x: Tensor, y: Tensor, *, create_graph: bool) -> MethodOutput:
        assert nets.teacher is not None and nets.teacher_hooks and nets.student_hooks
        with torch.no_grad():
            t_logits, t_feats = forward_recording(nets.teacher, nets.teacher_hooks, x)
        logits, s_feats = forward_recording(nets.student, nets.student_hooks, x)
        divergences: dict[str, Tensor] = {}
        loss = x.new_zeros((), dtype=torch.float32)
        found = self.pair_divergences(s_feats, t_feats, nets)
        for name, d in zip(nets.layer_names, found, strict=True):
            divergences[name] = d
            loss = loss + nets.layer_weights.get(name, 1.0) * d.mean()
        return MethodOutput(
            logits, t_logits, divergences, {self.loss_name: self.feature_weight * loss}
        )
