"""Jensen-Shannon and KL divergence (docs/design.md section 4) against SciPy and by their
properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy

from lightning_layerkd.functional.divergence import (
    LN2,
    js_divergence,
    kl_divergence,
    map_js_divergences,
)
from lightning_layerkd.functional.maps import to_distribution


def simplex(*shape: int, dim: int = -1, seed: int = 0, alpha: float = 1.0) -> torch.Tensor:
    """Dirichlet(alpha) draws in float64, normalised along ``dim`` (small alpha: peaked)."""
    x = torch.from_numpy(np.random.default_rng(seed).gamma(alpha, size=shape))
    return x / x.sum(dim, keepdim=True)


def sparse_simplex(*shape: int, seed: int = 0, zero_frac: float = 0.6) -> torch.Tensor:
    """Distributions on the last dim with many exact zeros (each row keeps at least one mass)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    x = torch.where(torch.rand(shape, generator=g, dtype=torch.float64) < zero_frac, 0.0, x)
    x[..., 0] += 0.1
    return x / x.sum(-1, keepdim=True)


def scipy_jsd(p: torch.Tensor, q: torch.Tensor, axis: int = -1) -> np.ndarray:
    """Reference JSD: SciPy's Jensen-Shannon *distance* squared, natural log (base e)."""
    return jensenshannon(p.numpy(), q.numpy(), axis=axis) ** 2


@pytest.mark.parametrize("shape", [(7,), (5, 10), (3, 4, 16), (2, 1000)])
def test_js_matches_scipy_on_random_distributions(shape: tuple[int, ...]) -> None:
    p, q = simplex(*shape, seed=1), simplex(*shape, seed=2, alpha=0.3)
    got = js_divergence(p, q)
    assert got.shape == shape[:-1]
    np.testing.assert_allclose(got.numpy(), scipy_jsd(p, q), rtol=0, atol=1e-6)
    assert float(got.min()) > 1e-3  # not trivially zero: the comparison has teeth


def test_js_along_dim0_matches_scipy() -> None:
    p, q = simplex(9, 4, dim=0, seed=3), simplex(9, 4, dim=0, seed=4)
    got = js_divergence(p, q, dim=0)
    assert got.shape == (4,)
    np.testing.assert_allclose(got.numpy(), scipy_jsd(p, q, axis=0), rtol=0, atol=1e-6)
    torch.testing.assert_close(got, js_divergence(p.T, q.T), rtol=0, atol=1e-15)
    assert float(got.min()) > 1e-3


def test_js_matches_scipy_with_exact_zeros() -> None:
    p, q = sparse_simplex(6, 20, seed=5), sparse_simplex(6, 20, seed=6)
    assert (p == 0).float().mean() > 0.3 and (q == 0).float().mean() > 0.3
    got = js_divergence(p, q)
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), scipy_jsd(p, q), rtol=0, atol=1e-6)


def test_js_of_disjoint_supports_is_ln2() -> None:
    p = torch.tensor([[0.2, 0.8, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.1, 0.3, 0.6]], dtype=torch.float64)
    got = js_divergence(p, q)
    np.testing.assert_allclose(got.numpy(), [LN2, LN2], rtol=0, atol=1e-12)
    np.testing.assert_allclose(scipy_jsd(p, q), [LN2, LN2], rtol=0, atol=1e-12)


def test_js_symmetric_and_zero_on_equal() -> None:
    p, q = simplex(8, 12, seed=7), simplex(8, 12, seed=8)
    torch.testing.assert_close(js_divergence(p, q), js_divergence(q, p), rtol=0, atol=1e-15)
    zero = torch.zeros(8, dtype=torch.float64)
    torch.testing.assert_close(js_divergence(p, p), zero, rtol=0, atol=1e-15)
    s = sparse_simplex(8, 12, seed=9)
    torch.testing.assert_close(js_divergence(s, s), zero, rtol=0, atol=1e-15)


