"""Attention, Jacobian and Hessian maps (docs/design.md section 3), checked against independent
math.

The derivative maps are compared with ``torch.autograd.functional`` Jacobians and Hessians of the
score ``sum_i s_i`` written out here, on a tiny float64 CNN. With batch norm in eval mode the net
is piecewise linear in one layer's weight (or output), so the library's Gauss-Newton Hessian is
exact for that block and can be compared with the true Hessian entry by entry.
"""

from __future__ import annotations

import copy
import itertools
from contextlib import nullcontext
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

import lightning_layerkd.layers.hooks as hooks_module
from lightning_layerkd import DistillationModule
from lightning_layerkd.functional.derivatives import compute_maps, hessian_map, jacobian_map
from lightning_layerkd.functional.divergence import js_divergence
from lightning_layerkd.functional.maps import attention_map, match_maps, score, to_distribution
from lightning_layerkd.layers.hooks import FeatureHooks
from lightning_layerkd.methods import JacobianMaps
from lightning_layerkd.models import resnet
from tests.helpers.models import autograd_node_names

B = 4  # batch size; inputs are (B, 3, 5, 5)


def cnn64(seed: int = 0, mid: int = 4, out: int = 6, k: int = 3) -> nn.Sequential:
    """conv-BN-ReLU, conv(no bias)-BN-ReLU, pool, linear; float64, non-trivial BN statistics."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, mid, 3, padding=1),
        nn.BatchNorm2d(mid),
        nn.ReLU(),
        nn.Conv2d(mid, out, k, padding=k // 2, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(out, 3),
    ).double()
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.normal_(0.0, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.5)
    return model


def batch(seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 5, 5, generator=g, dtype=torch.float64), torch.tensor([0, 2, 1, 2])


def total_score(z: Tensor, y: Tensor, task: str = "multiclass") -> Tensor:
    """``sum_i s_i`` in the logits' own precision, written independently of the library."""
    if task == "multiclass":
        return torch.log_softmax(z, dim=-1)[torch.arange(len(z)), y].sum()
    return (F.logsigmoid(z) * y).sum()


def score_of_weight(model: nn.Module, name: str, x: Tensor, y: Tensor, task: str = "multiclass"):
    """``W -> sum_i s_i`` with the parameter ``name`` replaced by ``W``."""
    return lambda w: total_score(functional_call(model, {name: w}, (x,)), y, task)


def score_of_features(model: nn.Sequential, index: int, y: Tensor):
    """``F -> sum_i s_i`` where ``F`` is the output of ``model[index]``."""
    return lambda f: total_score(model[index + 1 :](f), y)


def rademacher(shape: torch.Size, g: torch.Generator) -> Tensor:
    """The library's probe draw (``rademacher_like``), reproduced for a seeded generator."""
    return (torch.randint(0, 2, shape, generator=g) * 2 - 1).double()


def hutchinson(h: Tensor, probes: list[Tensor]) -> Tensor:
    """``mean_k v_k * (H v_k)`` for an (N, N) matrix and probes of any shape with N entries."""
    return torch.stack([v * (h @ v.flatten()).view_as(v) for v in probes]).mean(0)


def assert_close32(got: Tensor, expected: Tensor) -> None:
    """The library computes the score in float32 (see test_float64_precision), so compare at
    float32 precision relative to the map's scale; a wrong formula is off by far more."""
    assert float(expected.abs().max()) > 1e-8, "reference map is degenerate"
    scale = float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * scale)


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


# --------------------------------------------------------------------------- attention


def test_attention_map_by_definition() -> None:
    torch.manual_seed(0)
    f = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    p2 = torch.zeros(2, 4, 5, dtype=torch.float64)
    p1 = torch.zeros(2, 4, 5, dtype=torch.float64)
    for b, c, i, j in itertools.product(range(2), range(3), range(4), range(5)):
        p2[b, i, j] += abs(float(f[b, c, i, j])) ** 2
        p1[b, i, j] += abs(float(f[b, c, i, j]))
    got = attention_map(f)
    assert got.shape == (2, 4, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), p2, rtol=1e-6, atol=0)
    torch.testing.assert_close(attention_map(f, p=1).double(), p1, rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [(2, 3, 4), (2, 3, 4, 5, 6)])
