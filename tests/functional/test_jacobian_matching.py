"""Jacobian matching (Srinivas & Fleuret 2018), checked against independent math.

Input Jacobians are compared per sample with ``torch.autograd.functional.jacobian`` of the
model on that sample alone; the losses with values worked out by hand; the gradients that train
the student (double backward) with central finite differences of the loss in a weight. Tiny
float64 networks with smooth activations (tanh), batch norm in eval mode.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.autograd.functional import jacobian

from lightning_layerkd.functional.jacobian_matching import (
    PixelJacobian,
    activation_matching_loss,
    attention_pixel_jacobian,
    input_jacobian,
    jacobian_matching_loss,
    jacobian_norm_penalty,
    layer_jacobians,
    pool_window,
)
from lightning_layerkd.layers.hooks import FeatureHooks

B, K, S = 4, 5, 10  # batch, classes, image side; inputs are (B, 3, S, S)


def make_net(width: int, seed: int) -> nn.Sequential:
    """Stage ``"0"`` keeps the 10x10 resolution (the attention layer), then a stride-2 stage."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.Tanh()),
        nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.Tanh()),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, K),
    ).double()
    with torch.no_grad():  # non-trivial batch-norm statistics
        bn = net[0][1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return net.eval()


@pytest.fixture
def teacher() -> nn.Sequential:
    return make_net(6, seed=0)


@pytest.fixture
def student() -> nn.Sequential:
    return make_net(3, seed=1)


@pytest.fixture
def x() -> Tensor:
    return torch.randn(B, 3, S, S, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def logit_row(model: nn.Module, xi: Tensor, c: int) -> Tensor:
    """``d z[c] / d x`` of one sample, from the full ``K x D`` Jacobian."""
    full = jacobian(lambda inp: model(inp.unsqueeze(0))[0], xi)  # (K, 3, S, S)
    return full[c]


def hand_pooled(features: Tensor, k: int) -> Tensor:
    """Attention ``sum_c Z_c^2`` (eq. 8) of one sample, k x k mean pool with stride 1, by loops."""
    a = features.square().sum(dim=0)  # (H, W)
    h, w = a.shape
    out = torch.empty(h - k + 1, w - k + 1, dtype=a.dtype)
    for i in range(h - k + 1):
        for j in range(w - k + 1):
            out[i, j] = a[i : i + k, j : j + k].sum() / (k * k)
    return out


def finite_difference(loss_of_params, weight: Tensor, entry: tuple[int, ...], h=1e-5) -> float:
    """Central difference of ``loss_of_params()`` in one entry of ``weight``."""
    with torch.no_grad():
        old = weight[entry].item()
        weight[entry] = old + h
        up = float(loss_of_params())
        weight[entry] = old - h
        down = float(loss_of_params())
        weight[entry] = old
    return (up - down) / (2 * h)


# ---------------------------------------------------------------- input_jacobian


def test_input_jacobian_true_class_matches_autograd_per_sample(teacher, x):
    target = torch.tensor([0, 3, 1, 4])
    logits, j = input_jacobian(teacher, x, target)
    assert j.shape == x.shape
    torch.testing.assert_close(logits, teacher(x))
    assert not logits.requires_grad and not j.requires_grad  # the teacher: constants
    for i in range(B):
        torch.testing.assert_close(j[i], logit_row(teacher, x[i], int(target[i])))
    # a different class gives a different Jacobian (the class really is selected)
    _, other = input_jacobian(teacher, x, (target + 1) % K)
    assert not torch.allclose(other, j)


def test_input_jacobian_without_target_uses_argmax(teacher, x):
    logits, j = input_jacobian(teacher, x)
    predicted = teacher(x).argmax(dim=1)
    for i in range(B):
        torch.testing.assert_close(j[i], logit_row(teacher, x[i], int(predicted[i])))
    torch.testing.assert_close(j, input_jacobian(teacher, x, predicted)[1])


def test_input_jacobian_works_under_no_grad_and_for_frozen_models(teacher, x):
    teacher.requires_grad_(False)
    with torch.no_grad():
        _, j = input_jacobian(teacher, x, torch.zeros(B, dtype=torch.long))
    torch.testing.assert_close(j[1], logit_row(teacher, x[1], 0))


def test_input_jacobian_rejects_bad_shapes(teacher, x):
    with pytest.raises(ValueError, match="one class index per sample"):
        input_jacobian(teacher, x, torch.zeros(B + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, K\) logits"):
        input_jacobian(teacher[0], x)


# ---------------------------------------------------------------- eq. 10


def test_jacobian_matching_loss_by_hand():
    js = torch.tensor([[3.0, 4.0], [1.0, 0.0]], dtype=torch.float64)
    jt = torch.tensor([[4.0, 3.0], [0.0, 2.0]], dtype=torch.float64)
    # (0.6, 0.8) - (0.8, 0.6) -> 0.04 + 0.04; (1, 0) - (0, 1) -> 2; mean over the batch
    expected = (0.08 + 2.0) / 2
    assert jacobian_matching_loss(js, jt).item() == pytest.approx(expected, abs=1e-12)
    # scale invariance of each side, per sample (eq. 10 normalises each Jacobian)
    scale = torch.tensor([[5.0], [0.01]], dtype=torch.float64)
    assert jacobian_matching_loss(js * scale, jt * 7).item() == pytest.approx(expected, abs=1e-12)
    # zero for equal Jacobians up to a positive factor, 4 for opposite ones
    assert jacobian_matching_loss(js, 3 * js).item() == pytest.approx(0.0, abs=1e-12)
    assert jacobian_matching_loss(js, -js).item() == pytest.approx(4.0, abs=1e-12)


def test_jacobian_matching_loss_flattens_each_sample():
    g = torch.Generator().manual_seed(0)
    js = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    jt = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    per_sample = [
        (a.flatten() / a.norm() - b.flatten() / b.norm()).square().sum()
        for a, b in zip(js, jt, strict=True)
    ]
    expected = torch.stack(per_sample).mean()
    torch.testing.assert_close(jacobian_matching_loss(js, jt), expected)
    # 2 - 2 cos per sample
    cos = torch.nn.functional.cosine_similarity(js.flatten(1), jt.flatten(1), dim=1)
    torch.testing.assert_close(jacobian_matching_loss(js, jt), (2 - 2 * cos).mean())


def test_jacobian_matching_loss_zero_jacobian_is_finite():
    js = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    jt = torch.tensor([[0.0, 0.0, 2.0]], dtype=torch.float64)
    loss = jacobian_matching_loss(js, jt)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert torch.isfinite(js.grad).all()
    with pytest.raises(ValueError, match="same shape"):
        jacobian_matching_loss(js, jt[:, :2])


def test_output_jacobian_matching_trains_student_only(teacher, student, x):
    target = torch.tensor([0, 3, 1, 4])
    t_logits, jt = input_jacobian(teacher, x, target)
    s_logits, js = input_jacobian(student, x, target, create_graph=True)
    assert s_logits.requires_grad and js.requires_grad
    loss = jacobian_matching_loss(js, jt)
    assert 0.0 < loss.item() < 4.0
    loss.backward()
    conv = student[0][0].weight
    assert conv.grad is not None and torch.isfinite(conv.grad).all() and conv.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())

    # the double-backward gradient is the true derivative of the loss
    def loss_now() -> Tensor:
        return jacobian_matching_loss(input_jacobian(student, x, target)[1], jt)

    for entry in [(0, 0, 1, 1), (2, 1, 0, 2)]:
        fd = finite_difference(loss_now, conv, entry)
        assert conv.grad[entry].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)


# ---------------------------------------------------------------- Prop. 1


def test_activation_matching_loss_by_hand():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]], requires_grad=True)
    loss = activation_matching_loss(s, t)
    assert loss.item() == pytest.approx((0 + 4 + 9 + 3) / 2)  # sum over K, mean over B
    loss.backward()
    torch.testing.assert_close(s.grad, (s - t).detach())  # d/ds of mean_i sum_k (s - t)^2
    assert t.grad is None  # the teacher is a constant
    with pytest.raises(ValueError, match="same shape"):
        activation_matching_loss(s, t[:, :2])


