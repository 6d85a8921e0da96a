"""Knowledge review (Chen et al., CVPR 2021) as a distillation method: attention-based fusion
(ABF) of the student's crucial layers from the deepest to the shallowest, each fused feature
compared with the teacher's layer by the hierarchical context loss (HCL). The loss is in
:mod:`lightning_layerkd.functional.review`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_layerkd.functional.maps import feature_grid
from lightning_layerkd.functional.review import hierarchical_context_loss
from lightning_layerkd.methods.base import LearntParts, Networks, register_method
from lightning_layerkd.methods.features import FeatureMethod
from lightning_layerkd.methods.logit_losses import LogitLoss


class AttentionFusion(nn.Module):
    """ABF (Chen et al. section 3.2, Fig. 3a): the student's feature of one layer, reduced to
    ``mid`` channels, fused with the fused feature of the next deeper layer (resized to this
    layer's size) by two attention maps computed from both (a 1x1 convolution and a sigmoid),
    then a 3x3 convolution to the teacher's channels. Returns that output and the fused
    ``mid``-channel feature, which the next shallower layer fuses in. The deepest layer
    (``fuse=False``) has nothing to fuse."""

    def __init__(self, in_channels: int, mid: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid, 1, bias=False), nn.BatchNorm2d(mid))
        self.attention = nn.Conv2d(2 * mid, 2, 1) if fuse else None
        self.output = nn.Sequential(
            nn.Conv2d(mid, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )

    def forward(self, x: Tensor, deeper: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = self.reduce(x)
        if self.attention is not None:
            if deeper is None:
                raise ValueError("this fusion layer needs the deeper layer's fused feature")
            deeper = F.interpolate(deeper, size=x.shape[2:], mode="nearest")
            z = torch.sigmoid(self.attention(torch.cat([x, deeper], dim=1)))
            x = x * z[:, :1] + deeper * z[:, 1:]
        return self.output(x), x


@register_method("review_kd")
class ReviewKD(FeatureMethod):
    """Knowledge review: ``CE + review_weight * sum_j w_j mean_i HCL(ABF_j, F_j^T)`` (Chen et
    al. eq. 6 with their ABF and HCL), the fusion running from the deepest crucial layer to
    the shallowest; the per-layer per-sample HCL values are the divergences. Student and
    teacher layers may differ in channels (the fusion outputs the teacher's) and in size (the
    larger of the fused output and the teacher's map is average-pooled to the smaller). The
    fusion modules learn in their layer's param group and are saved in checkpoints.

    Args:
        review_weight: the weight of the summed HCL terms (1 in their CIFAR experiments).
        mid_channels: the channels of the fused features.
        task_loss, logit_weight, temperature, logit_loss: see :class:`DistillationMethod`.
    """

    divergence_name = "hcl"
    loss_name = "review_loss"
    has_parts = True

    def __init__(
        self,
        *,
        review_weight: float = 1.0,
        mid_channels: int = 64,
        task_loss: bool = True,
        logit_weight: float = 0.0,
        temperature: float = 4.0,
        logit_loss: LogitLoss | None = None,
    ) -> None:
        if not review_weight >= 0:
            raise ValueError(f"review_weight must be non-negative (e.g. 1), got {review_weight}")
        if isinstance(mid_channels, bool) or not isinstance(mid_channels, int) or mid_channels < 1:
            raise ValueError(
                f"mid_channels must be a positive integer (e.g. 64), got {mid_channels!r}"
            )
        super().__init__(
            feature_weight=review_weight,
            task_loss=task_loss,
            logit_weight=logit_weight,
            temperature=temperature,
            logit_loss=logit_loss,
        )
        self.review_weight = float(review_weight)
        self.mid_channels = mid_channels

    def build_parts(
        self,
        student_shapes: Sequence[tuple[int, ...]],
        teacher_shapes: Sequence[tuple[int, ...]],
        num_samples: int | None = None,
    ) -> LearntParts:
        """One :class:`AttentionFusion` per crucial layer pair; the deepest fuses nothing."""
        last = len(student_shapes) - 1
        fusions = []
        for j, (s, t) in enumerate(zip(student_shapes, teacher_shapes, strict=True)):
            c_s = feature_grid(torch.empty((1, *s), device="meta")).shape[1]
            c_t = feature_grid(torch.empty((1, *t), device="meta")).shape[1]
            fusions.append(AttentionFusion(c_s, self.mid_channels, c_t, fuse=j < last))
        return LearntParts(fusions)

    def fused_outputs(self, student: list[Tensor], nets: Networks) -> list[Tensor]:
        """The fusion's output for every crucial layer, in the layers' order."""
        if nets.parts is None:
            raise RuntimeError("ReviewKD's fusion is not built: the module builds it")
        outputs: list[Tensor] = [student[0]] * len(student)
        deeper: Tensor | None = None
        for j in reversed(range(len(student))):
            fusion = nets.parts.per_layer[j]
            outputs[j], deeper = fusion(feature_grid(student[j], nets.layer_names[j]), deeper)
        return outputs

    def pair_divergences(
        self, student: list[Tensor], teacher: list[Tensor], nets: Networks
    ) -> list[Tensor]:
        divergences = []
        for out, t, name in zip(
            self.fused_outputs(student, nets), teacher, nets.layer_names, strict=True
        ):
            t = feature_grid(t, name).to(out.dtype)
            size = (min(out.shape[2], t.shape[2]), min(out.shape[3], t.shape[3]))
            if out.shape[2:] != size:
                out = F.adaptive_avg_pool2d(out, size)
            if t.shape[2:] != size:
                t = F.adaptive_avg_pool2d(t, size)
            divergences.append(hierarchical_context_loss(out, t))
        return divergences