def test_attention_map_rejects_non_4d(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        attention_map(torch.randn(shape))


# --------------------------------------------------------------------------- distributions


def test_to_distribution_normalises_each_row() -> None:
    torch.manual_seed(0)
    m = torch.rand(3, 4, 5, dtype=torch.float64) * torch.tensor([1.0, 1e-9, 1e6]).view(3, 1, 1)
    p = to_distribution(m)
    assert p.shape == (3, 20) and p.dtype == torch.float32
    torch.testing.assert_close(p.sum(1), torch.ones(3), rtol=0, atol=1e-6)
    expected = (m.flatten(1) / m.flatten(1).sum(1, keepdim=True)).float()  # d is negligible
    torch.testing.assert_close(p, expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("c", [1e-12, 1e-3, 7.0, 1e9])
def test_to_distribution_is_scale_invariant(c: float) -> None:
    torch.manual_seed(0)
    m = torch.rand(2, 6, 6, dtype=torch.float64)
    m[0, :3] = 0.0  # exact zeros get the same (relative) floor at any scale
    torch.testing.assert_close(to_distribution(c * m), to_distribution(m), rtol=1e-6, atol=1e-9)


def test_to_distribution_zero_map_is_uniform_and_half_is_upcast() -> None:
    torch.manual_seed(0)
    zero = to_distribution(torch.zeros(2, 3, 3))
    torch.testing.assert_close(zero, torch.full((2, 9), 1 / 9), rtol=1e-6, atol=0)
    half = to_distribution(torch.rand(2, 3, 3).half())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.sum(1), torch.ones(2), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="batch dimension"):
        to_distribution(torch.rand(5))


# --------------------------------------------------------------------------- matching


def test_match_maps_pools_the_larger_spatial_map() -> None:
    torch.manual_seed(0)
    big, small = torch.rand(3, 8, 8, dtype=torch.float64), torch.rand(3, 4, 4, dtype=torch.float64)
    by_hand = big.view(3, 4, 2, 4, 2).mean(dim=(2, 4)).flatten(1)  # avg_pool2d(2) by hand
    s, t = match_maps(big, small)
    torch.testing.assert_close(s, by_hand, rtol=0, atol=1e-15)
    torch.testing.assert_close(t, small.flatten(1), rtol=0, atol=0)
    s, t = match_maps(small, big)  # the teacher's map may be the larger one
    torch.testing.assert_close(s, small.flatten(1), rtol=0, atol=0)
    torch.testing.assert_close(t, by_hand, rtol=0, atol=1e-15)


def test_match_maps_weight_maps_index() -> None:
    torch.manual_seed(0)
    w8, w4 = torch.rand(8, 4, 3, 3), torch.rand(4, 4, 3, 3)
    s, t = match_maps(w4, w4 * 2, "index")  # equal shapes: flattened, one distribution a batch
    assert s.shape == t.shape == (1, 144)
    torch.testing.assert_close(t, 2 * w4.reshape(1, -1))
    s, t = match_maps(w8, w4, "index")  # per-output-channel sums, pooled 8 -> 4: pairs averaged
    sums8 = [float(w8[o].sum()) for o in range(8)]
    expected = torch.tensor([[(sums8[2 * i] + sums8[2 * i + 1]) / 2 for i in range(4)]])
    torch.testing.assert_close(s, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(t, torch.stack([w4[o].sum() for o in range(4)]).view(1, 4))


def test_match_maps_weight_maps_sorted() -> None:
    """The default: per-output-channel energies in decreasing order, pooled to the smaller
    count; invariant to permuting output and input channels."""
    torch.manual_seed(0)
    w8, w4 = torch.rand(8, 4, 3, 3), torch.rand(4, 4, 3, 3)
    s, t = match_maps(w8, w4)
    sums8 = sorted((float(w8[o].sum()) for o in range(8)), reverse=True)
    expected = torch.tensor([[(sums8[2 * i] + sums8[2 * i + 1]) / 2 for i in range(4)]])
    torch.testing.assert_close(s, expected, rtol=1e-6, atol=0)
    sums4 = sorted((float(w4[o].sum()) for o in range(4)), reverse=True)
    torch.testing.assert_close(t, torch.tensor([sums4]), rtol=1e-6, atol=0)
    shuffled = w8[torch.randperm(8)][:, torch.randperm(4)]
    torch.testing.assert_close(match_maps(shuffled, w4)[0], s, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match=r"weight_alignment must be one of \['sorted', 'index'\]"):
        match_maps(w8, w4, "greedy")  # type: ignore[arg-type]


def _permuted_copy(student: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``student`` whose hidden channels in ``layer2.0`` (conv1's outputs, bn1,
    conv2's inputs) are permuted: the same function, permuted weight maps."""
    teacher = copy.deepcopy(student)
    block = teacher.layer2[0]
    perm = torch.randperm(block.conv1.out_channels, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        block.conv1.weight.copy_(block.conv1.weight[perm])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(block.bn1, name).copy_(getattr(block.bn1, name)[perm])
        block.conv2.weight.copy_(block.conv2.weight[:, perm])
    return teacher


def test_sorted_alignment_sees_through_a_function_preserving_permutation() -> None:
    """A teacher that is the student with permuted hidden channels (equal
    logits) has the same Jacobian weight maps up to the permutation. The default alignment gives
    JSD < 1e-4 on every layer; index alignment reports a large divergence on the permuted one."""
    torch.manual_seed(0)
    student = resnet(10, num_classes=10, width=8)
    with torch.no_grad():
        student(torch.randn(64, 3, 16, 16))  # non-trivial running statistics
    student.eval()
    teacher = _permuted_copy(student)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    torch.testing.assert_close(teacher(x), student(x), rtol=0, atol=1e-5)
    jsd = {}
    for alignment in ("sorted", "index"):
        module = DistillationModule(
            teacher,
            student,
            method=JacobianMaps(wrt="weight", weight_alignment=alignment),
            num_classes=10,
            layers=["layer1", "layer2", "layer3"],
        )
        module.student.eval()
        _, divergences = module.layer_divergences(x, y, create_graph=False)
        jsd[alignment] = {name: float(d[0]) for name, d in divergences.items()}
    assert all(value < 1e-4 for value in jsd["sorted"].values()), jsd
    assert jsd["index"]["layer2"] > 0.1, jsd
    assert jsd["index"]["layer1"] < 1e-4  # untouched layers agree either way


# --------------------------------------------------------------------------- score


def test_score_multiclass_and_multilabel() -> None:
    torch.manual_seed(0)
    z = torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([3, 0, 1, 1, 2])
    expected = [torch.log(torch.exp(z[i, y[i]]) / torch.exp(z[i]).sum()) for i in range(5)]
    torch.testing.assert_close(score(z, y).double(), torch.stack(expected), rtol=1e-6, atol=0)
    labels = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0], [0, 0, 0, 1]])
    expected = [
        sum(-torch.log1p(torch.exp(-z[i, k])) for k in range(4) if labels[i, k]) for i in range(5)
    ]
    expected = torch.stack([torch.as_tensor(e, dtype=torch.float64) for e in expected])
    got = score(z, labels, task="multilabel").double()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- jacobian maps


@pytest.mark.parametrize("train", [False, True], ids=["bn_eval", "bn_train"])
@pytest.mark.parametrize("path", ["0", "3"])
def test_jacobian_weight_map(train: bool, path: str) -> None:
    model, (x, y) = cnn64().train(train), batch()
    w = model.get_submodule(path).weight.detach().clone()
    g = jacobian(score_of_weight(model, f"{path}.weight", x, y), w)
    (got,) = jacobian_map(model, x, [path], y, wrt="weight")
    assert got.shape == w.shape and got.dtype == torch.float64
    assert_close32(got, g**2)


@pytest.mark.parametrize("train", [False, True], ids=["bn_eval", "bn_train"])
@pytest.mark.parametrize("index", [1, 2])
def test_jacobian_activation_map(train: bool, index: int) -> None:
    model, (x, y) = cnn64().train(train), batch()
    (got,) = jacobian_map(model, x, [str(index)], y, wrt="activation")
    f = model[: index + 1](x).detach()
    g = jacobian(score_of_features(model, index, y), f)  # (B, C, H, W)
    assert got.shape == (B, 5, 5)
    assert_close32(got, (g**2).sum(dim=1))


def test_jacobian_multilabel() -> None:
    model, (x, _) = cnn64().eval(), batch()
    labels = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 1], [0, 1, 0]], dtype=torch.float64)
    w = model[3].weight.detach().clone()
    g = jacobian(score_of_weight(model, "3.weight", x, labels, task="multilabel"), w)
    (got,) = jacobian_map(model, x, ["3"], labels, task="multilabel", wrt="weight")
    assert_close32(got, g**2)


