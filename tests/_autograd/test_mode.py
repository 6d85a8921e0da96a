"""The Hessian-map pass under ``LeanAutograd(tangents=True, double_backward=True)`` (the
student's): batch norm's primal and tangent with closed-form reverse rules give the values and
derivatives of the same formulas written in plain differentiable ops, and of PyTorch's own
kernels (``native_batch_norm_backward`` differentiated by ``batchnorm_double_backward``)."""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn

import lightning_layerkd._autograd.mode as lean_autograd
from lightning_layerkd._autograd.mode import LeanAutograd
from lightning_layerkd.functional.derivatives import hessian_map
from tests.helpers.models import autograd_node_names

SHAPES = [(4, 3, 5, 5), (6, 3), (3, 2, 7)]
EPS, MOMENTUM = 1e-5, 0.1


def _inputs(shape: tuple[int, ...], affine: bool) -> list[Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64).mul(2).add(1)
    x_t = torch.randn(*shape, generator=gen, dtype=torch.float64)
    tensors = [x, x_t]
    if affine:
        tensors.append(torch.rand(shape[1], generator=gen, dtype=torch.float64).add(0.5))
        tensors.append(torch.randn(shape[1], generator=gen, dtype=torch.float64))
    return [t.requires_grad_(True) for t in tensors]


def _running(channels: int) -> tuple[Tensor, Tensor]:
    return (
        torch.linspace(-0.5, 0.5, channels, dtype=torch.float64),
        torch.linspace(0.5, 2.0, channels, dtype=torch.float64),
    )


def _lean(x: Tensor, x_t: Tensor, *affine: Tensor, running: tuple | None = None):
    """Primal and tangent of training-mode batch norm under the student's map-pass mode."""
    weight, bias = affine if affine else (None, None)
    mean, var = running if running is not None else (None, None)
    with fwAD.dual_level(), LeanAutograd(tangents=True, double_backward=True):
        out = F.batch_norm(fwAD.make_dual(x, x_t), mean, var, weight, bias, True, MOMENTUM, EPS)
        primal, tangent = fwAD.unpack_dual(out)
    return primal, tangent