# ---------------------------------------------------------------- Prop. 2


def test_jacobian_norm_penalty_is_squared_frobenius_norm(teacher, x):
    logits, penalty = jacobian_norm_penalty(teacher, x)
    torch.testing.assert_close(logits, teacher(x))
    per_sample = [
        jacobian(lambda inp: teacher(inp.unsqueeze(0))[0], x[i]).square().sum() for i in range(B)
    ]
    torch.testing.assert_close(penalty, torch.stack(per_sample).mean())


def test_jacobian_norm_penalty_with_target_keeps_the_true_class_row(teacher, x):
    target = torch.tensor([2, 2, 0, 1])
    _, penalty = jacobian_norm_penalty(teacher, x, target)
    rows = [logit_row(teacher, x[i], int(target[i])).square().sum() for i in range(B)]
    torch.testing.assert_close(penalty, torch.stack(rows).mean())
    assert penalty < jacobian_norm_penalty(teacher, x)[1]


@pytest.mark.parametrize("with_target", [False, True])
def test_jacobian_norm_penalty_trains_the_model(student, x, with_target):
    target = torch.tensor([2, 2, 0, 1]) if with_target else None
    logits, penalty = jacobian_norm_penalty(student, x, target)
    assert logits.requires_grad and penalty.requires_grad
    penalty.backward()
    weight = student[1][0].weight
    assert torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0
    fd = finite_difference(
        lambda: jacobian_norm_penalty(student, x, target)[1], weight, (1, 0, 1, 2)
    )
    assert weight.grad[1, 0, 1, 2].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)