@pytest.mark.parametrize("method", ["jacobian", "hessian"])
def test_default_target_is_the_arg_max(method: str) -> None:
    model, (x, _) = cnn64().eval(), batch()
    top = model(x).argmax(dim=-1)
    fn = jacobian_map if method == "jacobian" else hessian_map
    kw = {} if method == "jacobian" else {"generator": torch.Generator().manual_seed(0)}
    (default,) = fn(model, x, ["3"], **kw)
    kw = {} if method == "jacobian" else {"generator": torch.Generator().manual_seed(0)}
    (explicit,) = fn(model, x, ["3"], top, **kw)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    (other,) = fn(model, x, ["3"], (top + 1) % 3, **kw)
    assert not torch.allclose(default, other)


# --------------------------------------------------------------------------- hessian maps


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_hessian_weight_map_reproduces_hutchinson_with_exact_hessian(task: str) -> None:
    model, (x, y) = cnn64().eval(), batch()
    if task == "multilabel":
        y = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 1], [0, 1, 0]], dtype=torch.float64)
    w = model[3].weight.detach().clone()
    h = hessian(score_of_weight(model, "3.weight", x, y, task), w, vectorize=True)
    h = h.reshape(w.numel(), -1)
    g = torch.Generator().manual_seed(7)
    probes = [rademacher(w.shape, g) for _ in range(3)]
    gen = torch.Generator().manual_seed(7)
    (got,) = hessian_map(model, x, ["3"], y, task=task, num_probes=3, generator=gen, wrt="weight")
    assert got.shape == w.shape and got.dtype == torch.float64
    assert_close32(got, hutchinson(h, probes).abs())