def _by_hand(x: Tensor, x_t: Tensor, *affine: Tensor) -> tuple[Tensor, Tensor]:
    """``y = w * xh + b`` and its JVP ``w * s * (t - mean(t) - xh * mean(xh * t))``, with the
    batch statistics as functions of ``x``, in plain differentiable ops."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mu = x.mean(dims, keepdim=True)
    s = (x.var(dims, unbiased=False, keepdim=True) + EPS).rsqrt()
    xh = (x - mu) * s
    t = (x_t - x_t.mean(dims, keepdim=True) - xh * (x_t * xh).mean(dims, keepdim=True)) * s
    if not affine:
        return xh, t
    w, b = affine[0].view(shape), affine[1].view(shape)
    return xh * w + b, t * w


def _hessian_like(layer, inputs: list[Tensor]) -> list[Tensor | None]:
    """What a Hessian-map step does with a layer: ``hv`` = a gradient of the primal with the
    tangent in its output gradient (create_graph), a loss on ``v * hv`` and on the tangent, and
    that loss's gradient w.r.t. everything."""
    x = inputs[0]
    primal, tangent = layer(*inputs)
    scale = torch.linspace(0.5, 1.5, tangent.numel(), dtype=x.dtype).view_as(tangent)
    (hv,) = torch.autograd.grad(primal, [x], tangent * scale, create_graph=True)
    v = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(7)) * 2.0 - 1
    loss = (v * hv).square().sum() + (tangent * primal).sum() + primal.square().sum()
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [primal.detach(), tangent.detach(), hv.detach(), *grads]


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_training_batch_norm_tangent_gradcheck(shape: tuple[int, ...], affine: bool) -> None:
    """Finite differences of the (primal, tangent) map; the primal alone also to second order."""
    inputs = _inputs(shape, affine)
    assert torch.autograd.gradcheck(_lean, inputs)
    assert torch.autograd.gradgradcheck(lambda *t: _lean(*t)[0], inputs)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_training_batch_norm_hessian_pass_matches_the_formula(
    shape: tuple[int, ...], affine: bool
) -> None:
    """Values, ``hv`` and the map loss's gradients against the formula in plain ops (whose
    derivatives are autograd's own); the reverse graph runs the closed-form nodes."""
    inputs = _inputs(shape, affine)
    primal, tangent = _lean(*inputs)
    names = autograd_node_names(primal, tangent)
    assert {"_BatchNormBackward", "_BatchNormBackwardBackward"} <= names, names
    assert not any(name.startswith("NativeBatchNorm") for name in names), names
    expected = _hessian_like(_by_hand, inputs)
    got = _hessian_like(_lean, inputs)
    for e, g in zip(expected, got, strict=True):
        assert e is not None and g is not None
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("double_backward", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_tangents_of_input_weight_and_bias_match_the_formula(
    training: bool, double_backward: bool
) -> None:
    """Tangents on the affine weights too (no map pass has them, the rule takes them): primal,
    tangent, ``hv`` and the loss's gradients against the formula in plain ops, in training mode
    (batch statistics) and eval mode (running statistics, unchanged)."""
    x, x_t, w, b = _inputs((4, 3, 5, 5), affine=True)
    w_t, b_t = (torch.randn(3, dtype=torch.float64).requires_grad_(True) for _ in range(2))
    mean, var = _running(3)
    shape = (1, -1, 1, 1)

    def lean(*t: Tensor) -> tuple[Tensor, Tensor]:
        with fwAD.dual_level(), LeanAutograd(tangents=True, double_backward=double_backward):
            duals = [fwAD.make_dual(p, d) for p, d in zip(t[::2], t[1::2], strict=True)]
            out = F.batch_norm(duals[0], mean, var, duals[1], duals[2], training, MOMENTUM, EPS)
            return fwAD.unpack_dual(out)

    def by_hand(*t: Tensor) -> tuple[Tensor, Tensor]:
        x, x_t, w, w_t, b, b_t = t
        if training:
            x_hat, t_hat = _by_hand(x, x_t)
        else:
            inv = (var + EPS).rsqrt().view(shape)
            x_hat, t_hat = (x - mean.view(shape)) * inv, x_t * inv
        out = x_hat * w.view(shape) + b.view(shape)
        return out, t_hat * w.view(shape) + x_hat * w_t.view(shape) + b_t.view(shape)

    inputs = [x, x_t, w, w_t, b, b_t]
    expected = _hessian_like(by_hand, inputs)
    got = _hessian_like(lean, inputs)
    for e, g in zip(expected, got, strict=True):
        assert e is not None and g is not None
        torch.testing.assert_close(g, e)
    if not training:
        torch.testing.assert_close(mean, _running(3)[0], rtol=0, atol=0)


def _pytorch_kernels(x: Tensor, x_t: Tensor, *affine: Tensor, running: tuple | None = None):
    """The same pass with ``LeanAutograd`` keeping PyTorch's kernels and their derivatives."""
    weight, bias = affine if affine else (None, None)
    mean, var = running if running is not None else (None, None)
    with fwAD.dual_level(), LeanAutograd(tangents=True, double_backward=False):
        out = F.batch_norm(fwAD.make_dual(x, x_t), mean, var, weight, bias, True, MOMENTUM, EPS)
        return fwAD.unpack_dual(out)


@pytest.mark.parametrize("shape", SHAPES)
def test_training_batch_norm_hessian_pass_matches_pytorch_kernels(shape: tuple[int, ...]) -> None:
    """Against ``native_batch_norm_backward`` differentiated by PyTorch, and the same running
    statistics."""
    inputs = _inputs(shape, affine=True)
    run_e, run_g = _running(shape[1]), _running(shape[1])
    expected = _hessian_like(lambda *t: _pytorch_kernels(*t, running=run_e), inputs)
    got = _hessian_like(lambda *t: _lean(*t, running=run_g), inputs)
    for e, g in zip(expected, got, strict=True):
        assert e is not None and g is not None
        torch.testing.assert_close(g, e)
    for e, g in zip(run_e, run_g, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def _cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 5, 3, padding=1, bias=False),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Conv2d(5, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    ).double()
    with torch.no_grad():
        for bn in (model[1], model[4], model[7]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.5)
    return model.train()


@pytest.mark.parametrize("wrt", ["activation", "weight"])
def test_student_hessian_map_and_its_gradient_match_pytorch_kernels(wrt: str, monkeypatch) -> None:
    """A training-mode student's Hessian maps (two layers, two probes), the gradient of a loss on
    them and the running statistics: the same as with batch norm's native kernels in the map
    pass, differentiated by PyTorch, at float64 rounding."""
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 2])
    layers = ["3", "6"] if wrt == "weight" else ["2", "5"]

    def run(model: nn.Module) -> list[Tensor]:
        maps = hessian_map(
            model,
            x,
            layers,
            y,
            wrt=wrt,  # type: ignore[arg-type]
            num_probes=2,
            generator=torch.Generator().manual_seed(1),
            create_graph=True,
        )
        loss = sum((m * torch.linspace(1, 2, m.numel()).view_as(m)).sum() for m in maps)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return [*(m.detach() for m in maps), *grads, *model.state_dict().values()]

    got = run(_cnn(0))
    original = lean_autograd.batch_norm_jvp
    monkeypatch.setattr(
        lean_autograd,
        "batch_norm_jvp",
        lambda *args, closed_form, owner: original(*args, closed_form=False, owner=owner),
    )
    expected = run(_cnn(0))
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("double_backward", [False, True])
@pytest.mark.parametrize(
    ("dual_x", "dual_w", "dual_b"),
    [(True, False, False), (False, True, False), (False, False, True), (True, True, True)],
)
def test_convolution_hessian_pass_matches_pytorch(
    dual_x: bool, dual_w: bool, dual_b: bool, double_backward: bool
) -> None:
    """The convolution recorded with its own forward-mode rule (dual inputs into one node, no
    unpacking): primal, tangent, ``hv`` and the map loss's gradients as with PyTorch's own JVP
    (strided, padded, grouped, biased); the output is no view."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 7, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    tangents = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (x, w, b)]
    tangents = [t.requires_grad_(True) for t in tangents]
    flags = (dual_x, dual_w, dual_b)

    def conv(mode: bool, x: Tensor, w: Tensor, b: Tensor, *ts: Tensor) -> tuple[Tensor, Tensor]:
        lean = LeanAutograd(tangents=True, double_backward=double_backward)
        with fwAD.dual_level(), lean if mode else nullcontext():
            args = [
                fwAD.make_dual(p, t) if flag else p
                for p, t, flag in zip((x, w, b), ts, flags, strict=True)
            ]
            out = F.conv2d(*args, 2, (1, 2), 1, 2)
            assert not mode or not out._is_view()
            primal, tangent = fwAD.unpack_dual(out)
        return primal, tangent

    inputs = [x, w, b, *tangents]
    for mode in (False, True):
        assert torch.autograd.gradcheck(partial(conv, mode), inputs)
    expected = _hessian_like(partial(conv, False), inputs)
    got = _hessian_like(partial(conv, True), inputs)
    for e, g in zip(expected, got, strict=True):
        if e is None:
            assert g is None or torch.count_nonzero(g) == 0
            continue
        assert g is not None
        torch.testing.assert_close(g, e)
