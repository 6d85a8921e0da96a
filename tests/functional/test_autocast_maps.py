"""Maps under bf16 autocast (``precision="bf16-mixed"``): the student's Jacobian pass keeps the
cheap rules of ``LeanAutograd`` (native low-precision kernels, closed-form double backward) and
gives the maps and map-loss gradients of PyTorch's own rules; every map method trains."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn

from lightning_layerkd import DistillationModule, LayerwiseLRCallback
from lightning_layerkd._autograd.mode import LeanAutograd
from lightning_layerkd.functional.derivatives import compute_maps
from lightning_layerkd.layers.hooks import FeatureHooks
from lightning_layerkd.methods import AttentionMaps, HessianMaps, JacobianMaps
from lightning_layerkd.models import resnet
from tests.helpers.models import (
    NUM_CLASSES,
    TINY_LAYERS,
    autograd_node_names,
    make_random_loader,
    make_tiny_cnn,
    make_trainer_kwargs,
)


def _maps_and_gradient(
    wrt: str, lean: bool, autocast: bool = True
) -> tuple[list[Tensor], list[Tensor], set[str]]:
    torch.manual_seed(0)
    model = resnet(10, 10, 8).train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (4,), generator=gen)
    names = ["layer1", "layer2", "layer3"]
    modules = [model.get_submodule(n) for n in names]
    if wrt == "weight":
        modules = [m[-1].conv2 for m in modules]  # type: ignore[index]
    hooks = FeatureHooks(modules, names)
    original = LeanAutograd._outside_autocast
    if not lean:  # PyTorch's own rules under autocast: what the mode did before
        LeanAutograd._outside_autocast = (  # type: ignore[method-assign]
            lambda self, func, types, args, kwargs, device: func(*args, **kwargs)
        )
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            _, maps = compute_maps(
                model, x, hooks, method="jacobian", wrt=wrt, target=y, create_graph=True
            )
    finally:
        LeanAutograd._outside_autocast = original  # type: ignore[method-assign]
        hooks.remove()
    loss = sum(m.float().square().sum() / m.float().sum().square() for m in maps)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    nodes = autograd_node_names(*maps)
    return (
        maps,
        [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params, strict=True)],
        nodes,
    )


@pytest.mark.parametrize("wrt", ["activation", "weight"])
def test_bf16_jacobian_maps_keep_the_lean_rules_and_pytorchs_values(wrt: str) -> None:
    maps, grads, nodes = _maps_and_gradient(wrt, lean=True)
    ref_maps, ref_grads, ref_nodes = _maps_and_gradient(wrt, lean=False)
    # the cheap nodes are in the graph under autocast; PyTorch's composite rules are not
    assert {"_ConvolutionBackward", "_BatchNormBackward"} <= nodes
    assert "NativeBatchNormBackwardBackward0" not in nodes
    assert "NativeBatchNormBackwardBackward0" in ref_nodes
    for m, ref in zip(maps, ref_maps, strict=True):
        assert m.dtype == ref.dtype
        torch.testing.assert_close(
            m.float(), ref.float(), rtol=2e-2, atol=1e-6 * float(ref.detach().max())
        )
    # bf16 map gradients are far from float32 ones (here 15-40% in norm, and by how much depends
    # on the CPU's bf16 kernels: AMX or not). The claim is that the cheap rules are as accurate
    # as PyTorch's own under autocast: their error against the float32 gradient is at most
    # PyTorch's, with a margin of a quarter of it plus 4 units of bf16 rounding (2^-8).
    exact = _maps_and_gradient(wrt, lean=True, autocast=False)[1]
    flat, ref_flat, exact_flat = (
        torch.cat([g.flatten().float() for g in gs]) for gs in (grads, ref_grads, exact)
    )
    assert float(exact_flat.norm()) > 0
    lean_error = float((flat - exact_flat).norm() / exact_flat.norm())
    pytorch_error = float((ref_flat - exact_flat).norm() / exact_flat.norm())
    assert lean_error <= 1.25 * pytorch_error + 4 * 2.0**-8, (lean_error, pytorch_error)


def test_convolution_operands_are_cast_like_autocast() -> None:
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = conv(x)
        with LeanAutograd(tangents=False, double_backward=True):
            got = conv(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    assert type(got.grad_fn).__name__ == "_ConvolutionBackward"
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "method",
    [
        AttentionMaps(),
        JacobianMaps(),
        JacobianMaps(wrt="weight"),
        HessianMaps(),
        HessianMaps(wrt="weight"),
    ],
    ids=["attention", "jacobian", "jacobian-weight", "hessian", "hessian-weight"],
)
def test_every_map_method_trains_in_a_bf16_mixed_fit(tmp_path, method) -> None:
    torch.manual_seed(0)
    teacher, student = make_tiny_cnn(width=8).eval(), make_tiny_cnn(width=4)
    module = DistillationModule(
        teacher, student, method=method, layers=TINY_LAYERS, num_classes=NUM_CLASSES
    )
    before = [p.detach().clone() for p in student.parameters()]
    trainer = pl.Trainer(
        **make_trainer_kwargs(tmp_path, max_epochs=2, precision="bf16-mixed"),
        callbacks=[LayerwiseLRCallback(every_n_epochs=1)],
    )
    trainer.fit(module, make_random_loader(16, batch_size=8))
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and float(metrics["train/map_loss"]) > 0
    assert all(torch.isfinite(p).all() for p in student.parameters())
    assert all(not torch.equal(a, p) for a, p in zip(before, student.parameters(), strict=True))
    rates = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}
    assert rates["0"] != rates["base"]  # the layer-wise rule acted on the divergences