def cnn64_1x1() -> nn.Sequential:
    """``model[3]`` is a 1x1 conv 2 -> 2: four weight entries, so 2^4 sign vectors."""
    return cnn64(seed=1, mid=2, out=2, k=1).eval()


def test_hessian_estimate_over_all_sign_vectors_is_the_diagonal(monkeypatch) -> None:
    model, (x, y) = cnn64_1x1(), batch(1)
    w = model[3].weight.detach().clone()
    h = hessian(score_of_weight(model, "3.weight", x, y), w).reshape(4, 4)
    off = h - torch.diag(h.diagonal())
    assert float(off.abs().max()) > 0.1 * float(h.diagonal().abs().max())  # cross terms matter
    signs = [
        torch.tensor(s, dtype=torch.float64).view(w.shape)
        for s in itertools.product([-1.0, 1.0], repeat=4)
    ]
    # the identity E[v * (H v)] = diag(H), exactly, averaging over all 16 sign vectors
    torch.testing.assert_close(hutchinson(h, signs).flatten(), h.diagonal(), rtol=0, atol=1e-12)
    # the library fed those 16 vectors as its probes gives |diag(H)|
    feed = iter(signs)
    monkeypatch.setattr(hooks_module, "rademacher_like", lambda like, *a, **k: next(feed))
    (got,) = hessian_map(model, x, ["3"], y, num_probes=16, wrt="weight")
    assert next(feed, None) is None
    assert_close32(got.flatten(), h.diagonal().abs())


def test_hessian_estimate_converges_with_many_probes() -> None:
    model, (x, y) = cnn64_1x1(), batch(1)
    w = model[3].weight.detach().clone()
    h = hessian(score_of_weight(model, "3.weight", x, y), w).reshape(4, 4)
    n = 256
    (got,) = hessian_map(
        model, x, ["3"], y, num_probes=n, generator=torch.Generator().manual_seed(3), wrt="weight"
    )
    # entry i errs by sum_{j != i} H_ij mean_k(v_ki v_kj); each mean has std 1/sqrt(n), so the
    # error's std is sigma_i = sqrt(sum_{j != i} H_ij^2 / n). 5 sigma never fails by chance.
    sigma = ((h**2).sum(1) - h.diagonal() ** 2).sqrt() / n**0.5
    err = (got.flatten() - h.diagonal().abs()).abs()
    assert (err <= 5 * sigma + 1e-6).all(), (err, sigma)
    assert float(5 * sigma.max()) < 0.1 * float(h.diagonal().abs().max())  # and it is tight


def test_hessian_activation_map_reproduces_hutchinson_with_exact_hessian() -> None:
    model, (x, y) = cnn64().eval(), batch()
    f = model[:3](x).detach()
    h = hessian(score_of_features(model, 2, y), f, vectorize=True).reshape(f.numel(), -1)
    g = torch.Generator().manual_seed(5)
    probes = [rademacher(f.shape, g) for _ in range(2)]
    gen = torch.Generator().manual_seed(5)
    (got,) = hessian_map(model, x, ["2"], y, wrt="activation", num_probes=2, generator=gen)
    assert got.shape == (B, 5, 5)
    assert_close32(got, hutchinson(h, probes).abs().sum(dim=1))


