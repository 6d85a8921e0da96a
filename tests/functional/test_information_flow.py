"""Information-flow distillation (Passalis et al. 2020, eqs. 3-10; docs/design.md section 6).

Hand-computed values on 4-sample batches; the references below are written from the equations
with explicit loops, independently of the vectorised implementation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy

from lightning_layerkd.functional.information_flow import (
    conditional_probabilities,
    cosine_kernel,
    critical_period_weights,
    jeffreys_divergence,
    multi_layer_pkt_loss,
    pkt_loss,
    student_t_kernel,
)
from lightning_layerkd.functional.layer_matching import (
    information_flow_divergence,
    layer_information,
    match_layers,
    nearest_centroid_accuracy,
    report_layer_matching,
)

R = 1.0 / math.sqrt(2.0)

#: Four 2-d samples: pairwise distances 01 sqrt2, 02 2, 03 1, 12 sqrt2, 13 1, 23 sqrt5.
X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ref_probs(x: torch.Tensor, kernel: str, d: float = 1.0) -> np.ndarray:
    """Eq. 5 literally: ``out[j, i] = p_{i|j} = K(x_i, x_j) / sum_{i != j} K(x_i, x_j)``."""
    v = x.reshape(x.shape[0], -1).numpy()
    n = len(v)

    def k(a: np.ndarray, b: np.ndarray) -> float:
        if kernel == "cosine":
            return 0.5 * (a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) + 1.0)
        return 1.0 / (1.0 + np.linalg.norm(a - b) ** d)

    out = np.zeros((n, n))
    for j in range(n):
        norm = sum(k(v[i], v[j]) for i in range(n) if i != j)
        for i in range(n):
            if i != j:
                out[j, i] = k(v[i], v[j]) / norm
    return out


def ref_jeffreys(p: np.ndarray, q: np.ndarray) -> float:
    """Eq. 8 literally: ``sum_i sum_{j != i} (p_{j|i} - q_{j|i}) (log p_{j|i} - log q_{j|i})``."""
    n = len(p)
    return sum(
        (p[i, j] - q[i, j]) * (math.log(p[i, j]) - math.log(q[i, j]))
        for i in range(n)
        for j in range(n)
        if i != j
    )


# --- kernels -----------------------------------------------------------------------------------


def test_cosine_kernel_by_hand() -> None:
    want = torch.tensor(
        [
            [1.0, 0.5, 0.0, (1 + R) / 2],
            [0.5, 1.0, 0.5, (1 + R) / 2],
            [0.0, 0.5, 1.0, (1 - R) / 2],
            [(1 + R) / 2, (1 + R) / 2, (1 - R) / 2, 1.0],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(cosine_kernel(X), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(cosine_kernel(X * 3.0, X), want, rtol=0, atol=1e-12)
    # b given: (N, M) cross kernel
    got = cosine_kernel(X[:2], X[2:])
    torch.testing.assert_close(got, want[:2, 2:], rtol=0, atol=1e-12)


def test_cosine_kernel_of_zero_vector_is_half() -> None:
    x = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    torch.testing.assert_close(cosine_kernel(x)[0], torch.tensor([0.5, 0.5]))


def test_student_t_kernel_by_hand() -> None:
    dist = torch.tensor(
        [
            [0.0, math.sqrt(2), 2.0, 1.0],
            [math.sqrt(2), 0.0, math.sqrt(2), 1.0],
            [2.0, math.sqrt(2), 0.0, math.sqrt(5)],
            [1.0, 1.0, math.sqrt(5), 0.0],
        ],
        dtype=torch.float64,
    )
    # d = 1 (the default): 1 / (1 + ||a - b||), e.g. K(x0, x2) = 1/3, K(x2, x3) = 1/(1 + sqrt5)
    torch.testing.assert_close(student_t_kernel(X), 1.0 / (1.0 + dist), rtol=0, atol=1e-12)
    assert student_t_kernel(X)[0, 2].item() == pytest.approx(1 / 3, abs=1e-12)
    # d = 2: 1 / (1 + ||a - b||^2), rationals
    want2 = torch.tensor(
        [
            [1.0, 1 / 3, 1 / 5, 1 / 2],
            [1 / 3, 1.0, 1 / 3, 1 / 2],
            [1 / 5, 1 / 3, 1.0, 1 / 6],
            [1 / 2, 1 / 2, 1 / 6, 1.0],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(student_t_kernel(X, d=2.0), want2, rtol=0, atol=1e-12)
    torch.testing.assert_close(student_t_kernel(X[:1], X[1:], d=2.0), want2[:1, 1:])


def test_student_t_kernel_is_translation_invariant_and_exact_on_diagonal() -> None:
    x = rand(6, 5, seed=1) + 1e3
    k = student_t_kernel(x)
    assert torch.equal(torch.diagonal(k), torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(k, student_t_kernel(x - 1e3), rtol=0, atol=1e-9)


# --- conditional probabilities (eqs. 5-6) ------------------------------------------------------


def test_conditional_probabilities_student_t_by_hand() -> None:
    # K with d = 2, diagonal removed; rows: [0, 1/3, 1/5, 1/2] sums to 31/30, etc.
    want = torch.tensor(
        [
            [0.0, 10 / 31, 6 / 31, 15 / 31],
            [2 / 7, 0.0, 2 / 7, 3 / 7],
            [2 / 7, 10 / 21, 0.0, 5 / 21],
            [3 / 7, 3 / 7, 1 / 7, 0.0],
        ],
        dtype=torch.float64,
    )
    p = conditional_probabilities(X, "student_t", d=2.0)
    torch.testing.assert_close(p, want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(p.numpy(), ref_probs(X, "student_t", d=2.0), rtol=0, atol=1e-12)
    # rows (one distribution per conditioning sample j) sum to 1; the columns do not
    torch.testing.assert_close(p.sum(1), torch.ones(4, dtype=torch.float64))
    assert p.sum(0)[1].item() == pytest.approx(10 / 31 + 10 / 21 + 3 / 7)  # 1.2270...
    assert torch.equal(torch.diagonal(p), torch.zeros(4, dtype=torch.float64))


def test_conditional_probabilities_cosine_by_hand() -> None:
    p = conditional_probabilities(X, "cosine")
    row0 = 0.5 + 0.0 + (1 + R) / 2  # K01 + K02 + K03
    assert p[0, 1].item() == pytest.approx(0.5 / row0, abs=1e-12)
    assert p[0, 2].item() == 0.0  # x0 and x2 are opposite: K_c = 0
    assert p[0, 3].item() == pytest.approx((1 + R) / 2 / row0, abs=1e-12)
    row2 = 0.0 + 0.5 + (1 - R) / 2
    assert p[2, 3].item() == pytest.approx((1 - R) / 2 / row2, abs=1e-12)
    np.testing.assert_allclose(p.numpy(), ref_probs(X, "cosine"), rtol=0, atol=1e-12)
    torch.testing.assert_close(p.sum(1), torch.ones(4, dtype=torch.float64))
    assert torch.equal(torch.diagonal(p), torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("kernel", ["cosine", "student_t"])
def test_conditional_probabilities_random_match_reference(kernel: str) -> None:
    x = rand(7, 3, 2, 2, seed=2)  # any (N, ...) shape, flattened per sample
    p = conditional_probabilities(x, kernel)
    np.testing.assert_allclose(p.numpy(), ref_probs(x, kernel), rtol=0, atol=1e-12)
    assert p.dtype == torch.float64
    assert conditional_probabilities(x.float(), kernel).dtype == torch.float32
    assert conditional_probabilities(x.half(), kernel).dtype == torch.float32


def test_conditional_probabilities_needs_two_samples() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        conditional_probabilities(torch.ones(1, 3))
    with pytest.raises(ValueError, match="kernel"):
        conditional_probabilities(X, "gaussian")  # type: ignore[arg-type]


# --- Jeffreys divergence (eq. 8) ---------------------------------------------------------------


def test_jeffreys_by_hand() -> None:
    p = torch.tensor([[0, 1 / 2, 1 / 2], [1 / 4, 0, 3 / 4], [1 / 2, 1 / 2, 0]], dtype=torch.float64)
    q = torch.tensor([[0, 1 / 4, 3 / 4], [1 / 4, 0, 3 / 4], [1 / 3, 2 / 3, 0]], dtype=torch.float64)
    # row 0: (1/4) ln 2 - (1/4) ln(2/3) = ln(3)/4; row 1: 0; row 2: (1/6) ln(3/2) - (1/6) ln(3/4)
    want = math.log(3) / 4 + math.log(2) / 6
    assert jeffreys_divergence(p, q, eps=1e-15).item() == pytest.approx(want, rel=1e-12)
    assert jeffreys_divergence(q, p, eps=1e-15).item() == pytest.approx(want, rel=1e-12)
    assert jeffreys_divergence(p, q, eps=1e-15, reduction="mean").item() == pytest.approx(
        want / 3, rel=1e-12
    )
    assert jeffreys_divergence(p, p).item() == 0.0


def test_jeffreys_matches_scipy_and_loop_reference() -> None:
    p = conditional_probabilities(rand(6, 4, seed=3), "student_t")
    q = conditional_probabilities(rand(6, 4, seed=4), "student_t")
    off = ~torch.eye(6, dtype=torch.bool)
    pf, qf = p[off].numpy(), q[off].numpy()
    # scipy normalises the flattened vectors (total mass N = 6), so it gives the per-row mean
    sym = entropy(pf, qf) + entropy(qf, pf)
    got_sum = jeffreys_divergence(p, q, eps=1e-15).item()
    assert got_sum == pytest.approx(6 * sym, rel=1e-9)
    assert jeffreys_divergence(p, q, eps=1e-15, reduction="mean").item() == pytest.approx(
        sym, rel=1e-9
    )
    assert got_sum == pytest.approx(ref_jeffreys(p.numpy(), q.numpy()), rel=1e-9)
    assert got_sum > 1e-2
    # the default eps changes the value by far less than the tolerance of a float32 loss
    assert jeffreys_divergence(p, q).item() == pytest.approx(got_sum, rel=1e-4)


def test_jeffreys_is_finite_with_exact_zeros() -> None:
    p = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    q = torch.tensor([[0.0, 0.0], [1.0, 0.0]], requires_grad=True)
    out = jeffreys_divergence(p, q)
    out.backward()
    assert torch.isfinite(out) and out.item() > 10  # ~ log(1 / eps)
    assert torch.isfinite(q.grad).all()


def test_jeffreys_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="same shape|one shape"):
        jeffreys_divergence(torch.ones(2, 2), torch.ones(3, 3))
    with pytest.raises(ValueError, match="eps"):
        jeffreys_divergence(torch.ones(2, 2), torch.ones(2, 2), eps=0.0)
    with pytest.raises(ValueError, match="reduction"):
        jeffreys_divergence(torch.ones(2, 2), torch.ones(2, 2), reduction="max")  # type: ignore[arg-type]


# --- PKT loss (eq. 7) --------------------------------------------------------------------------


def test_pkt_loss_by_hand() -> None:
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]], dtype=torch.float64)
    t = torch.tensor([[0.5, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    ps_t, pt_t = ref_probs(s, "student_t"), ref_probs(t, "student_t")
    cos = pkt_loss(s, t, "cosine", eps=1e-15).item()
    want_cos = ref_jeffreys(ref_probs(t, "cosine"), ref_probs(s, "cosine"))
    assert cos == pytest.approx(want_cos, rel=1e-9)
    st = pkt_loss(s, t, "student_t", eps=1e-15).item()
    assert st == pytest.approx(ref_jeffreys(pt_t, ps_t), rel=1e-9)
    # eq. 7: the unweighted sum of the two kernels' divergences
    hyb = pkt_loss(s, t, eps=1e-15).item()
    assert hyb == pytest.approx(pkt_loss(s, t, "cosine", eps=1e-15).item() + st, rel=1e-12)
    assert st > 1e-2 and hyb > st


def test_pkt_loss_is_zero_for_identical_features() -> None:
    x = rand(8, 3, 4, 4, seed=5)
    for kernel in ("hybrid", "cosine", "student_t"):
        assert pkt_loss(x, x.clone(), kernel).item() == 0.0  # type: ignore[arg-type]
        assert pkt_loss(x.float(), x.float(), kernel).item() == 0.0  # type: ignore[arg-type]


def test_pkt_loss_heterogeneous_shapes_and_flattening() -> None:
    s, t = rand(5, 2, 3, 3, seed=6), rand(5, 7, seed=7)
    loss = pkt_loss(s, t)
    torch.testing.assert_close(loss, pkt_loss(s.reshape(5, -1), t))
    assert loss.dim() == 0 and loss.item() > 0
    with pytest.raises(ValueError, match="same number of samples"):
        pkt_loss(rand(5, 3), rand(6, 3))


def test_cosine_loss_is_scale_invariant_but_student_t_is_not() -> None:
    s, t = rand(4, 6, seed=8), rand(4, 6, seed=9)
    base = pkt_loss(s, t, "cosine")
    torch.testing.assert_close(pkt_loss(s * 7.0, t, "cosine"), base, rtol=1e-10, atol=0)
    torch.testing.assert_close(pkt_loss(s, t / 3.0, "cosine"), base, rtol=1e-10, atol=0)
    assert base.item() > 1e-2
    # the Student-t term depends on the scale, so the hybrid loss does too
    st, st7 = pkt_loss(s, t, "student_t").item(), pkt_loss(s * 7.0, t, "student_t").item()
    assert abs(st7 - st) > 1e-3


def test_pkt_loss_mean_reduction_divides_by_batch() -> None:
    s, t = rand(6, 3, seed=10), rand(6, 3, seed=11)
    torch.testing.assert_close(pkt_loss(s, t, reduction="mean"), pkt_loss(s, t) / 6)


@pytest.mark.parametrize("kernel", ["hybrid", "cosine", "student_t"])
def test_gradient_flows_to_student(kernel: str) -> None:
    s = rand(4, 5, seed=12).float().requires_grad_()
    t = rand(4, 5, seed=13).float()
    pkt_loss(s, t, kernel).backward()  # type: ignore[arg-type]
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert s.grad.abs().max() > 1e-4


@pytest.mark.parametrize("kernel", ["hybrid", "cosine", "student_t"])
@pytest.mark.parametrize("case", ["identical", "zero_student", "zero_both", "zero_teacher", "dup"])
def test_loss_and_gradient_finite_in_degenerate_cases(kernel: str, case: str) -> None:
    t = rand(4, 3, 2, seed=14).float()
    s0 = {
        "identical": t.clone(),
        "zero_student": torch.zeros_like(t),
        "zero_both": torch.zeros_like(t),
        "zero_teacher": t.clone() * 0.5,
        "dup": t[[0, 0, 1, 1]].clone(),  # duplicated samples: zero off-diagonal distances
    }[case]
    if case in ("zero_both", "zero_teacher"):
        t = torch.zeros_like(t)
    s = s0.requires_grad_()
    loss = pkt_loss(s, t, kernel)  # type: ignore[arg-type]
    loss.backward()
    assert torch.isfinite(loss)
    assert s.grad is not None and torch.isfinite(s.grad).all()
    if case in ("identical", "zero_both"):
        assert loss.item() == 0.0
        assert s.grad.abs().max().item() == 0.0


# --- critical-period weights (eq. 10) and the multi-layer loss (eq. 9) ---------------------------


def test_critical_period_weights_by_hand() -> None:
    assert critical_period_weights(3, 0) == [100.0, 100.0, 1.0]
    assert critical_period_weights(3, 1) == pytest.approx([70.0, 70.0, 1.0])
    assert critical_period_weights(4, 5) == pytest.approx([16.807, 16.807, 16.807, 1.0])
    assert critical_period_weights(2, 2, alpha_init=1.0, gamma=0.5) == [0.25, 1.0]
    assert critical_period_weights(1, 3) == [1.0]
    with pytest.raises(ValueError):
        critical_period_weights(0, 0)
    with pytest.raises(ValueError):
        critical_period_weights(2, -1)


def test_multi_layer_loss_is_weighted_sum() -> None:
    s = [rand(4, 3, seed=20), rand(4, 2, 2, seed=21), rand(4, 5, seed=22)]
    t = [rand(4, 6, seed=23), rand(4, 4, seed=24), rand(4, 5, seed=25)]
    w = critical_period_weights(3, 1)  # [70, 70, 1]
    got = multi_layer_pkt_loss(s, t, w)
    parts = [pkt_loss(a, b).item() for a, b in zip(s, t, strict=True)]
    assert got.item() == pytest.approx(70 * parts[0] + 70 * parts[1] + parts[2], rel=1e-12)
    got_c = multi_layer_pkt_loss(s, t, [2.0, 0.0, 0.5], kernel="cosine").item()
    want_c = 2.0 * pkt_loss(s[0], t[0], "cosine").item() + 0.5 * pkt_loss(s[2], t[2], "cosine")
    assert got_c == pytest.approx(float(want_c), rel=1e-12)
    with pytest.raises(ValueError, match="one weight per layer pair"):
        multi_layer_pkt_loss(s, t, [1.0, 1.0])
    with pytest.raises(ValueError, match="at least one"):
        multi_layer_pkt_loss([], [], [])


# --- nearest-centroid accuracy (Fig. 2) and layer matching (eqs. 3-4) ---------------------------


def test_nearest_centroid_leave_one_out_by_hand() -> None:
    # class 0 at {0, 1}, class 1 at {3, 7}. Leave-one-out: x = 3 has own centroid 7 (distance
    # 4) against class 0's 0.5 (2.5) -> wrong; the others are right -> 3/4. (In-sample it would
    # be 4/4: centroid 5 is at distance 2.)
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    y = torch.tensor([0, 0, 1, 1])
    assert nearest_centroid_accuracy(x, y) == 0.75
    # a class with a single sample has no leave-one-out centroid: that sample is wrong
    x2 = torch.tensor([[0.0], [1.0], [10.0]])
    assert nearest_centroid_accuracy(x2, torch.tensor([0, 0, 5])) == pytest.approx(2 / 3)


def test_nearest_centroid_train_test_by_hand() -> None:
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    y = torch.tensor([0, 0, 1, 1])  # centroids 0.5 and 5
    xt = torch.tensor([[2.0], [4.0], [2.5]])
    yt = torch.tensor([0, 1, 1])  # 2.5 is nearer 0.5 (2.0) than 5 (2.5): wrong
    assert nearest_centroid_accuracy(x, y, xt, yt) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="both"):
        nearest_centroid_accuracy(x, y, xt)


def test_nearest_centroid_separable_vs_random() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    centres = torch.randn(3, 16, generator=g) * 10
    sep = centres[y] + torch.randn(300, 16, generator=g)
    assert nearest_centroid_accuracy(sep.reshape(300, 4, 4), y) == 1.0
    noise = torch.randn(300, 64, generator=g)
    acc = nearest_centroid_accuracy(noise, y)
    assert 0.15 < acc < 0.5  # chance is 1/3


def test_match_layers_by_hand() -> None:
    teacher = [0.1, 0.3, 0.6, 0.8, 0.95]
    # 0.25 -> 0.3 (index 1); 0.5 -> 0.6 (2); the last student layer -> the last teacher layer
    # (4) even though 0.55 is nearest to 0.6
    assert match_layers([0.25, 0.5, 0.55], teacher) == [1, 2, 4]
    # several student layers may share a teacher layer
    assert match_layers([0.58, 0.62, 0.1], torch.tensor(teacher)) == [2, 2, 4]
    assert match_layers([0.9], teacher) == [4]
    assert match_layers([0.5, 1.0], [0.25, 0.75, 1.0]) == [0, 2]  # exact tie: the earlier layer
    # eq. 3: (0.25 - 0.3)^2 + (0.5 - 0.6)^2 + (0.55 - 0.95)^2
    assert information_flow_divergence([0.25, 0.5, 0.55], teacher) == pytest.approx(0.1725)
    with pytest.raises(ValueError):
        match_layers([], teacher)


def test_one_zero_student_sample_gets_a_zero_cosine_gradient() -> None:
    # a single all-zero sample (e.g. dead ReLUs): no direction, so no cosine gradient to it
    # (a clamped norm would hand it ~1/eps), while the other samples still learn
    s = rand(4, 6, seed=15).float()
    s[0] = 0.0
    s.requires_grad_()
    pkt_loss(s, rand(4, 6, seed=16).float(), "cosine").backward()
    assert s.grad is not None
    assert s.grad[0].abs().max().item() == 0.0
    assert 1e-4 < s.grad[1:].abs().max().item() < 10.0


def test_layer_information_reports_separable_layers_and_matching():
    torch.manual_seed(0)
    labels = torch.arange(40) % 2
    x = torch.randn(40, 3, 4, 4) + 3.0 * labels.view(-1, 1, 1, 1).float()
    teacher = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 1), torch.nn.Flatten(), torch.nn.Linear(64, 2)
    )
    student = torch.nn.Sequential(
        torch.nn.Conv2d(3, 2, 1), torch.nn.Flatten(), torch.nn.Linear(32, 2)
    )
    batches = [(x[:20], labels[:20]), (x[20:], labels[20:])]
    scores = layer_information(teacher, ["0"], batches)
    assert len(scores) == 2 and scores[0] == 1.0  # the class shift survives a 1x1 conv
    report = report_layer_matching(teacher, student, [("0", "0")], batches)
    assert report["matching"] == {"0": "0", "output": "output"}
    assert report["student"]["0"] == 1.0
    assert not any(m._forward_hooks for m in teacher.modules())
