"""Decoupled KD, DIST and logit standardization (docs/design.md section 10) against loops in
plain Python floats, SciPy, and the identities their papers state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr

from lightning_layerkd.functional.divergence import logit_distillation_loss
from lightning_layerkd.functional.logit_losses import (
    decoupled_kd_terms,
    dist_loss,
    dist_terms,
    dkd_loss,
    pearson_distance,
    standardize_logits,
)

F64 = dict(rtol=1e-12, atol=1e-12)


def logits(b: int = 4, k: int = 6, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(b, k, generator=g, dtype=torch.float64)


def softmax_row(z: list[float]) -> list[float]:
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def loop_dkd(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temp: float) -> tuple[list, list]:
    """TCKD and NCKD per sample from the definitions with Python floats: b from sums of p, p_hat
    by renormalising p over the other classes (eqs. 1-3)."""
    tckd, nckd = [], []
    for zs, zt, c in zip(s.tolist(), t.tolist(), y.tolist(), strict=True):
        ps, pt = softmax_row([v / temp for v in zs]), softmax_row([v / temp for v in zt])
        bs, bt = [ps[c], 1 - ps[c]], [pt[c], 1 - pt[c]]
        hs = [v / (1 - ps[c]) for i, v in enumerate(ps) if i != c]
        ht = [v / (1 - pt[c]) for i, v in enumerate(pt) if i != c]
        tckd.append(temp**2 * kl(bt, bs))
        nckd.append(temp**2 * kl(ht, hs))
    return tckd, nckd


def loop_pearson_distance(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((u - ma) * (v - mb) for u, v in zip(a, b, strict=True))
    va = math.sqrt(sum((u - ma) ** 2 for u in a))
    vb = math.sqrt(sum((v - mb) ** 2 for v in b))
    return 1 - cov / (va * vb)


# ---------------------------------------------------------------------- standardization
def test_standardize_logits_is_the_z_score_with_the_population_std() -> None:
    z = logits()
    want = [[(v - sum(row) / len(row)) / math.sqrt(np.var(row)) for v in row] for row in z.tolist()]
    got = standardize_logits(z, eps=0.0)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), **F64)
    torch.testing.assert_close(got.mean(-1), torch.zeros(4, dtype=torch.float64), **F64)
    torch.testing.assert_close(got.pow(2).mean(-1), torch.ones(4, dtype=torch.float64), **F64)


def test_standardize_logits_invariant_to_shift_and_positive_scale_per_sample() -> None:
    z = logits()
    shift, scale = torch.tensor([[5.0], [-3.0], [0.5], [100.0]], dtype=torch.float64), 7.0
    a, b = standardize_logits(z, eps=0.0), standardize_logits(scale * z + shift, eps=0.0)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(standardize_logits(-z, eps=0.0), -a, **F64)  # sign matters


def test_standardize_constant_logits_stays_finite() -> None:
    z = torch.full((2, 5), 3.0, dtype=torch.float64, requires_grad=True)
    out = standardize_logits(z)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out))
    assert z.grad is not None and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_standardized_kd_is_kd_on_z_scored_logits_and_ignores_their_scale(
    temperature: float,
) -> None:
    s, t = logits(seed=1), logits(seed=2, scale=8.0)
    z_s, z_t = standardize_logits(s), standardize_logits(t)
    want = [
        temperature**2
        * kl(softmax_row([v / temperature for v in b]), softmax_row([v / temperature for v in a]))
        for a, b in zip(z_s.tolist(), z_t.tolist(), strict=True)
    ]
    got = logit_distillation_loss(s, t, temperature, reduction="none", standardize=True)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), **F64)
    shifted = logit_distillation_loss(
        0.3 * s - 2.0, 5.0 * t + 1.0, temperature, reduction="none", standardize=True
    )
    # exact but for STD_EPS = 1e-7 added to a std of about 1-25: relative changes below 1e-6
    torch.testing.assert_close(shifted, got, rtol=1e-6, atol=1e-12)
    plain = logit_distillation_loss(0.3 * s, t, temperature, reduction="none")
    assert not torch.allclose(plain, logit_distillation_loss(s, t, temperature, reduction="none"))


def test_standardize_refuses_multilabel() -> None:
    with pytest.raises(ValueError, match="standardize=True needs task='multiclass'"):
        logit_distillation_loss(logits(), logits(seed=1), task="multilabel", standardize=True)


# ---------------------------------------------------------------------- decoupled KD
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_decoupled_kd_terms_match_loops(temperature: float) -> None:
    s, t, y = logits(seed=3), logits(seed=4), torch.tensor([0, 5, 2, 2])
    tckd, nckd = decoupled_kd_terms(s, t, y, temperature, reduction="none")
    want_t, want_n = loop_dkd(s, t, y, temperature)
    torch.testing.assert_close(tckd, torch.tensor(want_t, dtype=torch.float64), **F64)
    torch.testing.assert_close(nckd, torch.tensor(want_n, dtype=torch.float64), **F64)
    mean_t, mean_n = decoupled_kd_terms(s, t, y, temperature)
    assert mean_t.item() == pytest.approx(sum(want_t) / 4, rel=1e-12)
    assert mean_n.item() == pytest.approx(sum(want_n) / 4, rel=1e-12)
    got = dkd_loss(s, t, y, alpha=0.5, beta=3.0, temperature=temperature)
    assert got.item() == pytest.approx((0.5 * sum(want_t) + 3.0 * sum(want_n)) / 4, rel=1e-12)


@pytest.mark.parametrize("standardize", [False, True])
def test_kd_decomposes_into_tckd_plus_weighted_nckd(standardize: bool) -> None:
    """Zhao et al. eq. 7: KD = TCKD + (1 - p_t^T) NCKD, per sample."""
    s, t, y = logits(b=8, k=10, seed=5), logits(b=8, k=10, seed=6), torch.arange(8) % 10
    temperature = 3.0
    kd = logit_distillation_loss(s, t, temperature, reduction="none", standardize=standardize)
    tckd, nckd = decoupled_kd_terms(s, t, y, temperature, standardize=standardize, reduction="none")
    z_t = standardize_logits(t) if standardize else t
    p_t = torch.softmax(z_t / temperature, -1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(kd, tckd + (1 - p_t) * nckd, **F64)
    assert (tckd > 0).all() and (nckd > 0).all()


def test_decoupled_kd_is_zero_for_equal_logits_and_invariant_to_shifts() -> None:
    s, y = logits(seed=7), torch.tensor([1, 1, 3, 0])
    tckd, nckd = decoupled_kd_terms(s, s.clone(), y, reduction="none")
    torch.testing.assert_close(tckd, torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(nckd, torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-12)
    t = logits(seed=8)
    base = torch.stack(decoupled_kd_terms(s, t, y, reduction="none"))
    moved = torch.stack(decoupled_kd_terms(s + 4.0, t - 9.0, y, reduction="none"))
    torch.testing.assert_close(moved, base, rtol=1e-10, atol=1e-12)


def test_decoupled_kd_gradients_reach_the_student_only() -> None:
    s = logits(seed=9).requires_grad_(True)
    t = logits(seed=10).requires_grad_(True)
    y = torch.tensor([2, 0, 1, 5])
    dkd_loss(s, t, y).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0
    torch.autograd.gradcheck(
        lambda a: torch.stack(decoupled_kd_terms(a, t.detach(), y, 2.0, standardize=True)),
        (logits(seed=11).requires_grad_(True),),
    )


def test_decoupled_kd_refuses_bad_input() -> None:
    s, t = logits(), logits(seed=1)
    with pytest.raises(ValueError, match="temperature must be positive"):
        decoupled_kd_terms(s, t, torch.zeros(4, dtype=torch.long), 0.0)
    with pytest.raises(ValueError, match="one class index per sample"):
        decoupled_kd_terms(s, t, torch.zeros(4, 6))
    with pytest.raises(ValueError, match="same shape"):
        decoupled_kd_terms(s, t[:, :5], torch.zeros(4, dtype=torch.long))


# ---------------------------------------------------------------------- DIST
def test_pearson_distance_matches_scipy_and_is_affine_invariant() -> None:
    a, b = logits(seed=12), logits(seed=13)
    want = [1 - pearsonr(u, v).statistic for u, v in zip(a.numpy(), b.numpy(), strict=True)]
    got = pearson_distance(a, b, dim=1)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), **F64)
    torch.testing.assert_close(pearson_distance(3.0 * a + 2.0, 0.1 * b - 5.0, dim=1), got, **F64)
    torch.testing.assert_close(pearson_distance(-a, b, dim=1), 2 - got, **F64)  # m < 0 flips


@pytest.mark.parametrize("standardize", [False, True])
def test_dist_terms_match_loops(standardize: bool) -> None:
    s, t, temperature = logits(seed=14), logits(seed=15), 4.0
    z_s = standardize_logits(s) if standardize else s
    z_t = standardize_logits(t) if standardize else t
    y_s = [softmax_row([v / temperature for v in row]) for row in z_s.tolist()]
    y_t = [softmax_row([v / temperature for v in row]) for row in z_t.tolist()]
    inter = sum(loop_pearson_distance(a, b) for a, b in zip(y_s, y_t, strict=True)) / 4
    cols = range(6)
    intra = sum(loop_pearson_distance([r[j] for r in y_s], [r[j] for r in y_t]) for j in cols) / 6
    got_inter, got_intra = dist_terms(s, t, temperature, standardize=standardize)
    assert got_inter.item() == pytest.approx(temperature**2 * inter, rel=1e-11)
    assert got_intra.item() == pytest.approx(temperature**2 * intra, rel=1e-11)
    got = dist_loss(s, t, beta=0.5, gamma=3.0, temperature=temperature, standardize=standardize)
    want = temperature**2 * (0.5 * inter + 3.0 * intra)
    assert got.item() == pytest.approx(want, rel=1e-11)


def test_dist_invariant_to_shifts_and_with_standardization_to_scales() -> None:
    """Shifts leave the softmax alone; only standardized logits ignore a positive scale too
    (the Pearson distance itself is invariant to positive affine maps of the predictions)."""
    s, t = logits(seed=16), logits(seed=17)
    shift = torch.tensor([[1.0], [-4.0], [2.5], [0.0]], dtype=torch.float64)
    base = torch.stack(dist_terms(s, t))
    torch.testing.assert_close(torch.stack(dist_terms(s + shift, t - 2 * shift)), base, **F64)
    assert not torch.allclose(torch.stack(dist_terms(2.0 * s, t)), base)
    ls = torch.stack(dist_terms(s, t, standardize=True))
    scaled = torch.stack(dist_terms(2.0 * s + shift, 0.5 * t, standardize=True))
    torch.testing.assert_close(scaled, ls, rtol=1e-6, atol=1e-12)  # STD_EPS, as above


def test_dist_is_zero_for_equal_logits_and_its_gradient_reaches_the_student_only() -> None:
    s = logits(seed=18)
    zero = torch.stack(dist_terms(s, s.clone()))
    torch.testing.assert_close(zero, torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-12)
    s.requires_grad_(True)
    t = logits(seed=19).requires_grad_(True)
    dist_loss(s, t).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_dist_with_one_sample_is_finite() -> None:
    """A batch of one has no intra-class correlation: intra is T^2 (rho = 0), not NaN."""
    s = logits(b=1, seed=20).requires_grad_(True)
    inter, intra = dist_terms(s, logits(b=1, seed=21), 2.0)
    assert intra.item() == pytest.approx(4.0, rel=1e-12)
    (inter + intra).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_dist_refuses_a_non_positive_temperature() -> None:
    with pytest.raises(ValueError, match="temperature must be positive, got -1"):
        dist_terms(logits(), logits(seed=1), -1.0)