def test_two_layers_share_one_pass_with_probes_drawn_in_forward_order() -> None:
    """One forward pass carries both layers' probes, so each map is ``v_j * (GN v)_j`` for the
    joint Gauss-Newton matrix ``GN = J^T H_z J`` of (W0, W3); its mean is still diag(H_jj)."""
    model, (x, y) = cnn64().eval(), batch()
    w0, w3 = model[0].weight.detach().clone(), model[3].weight.detach().clone()

    def logits(a: Tensor, b: Tensor) -> Tensor:
        return functional_call(model, {"0.weight": a, "3.weight": b}, (x,))

    j0, j3 = jacobian(logits, (w0, w3))
    j = torch.cat([j0.reshape(B * 3, -1), j3.reshape(B * 3, -1)], dim=1)
    p = torch.softmax(logits(w0, w3), dim=-1).detach()
    hz = torch.block_diag(*[torch.diag(pi) - torch.outer(pi, pi) for pi in p])
    g = torch.Generator().manual_seed(11)
    v0, v3 = rademacher(w0.shape, g), rademacher(w3.shape, g)  # conv "0" runs first
    v = torch.cat([v0.flatten(), v3.flatten()])
    est = (v * (j.T @ hz @ j @ v)).abs()
    gen = torch.Generator().manual_seed(11)
    got3, got0 = hessian_map(model, x, ["3", "0"], y, generator=gen, wrt="weight")
    assert_close32(got0.flatten(), est[: w0.numel()])
    assert_close32(got3.flatten(), est[w0.numel() :])


@pytest.mark.parametrize("path", ["0", "3"])
def test_float64_precision_of_derivative_maps(path: str) -> None:
    """A float64 model gets float64-exact maps (the other tests compare at float32 precision)."""
    model, (x, y) = cnn64().eval(), batch()
    w = model.get_submodule(path).weight.detach().clone()
    fn = score_of_weight(model, f"{path}.weight", x, y)
    (jac,) = jacobian_map(model, x, [path], y, wrt="weight")
    h = hessian(fn, w, vectorize=True).reshape(w.numel(), -1)
    probes = [rademacher(w.shape, torch.Generator().manual_seed(2))]
    (hes,) = hessian_map(
        model, x, [path], y, generator=torch.Generator().manual_seed(2), wrt="weight"
    )
    ok_jac = torch.allclose(jac, jacobian(fn, w) ** 2, rtol=0, atol=1e-12)
    ok_hes = torch.allclose(hes, hutchinson(h, probes).abs(), rtol=0, atol=1e-10)
    assert ok_jac and ok_hes, (ok_jac, ok_hes)


# --------------------------------------------------------------------------- training through maps


def _map_at_3(model: nn.Module, x: Tensor, y: Tensor, method: str, wrt: str, create: bool):
    if method == "jacobian":
        return jacobian_map(model, x, ["3"], y, wrt=wrt, create_graph=create)[0]
    gen = torch.Generator().manual_seed(0)
    return hessian_map(model, x, ["3"], y, wrt=wrt, generator=gen, create_graph=create)[0]


@pytest.mark.parametrize("wrt", ["weight", "activation"])
@pytest.mark.parametrize("method", ["jacobian", "hessian"])
def test_map_loss_trains_earlier_layers_through_train_mode_bn(method: str, wrt: str) -> None:
    model, (x, y) = cnn64().train(), batch()
    constant = _map_at_3(model, x, y, method, wrt, create=False)
    assert constant.grad_fn is None and not constant.requires_grad
    m = _map_at_3(model, x, y, method, wrt, create=True)
    assert m.grad_fn is not None
    model.zero_grad()
    m.sum().backward()  # model[0] is upstream of the map's layer: gradient only via the map
    grad = model[0].weight.grad
    assert grad is not None and torch.isfinite(grad).all() and float(grad.abs().max()) > 1e-6


@pytest.mark.parametrize(
    ("method", "train"), [("jacobian", False), ("jacobian", True), ("hessian", False)]
)
def test_map_loss_gradient_value(method: str, train: bool) -> None:
    """d sum(map) / d W0, against double (jacobian) or triple (hessian) backward by hand.
    (Training-mode BN has no third derivative, so the hessian case is checked in eval mode.)"""
    model, (x, y) = cnn64().train(train), batch()
    w0 = model[0].weight.detach().clone().requires_grad_(True)
    w3 = model[3].weight.detach().clone().requires_grad_(True)
    s = total_score(functional_call(model, {"0.weight": w0, "3.weight": w3}, (x,)), y)
    (g,) = torch.autograd.grad(s, w3, create_graph=True)
    if method == "jacobian":
        loss = (g**2).sum()
    else:
        v = rademacher(w3.shape, torch.Generator().manual_seed(0))
        (hv,) = torch.autograd.grad(g, w3, v, create_graph=True)
        loss = (v * hv).abs().sum()
    (expected,) = torch.autograd.grad(loss, w0)
    model.zero_grad()
    _map_at_3(model, x, y, method, "weight", create=True).sum().backward()
    torch.testing.assert_close(
        model[0].weight.grad, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max())
    )