def test_js_bounded_by_ln2_on_many_draws() -> None:
    # peaked Dirichlet draws and sparse rows push some divergences close to the bound
    pairs = [
        (simplex(500, 6, seed=s, alpha=0.05), simplex(500, 6, seed=s + 9, alpha=0.05))
        for s in range(4)
    ]
    pairs.append(
        (
            sparse_simplex(500, 6, seed=10, zero_frac=0.8),
            sparse_simplex(500, 6, seed=11, zero_frac=0.8),
        )
    )
    d = torch.cat([js_divergence(p, q) for p, q in pairs])
    assert float(d.min()) >= 0.0
    assert float(d.max()) <= LN2 + 1e-12
    assert float(d.max()) > 0.99 * LN2  # the draws do reach near the bound


def test_js_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError) as info:
        js_divergence(torch.rand(2, 3), torch.rand(3, 2))
    assert "(2, 3)" in str(info.value) and "(3, 2)" in str(info.value)


def test_js_gradient_finite_with_zeros_and_exact_elsewhere() -> None:
    p = torch.tensor([[0.0, 0.3, 0.7, 0.0], [0.5, 0.5, 0.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.4, 0.0, 0.6, 0.0], [0.0, 0.25, 0.25, 0.5]], dtype=torch.float64)
    p.requires_grad_(True)
    q.requires_grad_(True)
    js_divergence(p, q).sum().backward()
    assert torch.isfinite(p.grad).all() and torch.isfinite(q.grad).all()
    # where both are positive, d JSD / d p_i = log(p_i / m_i) / 2 (the other terms cancel)
    both = (p > 0) & (q > 0)
    m = (p + q).detach() / 2
    expected = 0.5 * torch.log(p.detach() / m)
    torch.testing.assert_close(p.grad[both], expected[both], rtol=0, atol=1e-12)


def test_js_gradcheck_on_positive_inputs() -> None:
    p = simplex(3, 5, seed=12).requires_grad_(True)
    q = simplex(3, 5, seed=13).requires_grad_(True)
    assert torch.autograd.gradcheck(js_divergence, (p, q))
    assert torch.autograd.gradcheck(lambda a, b: js_divergence(a, b, dim=0), (p, q))


@pytest.mark.parametrize("sparse", [False, True])
def test_kl_matches_scipy_entropy(sparse: bool) -> None:
    p = sparse_simplex(4, 9, seed=14) if sparse else simplex(4, 9, seed=14)
    q = simplex(4, 9, seed=15)  # positive wherever p is
    got = kl_divergence(p, q)
    np.testing.assert_allclose(got.numpy(), entropy(p.numpy(), q.numpy(), axis=-1), atol=1e-10)
    assert float(got.min()) > 1e-3


def test_nearly_equal_maps_never_go_negative_in_float32() -> None:
    """The textbook form of eqs. 9-10 leaves about a third of nearly equal
    float32 pairs below 0; this form keeps every value >= 0 and within 1e-3 of SciPy (float64)."""
    generator = torch.Generator().manual_seed(0)
    p = torch.rand(1000, 64, generator=generator)
    p = p / p.sum(1, keepdim=True)
    q = p * (1 + 1e-4 * torch.randn(p.shape, generator=generator))
    q = q / q.sum(1, keepdim=True)
    m = 0.5 * (p + q)
    textbook = 0.5 * (p * (p / m).log()).sum(1) + 0.5 * (q * (q / m).log()).sum(1)
    assert (textbook < 0).sum() > 100  # the failure this guards against is real
    got = js_divergence(p, q)
    assert (got >= 0).all()
    want = jensenshannon(p.double().numpy(), q.double().numpy(), axis=1) ** 2
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-3, atol=1e-12)


def test_extreme_ratios_keep_value_and_gradient_finite() -> None:
    """Entries 1e-12 against entries of 1e-2 (a ReLU map's zeros after to_distribution): the
    value matches SciPy and the gradient is finite (r rounds to -1 there)."""
    generator = torch.Generator().manual_seed(1)
    p = torch.rand(50, 64, generator=generator) ** 8
    p[:, :5] = 1e-12
    p = (p / p.sum(1, keepdim=True)).requires_grad_(True)
    q = torch.rand(50, 64, generator=generator)
    q[:, 5:9] = 1e-12
    q = q / q.sum(1, keepdim=True)
    got = js_divergence(p, q)
    got.sum().backward()
    assert p.grad is not None and torch.isfinite(p.grad).all()
    want = jensenshannon(p.detach().double().numpy(), q.double().numpy(), axis=1) ** 2
    np.testing.assert_allclose(got.detach().double().numpy(), want, rtol=1e-5)


