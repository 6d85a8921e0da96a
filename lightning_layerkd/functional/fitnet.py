"""FitNets (Romero et al., ICLR 2015): the hint loss between a teacher's hint layer and a
regression of the student's guided layer (their eq. 3), and the size rule of their
convolutional regressor.

``L_HT = 1/2 || u_h(x) - r(v_g(x)) ||^2`` (eq. 3), where ``u_h`` is the teacher's hint, ``v_g``
the student's guided layer and ``r`` a learnt regressor whose output has the hint's shape. Here
the squared distance is averaged over the hint's entries (``C H W``), so layers of different
sizes weigh alike (docs/design.md section 11).
"""

from __future__ import annotations

from torch import Tensor


def hint_loss(regressed: Tensor, hint: Tensor) -> Tensor:
    """Per sample, ``1/2 || r(v_g(x)) - u_h(x) ||^2 / (C H W)`` (Romero et al. eq. 3 per
    entry of the hint).

    Args:
        regressed: the regressor's output ``r(v_g(x))``, the hint's shape ``(B, ...)``.
        hint: the teacher's hint ``u_h(x)`` (a constant).

    Returns:
        ``(B,)`` non-negative losses.
    """
    if regressed.shape != hint.shape:
        raise ValueError(
            f"the regressed student feature has shape {tuple(regressed.shape)} but the hint "
            f"{tuple(hint.shape)}; the regressor must output the hint's shape"
        )
    return 0.5 * (regressed - hint).square().flatten(1).mean(dim=1)


def hint_size(student_size: tuple[int, int], teacher_size: tuple[int, int]) -> tuple[int, int]:
    """The spatial size the hint is compared at: the smaller of the two per dimension (a larger
    teacher map is average-pooled to it, a larger student map shrunk by the regressor)."""
    return (min(student_size[0], teacher_size[0]), min(student_size[1], teacher_size[1]))


def regressor_kernel(student_size: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """The kernel of Romero et al.'s convolutional regressor (section 2.2): ``k = N_g - N_h + 1``
    per spatial dimension, so an unpadded convolution maps the guided layer's ``N_g`` to the
    hint's ``N_h`` (``1 x 1`` when the sizes agree); ``size`` from :func:`hint_size`."""
    if any(s < h for s, h in zip(student_size, size, strict=True)):
        raise ValueError(f"the student's size {student_size} is smaller than the hint's {size}")
    return (student_size[0] - size[0] + 1, student_size[1] - size[1] + 1)