# ---------------------------------------------------------------- attention pixels


def test_pool_window_is_a_fifth_of_the_map():
    assert pool_window((56, 56)) == (11, 11)
    assert pool_window((32, 16)) == (6, 3)
    assert pool_window((28, 8)) == (6, 2)
    assert pool_window((4, 1)) == (1, 1)


def test_attention_pixel_is_argmax_of_pooled_attention(teacher, x):
    result = attention_pixel_jacobian(teacher, x, teacher[0])
    assert isinstance(result, PixelJacobian)
    torch.testing.assert_close(result.logits, teacher(x))
    features = teacher[0](x).detach()  # the layer's output, (B, 6, 10, 10)
    k = 2  # 10 / 5
    assert result.pooled.shape == (B, S - k + 1, S - k + 1)
    assert result.pixel.shape == (B, 2)
    for i in range(B):
        pooled = hand_pooled(features[i], k)
        torch.testing.assert_close(result.pooled[i], pooled)
        row, col = divmod(int(pooled.argmax()), pooled.shape[1])
        assert result.pixel[i].tolist() == [row, col]


def test_attention_pixel_jacobian_matches_autograd(teacher, x):
    result = attention_pixel_jacobian(teacher, x, "0")  # the layer by path
    assert not result.jacobian.requires_grad
    for i in range(B):
        row, col = result.pixel[i].tolist()

        def pixel(inp: Tensor, row: int = row, col: int = col) -> Tensor:
            return hand_pooled(teacher[0](inp.unsqueeze(0))[0], 2)[row, col]

        torch.testing.assert_close(result.jacobian[i], jacobian(pixel, x[i]))


def test_window_and_stride_are_honoured(teacher, x):
    result = attention_pixel_jacobian(teacher, x, teacher[0], window=5, stride=5)
    assert result.pooled.shape == (B, 2, 2)
    a = teacher[0](x).detach().square().sum(dim=1)
    torch.testing.assert_close(result.pooled[0, 1, 0], a[0, 5:, :5].mean())


def test_student_uses_the_teachers_pixel_and_trains(teacher, student, x):
    t = attention_pixel_jacobian(teacher, x, teacher[0])
    own = attention_pixel_jacobian(student, x, student[0])
    index = t.pixel.clone()
    index[0] = (own.pixel[0] + 1) % own.pooled.shape[-1]  # not the student's own arg-max
    t = t._replace(pixel=index)
    s = attention_pixel_jacobian(student, x, student[0], t, create_graph=True)
    assert torch.equal(s.pixel, t.pixel)
    for i in range(B):
        row, col = t.pixel[i].tolist()

        def pixel(inp: Tensor, row: int = row, col: int = col) -> Tensor:
            return hand_pooled(student[0](inp.unsqueeze(0))[0], 2)[row, col]

        torch.testing.assert_close(s.jacobian[i].detach(), jacobian(pixel, x[i]))
    # a plain index tensor works as well
    plain = attention_pixel_jacobian(student, x, student[0], t.pixel)
    torch.testing.assert_close(plain.jacobian, s.jacobian.detach())

    loss = jacobian_matching_loss(s.jacobian, t.jacobian)
    loss.backward()
    conv = student[0][0].weight
    assert torch.isfinite(conv.grad).all() and conv.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert student[1][0].weight.grad is None  # the layer's Jacobian does not reach later layers

    def loss_now() -> Tensor:
        return jacobian_matching_loss(
            attention_pixel_jacobian(student, x, student[0], t.pixel).jacobian, t.jacobian
        )

    fd = finite_difference(loss_now, conv, (1, 2, 0, 1))
    assert conv.grad[1, 2, 0, 1].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("train", [False, True])
