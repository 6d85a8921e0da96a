"""Twice-differentiable activations (lightning_layerkd/activations.py) and their routing by
``LeanAutograd`` in the derivative-map passes.

PyTorch has no derivative for ``aten::hardsigmoid_backward``, so a student with
``nn.Hardsigmoid`` (MobileNetV3's squeeze-excite gate) failed in its Jacobian maps (double
backward) and Hessian maps (reverse-over-forward). The custom function is checked by
``gradcheck``/``gradgradcheck`` in float64 away from the kinks at -3 and 3, in reverse and
forward mode; the maps of a MobileNetV3-like CNN by finite differences.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import gradcheck, gradgradcheck

import lightning_layerkd._autograd.mode as lean_module
from lightning_layerkd._autograd.hardsigmoid import hardsigmoid, hardsigmoid_slope
from lightning_layerkd._autograd.mode import LeanAutograd
from lightning_layerkd.functional.derivatives import hessian_map, jacobian_map

NATIVE_ERROR = "derivative for aten::hardsigmoid_backward is not implemented"


def away_from_kinks(*shape: int, seed: int = 0, kinks: tuple[float, ...] = (-3.0, 3.0)) -> Tensor:
    """float64 samples of N(0, 3^2) (both sides of each kink) at least 0.1 from every kink."""
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    x = 3.0 * x
    for k in kinks:
        near = (x - k).abs() < 0.1
        x = torch.where(near, x + 0.2 * torch.sign(x - k + 1e-12), x)
    return x


def inplace_hardsigmoid(x: Tensor) -> Tensor:
    """The in-place variant on a fresh non-leaf copy (an in-place op on a leaf is an error)."""
    return hardsigmoid(x * 1.0, inplace=True)


def tangent_of(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """``(x, v) -> J_fn(x) v`` by forward mode, for checking reverse mode through it (the
    student's Hessian-map loss), which ``gradgradcheck`` does not cover."""

    def tangent(x: Tensor, v: Tensor) -> Tensor:
        with fwAD.dual_level():
            return fwAD.unpack_dual(fn(fwAD.make_dual(x, v))).tangent

    return tangent


VARIANTS = [
    pytest.param(hardsigmoid, id="out-of-place"),
    pytest.param(inplace_hardsigmoid, id="inplace"),
]


# ---------------------------------------------------------------- the custom function


@pytest.mark.parametrize("fn", VARIANTS)
def test_hardsigmoid_passes_gradcheck_in_reverse_and_forward_mode(fn: Callable) -> None:
    x = away_from_kinks(3, 17).requires_grad_()
    assert gradcheck(fn, (x,), check_forward_ad=True, check_backward_ad=True)
    assert gradcheck(fn, (x,), check_batched_grad=True)


@pytest.mark.parametrize("fn", VARIANTS)
def test_hardsigmoid_passes_gradgradcheck_in_all_mode_combinations(fn: Callable) -> None:
    """Reverse over reverse (Jacobian maps), forward over reverse, reverse over forward
    (Hessian maps: the tangent is backpropagated)."""
    x = away_from_kinks(3, 17, seed=1).requires_grad_()
    v = torch.randn_like(x).requires_grad_()
    assert gradgradcheck(fn, (x,), check_fwd_over_rev=True, check_batched_grad=True)
    assert gradcheck(tangent_of(fn), (x, v), check_backward_ad=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hardsigmoid_values_and_first_derivatives_equal_the_native_op(dtype: torch.dtype) -> None:
    """Same values; same derivatives, the kinks included. PyTorch's float64 kernel multiplies
    by a float32 ``1/6`` (relative error 3e-8), this one by the float64 ``1/6``."""
    rtol = 0.0 if dtype == torch.float32 else 1e-7
    kinks = torch.tensor([-3.5, -3.0, -2.0, 0.0, 2.9, 3.0, 3.5])
    x = torch.cat([kinks, 4 * torch.randn(200)]).to(dtype).requires_grad_()
    ours, native = hardsigmoid(x), F.hardsigmoid(x)
    assert torch.equal(ours, native)
    g = torch.randn_like(x)
    (d_ours,) = torch.autograd.grad(ours, x, g)
    (d_native,) = torch.autograd.grad(native, x, g)
    torch.testing.assert_close(d_ours, d_native, rtol=rtol, atol=0.0)
    assert torch.equal(d_ours == 0, d_native == 0)  # the same slope convention at the kinks
    t_ours = tangent_of(hardsigmoid)(x.detach(), g)
    t_native = tangent_of(F.hardsigmoid)(x.detach(), g)
    torch.testing.assert_close(t_ours, t_native, rtol=rtol, atol=0.0)


def test_hardsigmoid_slope_is_a_sixth_inside_and_zero_outside() -> None:
    x = torch.tensor([-4.0, -3.0, -2.999, 0.0, 2.999, 3.0, 4.0], dtype=torch.float64)
    expected = torch.tensor([0, 0, 1 / 6, 1 / 6, 1 / 6, 0, 0], dtype=torch.float64)
    assert torch.equal(hardsigmoid_slope(x), expected)


def test_inplace_hardsigmoid_writes_into_its_input() -> None:
    x = torch.randn(5, 4, requires_grad=True)
    y = x * 2.0
    out = hardsigmoid(y, inplace=True)
    assert out is y and torch.equal(out, F.hardsigmoid(x * 2.0))
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    torch.testing.assert_close(g, 2.0 * hardsigmoid_slope(2.0 * x))


@pytest.mark.parametrize(
    "act",
    [
        nn.Hardswish(),
        nn.SiLU(),
        nn.GELU(),
        nn.GELU(approximate="tanh"),
        nn.ReLU(),
        nn.ReLU6(),
        nn.Mish(),
        nn.Sigmoid(),
        nn.Tanh(),
        nn.ELU(),
        nn.SELU(),
        nn.LeakyReLU(0.1),
        nn.Softplus(),
    ],
    ids=lambda m: repr(m),
)
def test_activations_left_to_pytorch_support_every_mode_combination(act: nn.Module) -> None:
    """The premise of routing only hardsigmoid: PyTorch differentiates the others' gradients
    and tangents again (if this fails on some version, that activation needs a replacement)."""
    x = away_from_kinks(2, 9, kinks=(-3.0, 0.0, 3.0, 6.0)).requires_grad_()
    v = torch.randn_like(x).requires_grad_()
    assert gradgradcheck(act, (x,), check_fwd_over_rev=True)
    assert gradcheck(tangent_of(act), (x, v), check_backward_ad=True)


def test_native_hardsigmoid_gradient_cannot_be_differentiated() -> None:
    """Why the replacement exists; if PyTorch adds the derivative, the routing can go."""
    x = torch.randn(8, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(F.hardsigmoid(x * x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=NATIVE_ERROR):
        g.sum().backward()


# ---------------------------------------------------------------- routing in LeanAutograd


def test_lean_autograd_routes_hardsigmoid_only_where_gradients_are_differentiated() -> None:
    x = torch.randn(2, 3, requires_grad=True)
    calls = (
        lambda t: nn.Hardsigmoid()(t),
        lambda t: F.hardsigmoid(t),
        lambda t: torch._C._nn.hardsigmoid(t),
        lambda t: nn.Hardsigmoid(inplace=True)(t * 1.0),
    )
    with LeanAutograd(tangents=True, double_backward=True):
        nodes = [call(x).grad_fn for call in calls]
        kept = nn.Hardswish()(x).grad_fn
    assert [type(n).__name__ for n in nodes[:3]] == ["HardsigmoidBackward"] * 3
    assert type(nodes[3]).__name__ == "CopyBackwards"  # in-place: the result copied into t
    assert type(kept).__name__ == "HardswishBackward0"  # PyTorch's own where it suffices
    with LeanAutograd(tangents=True, double_backward=False):  # the teacher's Hessian pass
        assert type(nn.Hardsigmoid()(x).grad_fn).__name__ == "HardsigmoidBackward0"


# ---------------------------------------------------------------- maps of a MobileNetV3-like CNN


class SqueezeExcite(nn.Module):
    """MobileNetV3's squeeze-excite: pool, reduce, ReLU, expand, hardsigmoid gate."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)
        self.act, self.gate = nn.ReLU(), nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.expand(self.act(self.reduce(s))))


def mobilenet_like(seed: int, width: int = 6) -> nn.Sequential:
    """conv-BN-hardswish stem, a depthwise conv-BN-hardswish block with squeeze-excite, head."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.Hardswish()),
        nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False),
            nn.BatchNorm2d(width),
            nn.Hardswish(),
            SqueezeExcite(width, 3),
        ),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 4),
    ).double()
    with torch.no_grad():  # spread the SE logits over the gate's linear part (-3, 3)
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1):
                m.weight.mul_(4.0)
    return model