@pytest.mark.parametrize("wrt", ["weight", "activation"])
def test_hessian_map_gradient_in_train_mode_matches_finite_differences(wrt: str) -> None:
    """Training-mode BN has no third derivative, so here the reference is a central difference
    of the (fixed-probe) map itself; it sees the batch statistics' dependence on the weights."""
    model, (x, y) = cnn64().train(), batch()
    model.zero_grad()
    _map_at_3(model, x, y, "hessian", wrt, create=True).sum().backward()
    grad = model[0].weight.grad.clone()
    weight, h = model[0].weight, 1e-6
    for entry in [(0, 0, 1, 1), (1, 2, 0, 2), (3, 1, 2, 0)]:
        with torch.no_grad():
            old = weight[entry].item()
            weight[entry] = old + h
            up = _map_at_3(model, x, y, "hessian", wrt, create=False).sum().item()
            weight[entry] = old - h
            down = _map_at_3(model, x, y, "hessian", wrt, create=False).sum().item()
            weight[entry] = old
        fd = (up - down) / (2 * h)
        assert grad[entry].item() == pytest.approx(fd, rel=1e-5, abs=1e-7 * abs(up))


# --------------------------------------------------------------------------- hygiene and errors


def test_hooks_removed_and_frozen_weights_stay_frozen() -> None:
    model, (x, y) = cnn64().eval(), batch()
    (reference,) = jacobian_map(model, x, ["3"], y, wrt="weight")
    hessian_map(model, x, ["2"], y, wrt="activation")
    assert no_hooks(model)
    with pytest.raises(ValueError):
        hessian_map(model, x, ["3"], y, num_probes=0, wrt="weight")
    assert no_hooks(model)  # removed even when the call fails
    model.requires_grad_(False)
    (frozen,) = jacobian_map(model, x, ["3"], y, wrt="weight")
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(frozen, reference, rtol=0, atol=0)
    assert no_hooks(model)


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"method": "gradient"}, ["attention", "jacobian", "hessian"]),
        ({"method": "jacobian", "wrt": "input"}, ["weight", "activation"]),
        ({"method": "hessian", "num_probes": 0}, ["at least 1"]),
    ],
)
def test_compute_maps_rejects_invalid_options(kwargs: dict, names: list[str]) -> None:
    model, (x, _) = cnn64(), batch()
    hooks = FeatureHooks([model[3]], ["3"])
    try:
        with pytest.raises(ValueError) as info:
            compute_maps(model, x, hooks, **kwargs)
    finally:
        hooks.remove()
    assert all(name in str(info.value) for name in names), str(info.value)


