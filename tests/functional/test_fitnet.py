"""FitNets' hint loss (Romero et al. 2015, eq. 3) and the size rule of its regressor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_layerkd.functional.fitnet import hint_loss, hint_size, regressor_kernel


def test_hint_loss_is_half_the_squared_distance_per_entry():
    g = torch.Generator().manual_seed(0)
    r, h = (
        torch.randn(3, 4, 2, 5, generator=g, dtype=torch.float64),
        torch.randn(3, 4, 2, 5, generator=g, dtype=torch.float64),
    )
    want = [
        0.5
        * sum(
            float(r[i, c, a, b] - h[i, c, a, b]) ** 2
            for c in range(4)
            for a in range(2)
            for b in range(5)
        )
        / 40
        for i in range(3)
    ]
    got = hint_loss(r, h)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-13)


def test_hint_loss_refuses_shapes_that_differ():
    with pytest.raises(ValueError, match="regressor must output the hint's shape"):
        hint_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 4, 4))


@pytest.mark.parametrize(
    ("student", "teacher", "size", "kernel"),
    [
        ((8, 8), (8, 8), (8, 8), (1, 1)),
        ((8, 8), (4, 4), (4, 4), (5, 5)),  # Romero et al.: k = N_g - N_h + 1
        ((4, 4), (8, 8), (4, 4), (1, 1)),  # a larger hint is pooled to the student's size
        ((6, 3), (4, 5), (4, 3), (3, 1)),
    ],
)
def test_the_regressor_kernel_maps_the_student_size_to_the_hint_size(
    student, teacher, size, kernel
):
    assert hint_size(student, teacher) == size
    assert regressor_kernel(student, size) == kernel
    conv = torch.nn.Conv2d(1, 1, kernel)
    assert conv(torch.zeros(1, 1, *student)).shape[2:] == size
