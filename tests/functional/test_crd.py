"""CRD's NCE critic (Tian et al. 2020, eqs. 18-19) and memory-bank update, by hand in float64
on a tiny case."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_layerkd.functional.crd import crd_loss, crd_loss_from_logits, momentum_update


def unit(rows: list[list[float]]) -> torch.Tensor:
    t = torch.tensor(rows, dtype=torch.float64)
    return t / t.norm(dim=-1, keepdim=True)


def test_nce_loss_by_hand_on_a_tiny_case():
    s = unit([[1.0, 0.0], [0.6, 0.8]])
    t = unit([[0.8, 0.6], [0.0, 1.0]])
    negatives = torch.stack([unit([[0.0, 1.0], [-1.0, 0.0]]), unit([[1.0, 1.0], [1.0, -1.0]])])
    tau, m = 0.5, 4  # N / M = 2 / 4
    want = []
    for i in range(2):
        e = math.exp(float(s[i] @ t[i]) / tau)
        h = e / (e + 2 / 4)
        loss = -math.log(h)
        for k in range(2):
            e_k = math.exp(float(s[i] @ negatives[i, k]) / tau)
            loss -= math.log(1 - e_k / (e_k + 2 / 4))
        want.append(loss)
    got = crd_loss(s, t, negatives, tau, m)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-13)
    # sample 0 by numbers: s.t = 0.8, negatives 0 and -1: e = e^1.6, e^0, e^-2
    h = math.exp(1.6) / (math.exp(1.6) + 0.5)
    n0, n1 = 1 / (1 + 0.5), math.exp(-2) / (math.exp(-2) + 0.5)
    assert got[0].item() == pytest.approx(
        -math.log(h) - math.log(1 - n0) - math.log(1 - n1), rel=1e-13
    )


def test_the_logit_form_does_not_overflow_at_a_small_temperature():
    z_pos = torch.tensor([1.0 / 0.001], dtype=torch.float64)  # exp(1000) overflows
    z_neg = torch.tensor([[-1.0 / 0.001, 1.0 / 0.001]], dtype=torch.float64)
    got = crd_loss_from_logits(z_pos, z_neg, num_samples=8)
    # h_pos -> 1, h of the far negative -> 0, h of the matching negative -> 1: -log(1 - h) =
    # z - log(N / M) = 1000 - log(1 / 4) up to exp(-1000)
    assert got.item() == pytest.approx(1000 + math.log(4), rel=1e-12)


def test_gradient_reaches_the_student_embedding():
    s = unit([[1.0, 2.0], [3.0, -1.0]]).requires_grad_()
    t = unit([[0.5, 0.5], [1.0, 0.0]])
    negatives = unit([[1.0, 0.0], [0.0, 1.0]]).expand(2, 2, 2)
    assert torch.autograd.gradcheck(lambda a: crd_loss(a, t, negatives, 0.3, 10), (s,))


def test_momentum_update_by_hand():
    bank = unit([[1.0, 0.0], [0.0, 1.0]])
    new = unit([[0.0, 1.0], [0.0, 1.0]])
    got = momentum_update(bank, new, momentum=0.5)
    r = 1 / math.sqrt(2)
    np.testing.assert_allclose(got.numpy(), [[r, r], [0.0, 1.0]], rtol=1e-15, atol=1e-15)
    with pytest.raises(ValueError, match="momentum must lie in"):
        momentum_update(bank, new, momentum=1.0)


def test_bad_arguments_are_refused_by_name():
    s = unit([[1.0, 0.0]])
    with pytest.raises(ValueError, match="tau must be positive"):
        crd_loss(s, s, s[None], 0.0, 4)
    with pytest.raises(ValueError, match="num_samples must be at least 1"):
        crd_loss(s, s, s[None], 0.1, 0)