def test_layer_jacobians_of_one_pass_equal_separate_passes(teacher, student, x, train):
    """One forward for the output and two layers gives the values and the student gradient of
    separate input_jacobian / attention_pixel_jacobian calls (batch norm in either mode)."""
    student.train(train)
    y = torch.tensor([0, 3, 1, 4])
    layers = ["0", "1"]
    t_hooks = FeatureHooks([teacher[0], teacher[1]], layers)
    s_hooks = FeatureHooks([student[0], student[1]], layers)
    t_all = layer_jacobians(teacher, x, t_hooks, y, window=2)
    s_all = layer_jacobians(student, x, s_hooks, y, t_all, window=2, create_graph=True)
    t_hooks.remove()
    s_hooks.remove()
    loss = jacobian_matching_loss(s_all.output, t_all.output) + sum(
        jacobian_matching_loss(s.jacobian, t.jacobian)
        for s, t in zip(s_all.pixels, t_all.pixels, strict=True)
    )
    params = list(student.parameters())
    got = torch.autograd.grad(loss, params, allow_unused=True)

    t_out = input_jacobian(teacher, x, y)[1]
    s_logits, s_out = input_jacobian(student, x, y, create_graph=True)
    expected_loss = jacobian_matching_loss(s_out, t_out)
    for k, path in enumerate(layers):
        t_pix = attention_pixel_jacobian(teacher, x, path, window=2)
        s_pix = attention_pixel_jacobian(student, x, path, t_pix, window=2, create_graph=True)
        assert torch.equal(s_all.pixels[k].pixel, t_pix.pixel)
        torch.testing.assert_close(t_all.pixels[k].jacobian, t_pix.jacobian)
        torch.testing.assert_close(s_all.pixels[k].jacobian.detach(), s_pix.jacobian.detach())
        expected_loss = expected_loss + jacobian_matching_loss(s_pix.jacobian, t_pix.jacobian)
    torch.testing.assert_close(s_all.output.detach(), s_out.detach())
    torch.testing.assert_close(s_all.logits.detach(), s_logits.detach())
    torch.testing.assert_close(loss.detach(), expected_loss.detach())
    expected = torch.autograd.grad(expected_loss, params, allow_unused=True)
    assert sum(g is not None for g in got) >= 4  # convs, BN and the linear weight
    for g, e in zip(got, expected, strict=True):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g, e)


def test_hooks_are_removed_also_after_errors(teacher, student, x):
    def hook_count() -> int:
        return sum(len(m._forward_hooks) for m in teacher.modules())

    attention_pixel_jacobian(teacher, x, teacher[0])
    assert hook_count() == 0
    with pytest.raises(ValueError, match="out of range"):
        attention_pixel_jacobian(teacher, x, teacher[0], torch.full((B, 2), 50))
    assert hook_count() == 0
    with pytest.raises(ValueError, match=r"\(4, 2\) row and column"):
        attention_pixel_jacobian(teacher, x, teacher[0], torch.zeros(B, dtype=torch.long))
    with pytest.raises(ValueError, match="same spatial size"):
        t = attention_pixel_jacobian(teacher, x, teacher[0])
        attention_pixel_jacobian(student, x, student[1], t)  # 5x5 map, not 10x10
    with pytest.raises(ValueError, match=r"must output \(B, C, H, W\)"):
        attention_pixel_jacobian(teacher, x, teacher[3])  # Flatten
    assert hook_count() == 0
    assert sum(len(m._forward_hooks) for m in student.modules()) == 0


def test_layer_jacobians_norm_penalty_needs_the_graph(teacher, x):
    hooks = FeatureHooks([], [])
    with pytest.raises(ValueError, match="norm_penalty=True needs create_graph=True"):
        layer_jacobians(teacher, x, hooks, norm_penalty=True)
    penalty = layer_jacobians(teacher, x, hooks, create_graph=True, norm_penalty=True).norm_penalty
    assert penalty is not None
    torch.testing.assert_close(penalty, jacobian_norm_penalty(teacher, x)[1])
