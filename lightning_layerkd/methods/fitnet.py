"""FitNets (Romero et al., ICLR 2015) as a distillation method: a learnt convolutional
regressor per crucial layer pair maps the student's guided layer onto the teacher's hint
(eq. 3). The maths are in :mod:`lightning_layerkd.functional.fitnet`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_layerkd.functional.fitnet import hint_loss, hint_size, regressor_kernel
from lightning_layerkd.functional.maps import feature_grid
from lightning_layerkd.methods.base import LearntParts, Networks, register_method
from lightning_layerkd.methods.features import FeatureMethod
from lightning_layerkd.methods.logit_losses import LogitLoss


class HintRegressor(nn.Module):
    """Romero et al.'s regressor ``r``: an unpadded convolution from the student's channels to
    the teacher's, its kernel ``N_g - N_h + 1`` (:func:`regressor_kernel`), followed by the
    hint's nonlinearity (ReLU: a ResNet stage's output is rectified) when ``relu``."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: tuple[int, int], relu: bool = True
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, bias=True)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return F.relu(out) if self.relu else out


def _grid_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """``(C, H, W)`` of a layer's per-sample output (tokens read on their grid)."""
    c, h, w = feature_grid(torch.empty((1, *shape), device="meta")).shape[1:]
    return int(c), int(h), int(w)


@register_method("fitnet")
class FitNet(FeatureMethod):
    """FitNet hints on every crucial layer pair: ``CE + hint_weight * sum_j w_j mean_i 1/2
    || r_j(F_j^S) - F_j^T ||^2 / (C H W)`` (Romero et al. eq. 3, trained jointly with the
    task loss rather than in their separate first stage); the per-layer per-sample hint losses
    are the divergences. Regressor ``r_j`` is learnt with the student, in layer ``j``'s param
    group, and saved in checkpoints. A teacher map larger than the student's is average-pooled
    to the student's size; a larger student map is shrunk by the regressor's kernel.

    Args:
        hint_weight: the weight of the summed hint losses.
        relu: end each regressor with a ReLU, the hint's nonlinearity (Romero et al. 2.2).
        task_loss, logit_weight, temperature, logit_loss: see :class:`DistillationMethod`.
    """

    divergence_name = "hint"
    loss_name = "hint_loss"
    has_parts = True

    def __init__(
        self,
        *,
        hint_weight: float = 100.0,
        relu: bool = True,
        task_loss: bool = True,
        logit_weight: float = 0.0,
        temperature: float = 4.0,
        logit_loss: LogitLoss | None = None,
    ) -> None:
        if not hint_weight >= 0:
            raise ValueError(f"hint_weight must be non-negative (e.g. 100), got {hint_weight}")
        super().__init__(
            feature_weight=hint_weight,
            task_loss=task_loss,
            logit_weight=logit_weight,
            temperature=temperature,
            logit_loss=logit_loss,
        )
        self.hint_weight = float(hint_weight)
        self.relu = bool(relu)

    def build_parts(
        self,
        student_shapes: Sequence[tuple[int, ...]],
        teacher_shapes: Sequence[tuple[int, ...]],
        num_samples: int | None = None,
    ) -> LearntParts:
        """One :class:`HintRegressor` per crucial layer pair."""
        regressors = []
        for s_shape, t_shape in zip(student_shapes, teacher_shapes, strict=True):
            c_s, *s_size = _grid_shape(s_shape)
            c_t, *t_size = _grid_shape(t_shape)
            size = hint_size((s_size[0], s_size[1]), (t_size[0], t_size[1]))
            kernel = regressor_kernel((s_size[0], s_size[1]), size)
            regressors.append(HintRegressor(c_s, c_t, kernel, self.relu))
        return LearntParts(regressors)

    def pair_divergence(
        self, index: int, layer: str, student: Tensor, teacher: Tensor, nets: Networks
    ) -> Tensor:
        if nets.parts is None:
            raise RuntimeError("FitNet's regressors are not built: the module builds them")
        regressed = nets.parts.per_layer[index](feature_grid(student, layer))
        hint = feature_grid(teacher, layer)
        if hint.shape[2:] != regressed.shape[2:]:
            hint = F.adaptive_avg_pool2d(hint, regressed.shape[2:])
        return hint_loss(regressed, hint.to(regressed.dtype))