# ------------------------------------------------------------- fused map JSD (training path)
def _distribution64(m: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``to_distribution``'s formula written out in float64 (section 3), for the references."""
    d = eps * m.mean(1, keepdim=True) + torch.finfo(torch.float32).tiny
    return (m + d) / (m + d).sum(1, keepdim=True)


def _maps(seed: int, sizes: tuple[int, ...] = (16, 4, 9), rows: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(rows, k, generator=g, dtype=torch.float64) ** 3 for k in sizes]


def test_map_jsd_matches_scipy_after_normalising() -> None:
    student, teacher = _maps(1), _maps(2)
    student[1][0] = 0.0  # an all-zero map is uniform
    teacher[2][1, :5] = 0.0  # entries at the floor next to mass in the other map
    student[0][2] = 3 * teacher[0][2]  # proportional maps: JSD 0
    got = map_js_divergences(student, teacher)
    assert got.shape == (3, 3) and got.dtype == torch.float64
    for j, (s, t) in enumerate(zip(student, teacher, strict=True)):
        expected = scipy_jsd(_distribution64(s), _distribution64(t))
        np.testing.assert_allclose(got[:, j].numpy(), expected, rtol=1e-9, atol=1e-15)
    assert float(got[2, 0]) < 1e-12 and float(got[0, 0]) > 1e-2


def test_map_jsd_float32_matches_the_reference_composition() -> None:
    student = [m.float() for m in _maps(3, (1024, 256, 64, 16), rows=4)]
    teacher = [m.float() for m in _maps(4, (1024, 256, 64, 16), rows=4)]
    teacher[3] = student[3] * (1 + 1e-4)  # nearly equal maps stay accurate and >= 0
    got = map_js_divergences(student, teacher)
    reference = torch.stack(
        [
            js_divergence(to_distribution(s), to_distribution(t))
            for s, t in zip(student, teacher, strict=True)
        ],
        dim=1,
    )
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-9)
    exact = [
        scipy_jsd(_distribution64(s.double()), _distribution64(t.double()))
        for s, t in zip(student, teacher, strict=True)
    ]
    np.testing.assert_allclose(got[:, 3].numpy(), exact[3], rtol=1e-2, atol=1e-14)
    assert float(got.min()) >= 0.0


def test_map_jsd_gradient_equals_autograd_of_the_composition() -> None:
    student = [m.requires_grad_() for m in _maps(5)]
    teacher = [m.requires_grad_() for m in _maps(6)]
    weights = torch.randn(3, 3, dtype=torch.float64)
    inputs = (*student, *teacher)
    got = torch.autograd.grad((map_js_divergences(student, teacher) * weights).sum(), inputs)
    reference = torch.stack(
        [
            js_divergence(_distribution64(s), _distribution64(t))
            for s, t in zip(student, teacher, strict=True)
        ],
        dim=1,
    )
    expected = torch.autograd.grad((reference * weights).sum(), inputs)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-14)
        assert float(g.abs().max()) > 1e-3
    # finite differences need entries well above their step (log curvature ~ 1 / m)
    away = [(m.detach() + 0.05).requires_grad_() for m in inputs]
    assert torch.autograd.gradcheck(lambda *m: map_js_divergences(m[:3], m[3:]), away)


def test_map_jsd_constant_teacher_gets_no_gradient_and_half_is_upcast() -> None:
    student = [m.half().requires_grad_() for m in _maps(7)]
    teacher = [m.half() for m in _maps(8)]
    out = map_js_divergences(student, teacher)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert all(s.grad is not None and s.grad.dtype == torch.float16 for s in student)
    assert all(t.grad is None for t in teacher)


def test_map_jsd_rejects_mismatched_maps() -> None:
    s, t = _maps(9), _maps(10)
    with pytest.raises(ValueError, match=r"layer 1 has student \(3, 4\) and teacher \(3, 5\)"):
        map_js_divergences(s, [t[0], torch.rand(3, 5, dtype=torch.float64), t[2]])
    with pytest.raises(ValueError, match="one teacher map per student map"):
        map_js_divergences(s, t[:2])