# --------------------------------------------------------------------------- forward-mode convs
@pytest.mark.parametrize(
    ("conv", "shape", "dual_x", "dual_w", "dual_b"),
    [
        (F.conv2d, (2, 4, 6, 6), True, False, False),
        (F.conv2d, (2, 4, 6, 6), False, True, False),
        (F.conv2d, (2, 4, 6, 6), True, True, True),
        (F.conv1d, (2, 4, 7), True, True, False),
    ],
)
@pytest.mark.parametrize("double_backward", [False, True])
def test_tangent_convolutions_match_pytorch_jvp_and_its_gradient(
    conv, shape, dual_x, dual_w, dual_b, double_backward
):
    """The zero-skipping convolution JVP: same primal, same tangent, same reverse-mode gradient
    through the tangent as PyTorch's own formula (strided, padded, grouped)."""
    import torch.autograd.forward_ad as fwAD

    from lightning_layerkd._autograd.mode import LeanAutograd

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, *([3] * (len(shape) - 2)), generator=gen, dtype=torch.float64)
    w.requires_grad_(True)
    b = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    tangents = [torch.randn_like(t) for t in (x, w, b)]

    def run(mode: bool) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        lean = LeanAutograd(tangents=True, double_backward=double_backward)
        with fwAD.dual_level(), lean if mode else nullcontext():
            args = [
                fwAD.make_dual(t, v) if flag else t
                for t, v, flag in zip((x, w, b), tangents, (dual_x, dual_w, dual_b), strict=True)
            ]
            primal, tangent = fwAD.unpack_dual(conv(*args, 2, 1, 1, 2))
        grads = torch.autograd.grad((tangent.square().sum() + primal.sum()), (x, w, b))
        return primal.detach(), tangent.detach(), grads

    expected, got = run(False), run(True)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    for g, e in zip(got[2], expected[2], strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("training", [True, False])
def test_lean_batch_norm_tangent_matches_the_formula_stats_and_gradient(training):
    """Batch norm's tangent through its backward kernel against the JVP written out by hand:
    same primal, tangent and reverse-mode gradients (input, tangent, affine weights), and the
    running statistics of ``F.batch_norm``. (PyTorch 2.14's own forward-mode rule for training
    mode loses the batch statistics' dependence on the input in reverse mode: its ``d/dx``
    differs from this formula.)"""
    import torch.autograd.forward_ad as fwAD

    from lightning_layerkd._autograd.mode import LeanAutograd

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    x_t = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(3, generator=gen, dtype=torch.float64).add(0.5).requires_grad_(True)
    bias = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    scale = torch.arange(75.0, dtype=torch.float64).view(3, 5, 5)
    eps, momentum = 1e-5, 0.1

    def running() -> tuple[Tensor, Tensor]:
        return (
            torch.linspace(-0.5, 0.5, 3, dtype=torch.float64),
            torch.linspace(0.5, 2.0, 3, dtype=torch.float64),
        )

    def outputs(primal: Tensor, tangent: Tensor) -> tuple[Tensor, ...]:
        loss = (tangent.square() * scale).sum() + primal.square().sum()
        return primal.detach(), tangent.detach(), *torch.autograd.grad(loss, (x, x_t, weight, bias))

    mean, var = running()
    with fwAD.dual_level(), LeanAutograd(tangents=True, double_backward=False):
        out = F.batch_norm(fwAD.make_dual(x, x_t), mean, var, weight, bias, training, momentum, eps)
        got = outputs(*fwAD.unpack_dual(out))

    # by hand: y = w * xhat + b; y_t = w * d(xhat) (batch statistics follow x in training)
    dims = (0, 2, 3)
    if training:
        mu = x.mean(dims, keepdim=True)
        inv = (x.var(dims, unbiased=False, keepdim=True) + eps).rsqrt()
        xhat = (x - mu) * inv
        t_hat = x_t - x_t.mean(dims, keepdim=True) - xhat * (x_t * xhat).mean(dims, keepdim=True)
        t_hat = t_hat * inv
    else:
        m0, v0 = running()
        inv = (v0 + eps).rsqrt().view(1, -1, 1, 1)
        xhat, t_hat = (x - m0.view(1, -1, 1, 1)) * inv, x_t * inv
    w, b = weight.view(1, -1, 1, 1), bias.view(1, -1, 1, 1)
    expected = outputs(xhat * w + b, t_hat * w)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
    expected_mean, expected_var = running()
    F.batch_norm(x.detach(), expected_mean, expected_var, None, None, training, momentum, eps)
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(var, expected_var)


def test_lean_batch_norm_output_takes_in_place_ops_without_copy_slices():
    """An in-place ReLU after batch norm (as in torchvision's ResNets) must not put a
    CopySlices node into the reverse graph of the dual output, and must give the gradient of
    the out-of-place network."""
    import torch.autograd.forward_ad as fwAD

    from lightning_layerkd._autograd.mode import LeanAutograd

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    x_t = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64)

    def run(inplace: bool) -> tuple[set[str], Tensor]:
        with fwAD.dual_level(), LeanAutograd(tangents=True, double_backward=False):
            out = F.relu(F.batch_norm(fwAD.make_dual(x, x_t), None, None, training=True), inplace)
            primal, tangent = fwAD.unpack_dual(out)
        loss = tangent.square().sum() + primal.sum()
        return autograd_node_names(loss), torch.autograd.grad(loss, x)[0]

    names, grad = run(inplace=True)
    assert not any("CopySlices" in name for name in names), sorted(names)
    torch.testing.assert_close(grad, run(inplace=False)[1])


@pytest.mark.parametrize(
    ("conv", "shape", "stride", "padding", "dilation", "groups", "bias"),
    [
        (F.conv2d, (2, 4, 7, 7), 1, 1, 1, 1, False),
        (F.conv2d, (2, 4, 7, 7), 2, (1, 2), 1, 2, True),
        (F.conv2d, (2, 4, 8, 8), 1, 2, 2, 1, True),
        (F.conv1d, (2, 4, 9), 2, 1, 1, 1, True),
        (F.conv3d, (1, 2, 4, 4, 4), 1, 1, 1, 1, False),
    ],
)
def test_native_double_backward_convolution_matches_pytorch(
    conv, shape, stride, padding, dilation, groups, bias
):
    """The convolution recorded under ``double_backward``: same output, first and second
    derivatives as PyTorch's convolution (a gradient of a gradient w.r.t. input, weight, bias and
    the output gradient), and ``gradgradcheck`` against finite differences."""
    from lightning_layerkd._autograd.convolution import native_convolution

    gen = torch.Generator().manual_seed(3)
    dims = len(shape) - 2
    x = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, shape[1] // groups, *([3] * dims), generator=gen, dtype=torch.float64)
    w.requires_grad_(True)
    b = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = (x, w) if b is None else (x, w, b)
    params = (stride, padding, dilation, groups)

    def derivatives(fn) -> tuple[Tensor, ...]:
        out = fn(x, w, b, *params)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=out.dtype)
        g.requires_grad_(True)
        first = torch.autograd.grad(out, inputs, g, create_graph=True)
        # a loss on the first derivatives, differentiated again (what a map loss does)
        loss = sum((d.square() * (k + 1)).sum() for k, d in enumerate(first)) + out.sum()
        second = torch.autograd.grad(loss, (*inputs, g))
        return (out.detach(), *(d.detach() for d in first), *second)

    expected = derivatives(conv)
    got = derivatives(partial(native_convolution, conv))
    for e, o in zip(expected, got, strict=True):
        torch.testing.assert_close(o, e)
    assert torch.autograd.gradgradcheck(
        lambda *t: native_convolution(conv, t[0], t[1], t[2] if bias else None, *params), inputs
    )


