"""Batch norm routed by ``LeanAutograd`` where gradients are differentiated again
(:func:`~lightning_layerkd._autograd.mode.native_batch_norm`): same values, first and second
derivatives and running statistics as PyTorch's batch norm."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_layerkd._autograd.batch_norm import native_batch_norm
from lightning_layerkd._autograd.mode import LeanAutograd

SHAPES = [(4, 3, 5, 5), (6, 3), (3, 2, 7)]


def _inputs(shape: tuple[int, ...], affine: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(*shape, generator=gen, dtype=torch.float64) * 2 + 1).requires_grad_(True)
    if not affine:
        return x, None, None
    w = torch.randn(shape[1], generator=gen, dtype=torch.float64).requires_grad_(True)
    b = torch.randn(shape[1], generator=gen, dtype=torch.float64).requires_grad_(True)
    return x, w, b


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_gradcheck_and_gradgradcheck(shape: tuple[int, ...], affine: bool) -> None:
    x, w, b = _inputs(shape, affine)
    inputs = (x, w, b) if affine else (x,)

    def fn(*t: Tensor) -> Tensor:
        weight, bias = (t[1], t[2]) if affine else (None, None)
        return native_batch_norm(t[0], None, None, weight, bias, True, 0.1, 1e-5)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def _derivatives(bn, x, w, b, running, loss_on, wrt_second) -> tuple[Tensor, ...]:
    inputs = [t for t in (x, w, b) if t is not None]
    out = bn(x, *running, w, b, True, 0.1, 1e-5)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=out.dtype)
    g.requires_grad_(True)
    first = torch.autograd.grad(out, inputs, g, create_graph=True)
    # a loss on (some of) the first derivatives, differentiated again (what a map loss does)
    loss = out.sum() * 0.5 + sum(
        (d.square() * (k + 1)).sum() + d.sum() for k, d in enumerate(first) if k in loss_on
    )
    targets = [(*inputs, g)[k] for k in wrt_second]
    second = torch.autograd.grad(loss, targets, allow_unused=True)
    return (out.detach(), *(d.detach() for d in first), *second)


@pytest.mark.parametrize(
    ("loss_on", "wrt_second"),
    [((0, 1, 2), (0, 1, 2, 3)), ((0,), (0, 1, 2, 3)), ((1, 2), (0, 3)), ((0,), (1,))],
)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_pytorch_first_and_second_derivatives_and_running_stats(
    shape: tuple[int, ...], affine: bool, loss_on: tuple[int, ...], wrt_second: tuple[int, ...]
) -> None:
    x, w, b = _inputs(shape, affine)
    if not affine:
        loss_on = (0,)
        wrt_second = tuple(0 if k == 0 else 1 for k in wrt_second if k in (0, 3))
    if not wrt_second:
        return
    channels = shape[1]
    gen = torch.Generator().manual_seed(6)
    mean0 = torch.randn(channels, generator=gen, dtype=torch.float64)
    var0 = torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5
    running_expected = (mean0.clone(), var0.clone())
    running_got = (mean0.clone(), var0.clone())
    expected = _derivatives(F.batch_norm, x, w, b, running_expected, loss_on, wrt_second)
    got = _derivatives(native_batch_norm, x, w, b, running_got, loss_on, wrt_second)
    assert len(got) == len(expected)
    for e, o in zip(expected, got, strict=True):
        if e is None:  # allowed: PyTorch's backward may leave a zero gradient unused
            assert o is None or torch.count_nonzero(o) == 0
            continue
        assert o is not None
        torch.testing.assert_close(o, e)
    for e, o in zip(running_expected, running_got, strict=True):
        torch.testing.assert_close(o, e, rtol=0, atol=0)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("train", [True, False])
def test_routed_module_matches_pytorch(momentum: float | None, train: bool) -> None:
    """``nn.BatchNorm2d`` under ``LeanAutograd(double_backward=True)``: recorded as
    ``_BatchNorm`` in training mode only; outputs, a gradient of a gradient and the running
    statistics (``num_batches_tracked``, cumulative averages with ``momentum=None``) as without
    the mode."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(), nn.Conv2d(4, 3, 3)
    ).double()
    model.train(train)
    reference = copy.deepcopy(model)
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64, requires_grad=True)

    def step(net: nn.Module, lean: LeanAutograd | None) -> list[Tensor]:
        params = list(net.parameters())
        results: list[Tensor] = []
        for _ in range(2):  # twice: the running statistics' update is checked cumulatively
            if lean is None:
                out = net(x)
                (gx,) = torch.autograd.grad(out.square().sum(), [x], create_graph=True)
            else:
                with lean:
                    out = net(x)
                (gx,) = lean.grad(out.square().sum(), [x], create_graph=True)
            second = torch.autograd.grad(gx.square().sum() + out.sum(), params)
            results += [out.detach(), gx.detach(), *second]
        return results

    lean = LeanAutograd(tangents=False, double_backward=True)
    with lean:
        probe = copy.deepcopy(model)[:2](x)  # a copy: its running statistics move
    # the node of a custom Function is named after it: _BatchNorm -> "_BatchNormBackward"
    assert (type(probe.grad_fn).__name__ == "_BatchNormBackward") == train
    for e, o in zip(step(reference, None), step(model, lean), strict=True):
        torch.testing.assert_close(o, e)
    for e, o in zip(reference.state_dict().values(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(o, e)