def map_loss(model: nn.Module, kind: str, x: Tensor, y: Tensor, w: list[Tensor]) -> Tensor:
    """``sum_j <w_j, map_j>`` of the student's maps of layers 0 and 1, graph kept."""
    layers = ["0", "1"]
    if kind == "jacobian":
        maps = jacobian_map(model, x, layers, y, create_graph=True)
    else:
        g = torch.Generator().manual_seed(0)  # the same probes at every evaluation
        maps = hessian_map(model, x, layers, y, generator=g, num_probes=2, create_graph=True)
    return sum((m * wj).sum() for m, wj in zip(maps, w, strict=True))  # type: ignore[return-value]


def map_inputs() -> tuple[Tensor, Tensor, list[Tensor]]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=g)
    y = torch.tensor([1, 2])
    w = [torch.rand(2, 6, 6, dtype=torch.float64, generator=g) for _ in range(2)]
    return x, y, w


@pytest.mark.parametrize("kind", ["jacobian", "hessian"])
def test_maps_failed_natively_on_hardsigmoid(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the replacement (PyTorch's hardsigmoid in the map pass) training through the
    maps raises: the test below is about a real failure."""
    monkeypatch.setattr(lean_module, "_TWICE_DIFFERENTIABLE", {})
    model = mobilenet_like(0)
    x, y, w = map_inputs()
    with pytest.raises(RuntimeError, match=NATIVE_ERROR):
        map_loss(model, kind, x, y, w).backward()


def test_teacher_maps_need_no_replacement(monkeypatch: pytest.MonkeyPatch) -> None:
    """A teacher's passes (``create_graph=False``) need first derivatives (Jacobian, run
    without ``LeanAutograd``) and forward mode (Hessian), which PyTorch's hardsigmoid has: the
    same maps without the routing as with it."""
    model = mobilenet_like(0).eval()
    x, y, _ = map_inputs()

    def maps() -> list[Tensor]:
        g = torch.Generator().manual_seed(0)
        return jacobian_map(model, x, ["0", "1"], y) + hessian_map(
            model, x, ["0", "1"], y, generator=g
        )

    routed = maps()
    monkeypatch.setattr(lean_module, "_TWICE_DIFFERENTIABLE", {})
    for ours, native in zip(routed, maps(), strict=True):
        assert torch.equal(ours, native)


@pytest.mark.parametrize("train", [False, True], ids=["eval-bn", "train-bn"])
@pytest.mark.parametrize("kind", ["jacobian", "hessian"])
def test_map_gradients_match_finite_differences(kind: str, train: bool) -> None:
    """Each parameter tensor's directional derivative of the map loss, autograd vs central
    differences, in float64."""
    model = mobilenet_like(0).train(train)
    x, y, w = map_inputs()
    params = [p for p in model.parameters()]
    loss = map_loss(model, kind, x, y, w)
    grads = torch.autograd.grad(loss, params)
    gen = torch.Generator().manual_seed(5)
    eps = 1e-6
    for p, grad in zip(params, grads, strict=True):
        d = torch.randn(p.shape, dtype=p.dtype, generator=gen)
        with torch.no_grad():
            p.add_(eps * d)
        up = map_loss(model, kind, x, y, w).detach()
        with torch.no_grad():
            p.sub_(2 * eps * d)
        down = map_loss(model, kind, x, y, w).detach()
        with torch.no_grad():
            p.add_(eps * d)
        numeric = (up - down) / (2 * eps)
        torch.testing.assert_close((grad * d).sum(), numeric, rtol=1e-5, atol=1e-9)
    assert any(g.abs().sum() > 0 for g in grads[-4:-2])  # the SE convs get gradients


# ---------------------------------------------------------------- timm: EfficientNet -> MobileNetV3


@pytest.mark.parametrize("method", ["jacobian", "hessian"])
def test_timm_efficientnet_to_mobilenetv3_trains_through_derivative_maps(method: str) -> None:
    timm = pytest.importorskip("timm")
    from lightning_layerkd import DistillationModule
    from lightning_layerkd.methods import HessianMaps, JacobianMaps

    torch.manual_seed(0)
    teacher = timm.create_model("efficientnet_b0", num_classes=10)
    student = timm.create_model("mobilenetv3_small_100", num_classes=10)
    # (student, teacher) blocks of equal size at 64 x 64: 16 x 16, 8 x 8 and 4 x 4
    layers = [("blocks.0", "blocks.1"), ("blocks.1", "blocks.2"), ("blocks.2", "blocks.4")]
    maps = JacobianMaps() if method == "jacobian" else HessianMaps()
    module = DistillationModule(teacher, student, method=maps, layers=layers, num_classes=10)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([3, 7])
    loss = module.training_step((x, y), 0)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    se = student.blocks[0][0].se.conv_expand.weight  # feeds the hardsigmoid gate
    assert se.grad is not None and torch.isfinite(se.grad).all()