def test_native_double_backward_computes_only_the_requested_gradients():
    """Asked for the input's gradient only, the recorded convolutions run no weight-gradient
    kernel (PyTorch's own convolution prunes the same way); ``backward()`` computes all."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lightning_layerkd._autograd.mode import LeanAutograd

    masks: list[tuple[bool, ...]] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func is torch.ops.aten.convolution_backward.default:
                masks.append(tuple(args[-1]))
            return func(*args, **(kwargs or {}))

    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 3))
    x = torch.randn(2, 2, 8, 8, requires_grad=True)
    lean = LeanAutograd(tangents=False, double_backward=True)
    with lean:
        out = model(x)
    with Record():
        (gx,) = lean.grad(out.square().sum(), [x], create_graph=True)
    assert masks == [(True, False, False)] * 2
    masks.clear()
    with Record():
        gx.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert (False, True, False) in masks  # the weight term of the double backward


# ------------------------------------------------------------- Hessian maps: roles and probes
@pytest.mark.parametrize("wrt", ["weight", "activation"])
def test_hessian_maps_are_the_same_quantity_in_both_roles(wrt: str) -> None:
    """The same network as teacher (no graph) and as student (``create_graph=True``, the
    custom double backward) gives the same Hessian maps for the same probe draws: a JSD
    between the roles comes from the draws alone."""
    torch.manual_seed(0)
    net = resnet(10, num_classes=10, width=4).eval()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    layers = ["layer1", "layer2", "layer3"]
    options = dict(wrt=wrt, num_probes=3)
    teacher = hessian_map(net, x, layers, y, generator=torch.Generator().manual_seed(5), **options)
    student = hessian_map(
        net, x, layers, y, generator=torch.Generator().manual_seed(5), create_graph=True, **options
    )
    for t, s in zip(teacher, student, strict=True):
        # float32 sums of many products in two orders: compared relative to the map's scale
        # (16 float32 epsilons of its largest entry; small entries carry no relative bound)
        scale = float(t.abs().max())
        atol = 16 * torch.finfo(torch.float32).eps * scale
        torch.testing.assert_close(s.detach(), t, rtol=0.0, atol=atol)
        assert s.requires_grad and not t.requires_grad


def _draw_to_draw(net: nn.Module, x: Tensor, y: Tensor, wrt: str, probes: int) -> float:
    values = []
    for r in range(4):
        seeds = (torch.Generator().manual_seed(2 * r), torch.Generator().manual_seed(2 * r + 1))
        a, b = (
            hessian_map(net, x, ["0"], y, wrt=wrt, num_probes=probes, generator=g)[0] for g in seeds
        )
        p, q = (to_distribution(m) for m in match_maps(a, b, "index"))
        values.append(float(js_divergence(p, q).mean()))
    return sum(values) / len(values)


@pytest.mark.parametrize("wrt", ["weight", "activation"])
def test_hessian_probes_average_out_as_one_over_probes(wrt: str) -> None:
    """Where the map has fewer entries than the Gauss-Newton matrix's rank (54 weights, or 8
    activations a sample, against batch x 9), the Hutchinson estimate converges: the JSD
    between two independent draws falls about 4x per 4x probes (measured 4.3x and 5.0x from
    32 to 128 probes). With many more entries than the rank (a ResNet layer) the off-diagonal
    terms dominate every entry and the normalised map's noise does not shrink with probes;
    there the sorted alignment's per-channel sums carry the signal (benchmarks/RESULTS.md)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 2, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(2, 3, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 10),
    ).eval()
    x, y = torch.randn(64, 3, 2, 2), torch.randint(0, 10, (64,))
    few, many = _draw_to_draw(net, x, y, wrt, 32), _draw_to_draw(net, x, y, wrt, 128)
    assert 2.5 < few / many < 8.0, (few, many)
