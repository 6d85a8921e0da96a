"""Logit losses (lightning_layerkd.methods.logit_losses) and the methods built on them
(DecoupledKD, DIST, LogitDistillation with standardize): weights, DKD's warm-up, composition with
a feature method, term names, labels, options and refused options."""

from __future__ import annotations

import importlib
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import rel_entr, softmax
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_layerkd import DistillationModule
from lightning_layerkd.methods import (
    DIST,
    AttentionMaps,
    DecoupledKD,
    DistillationMethod,
    DISTLoss,
    DKDLoss,
    InformationFlow,
    JacobianMatching,
    KDLoss,
    LogitDistillation,
    MethodOutput,
    Networks,
    build_method,
)
from lightning_layerkd.models import resnet
from tests.helpers.models import make_trainer_kwargs

CLASSES = 5
PAIRS = [("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3")]


def pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return resnet(10, CLASSES, width=8), resnet(10, CLASSES, width=4)


def batch(n: int = 6, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def scipy_dkd(z_s: np.ndarray, z_t: np.ndarray, y: np.ndarray, temp: float) -> tuple[float, float]:
    """Mean TCKD and NCKD times T^2 in SciPy: b from the target's probability, p_hat by
    renormalising the other classes' probabilities (Zhao et al. eqs. 1-3)."""
    p_s, p_t = softmax(z_s / temp, axis=1), softmax(z_t / temp, axis=1)
    rows = np.arange(len(y))
    ps_t, pt_t = p_s[rows, y], p_t[rows, y]
    b_s, b_t = np.stack([ps_t, 1 - ps_t], 1), np.stack([pt_t, 1 - pt_t], 1)
    other = np.ones_like(p_s, dtype=bool)
    other[rows, y] = False
    hat_s = p_s[other].reshape(len(y), -1) / (1 - ps_t)[:, None]
    hat_t = p_t[other].reshape(len(y), -1) / (1 - pt_t)[:, None]
    tckd = rel_entr(b_t, b_s).sum(1).mean()
    nckd = rel_entr(hat_t, hat_s).sum(1).mean()
    return float(temp**2 * tckd), float(temp**2 * nckd)


def as_numpy(t: Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def nets(student: nn.Module, teacher: nn.Module, epoch: int = 0) -> Networks:
    return Networks(student, teacher, None, None, (), epoch=epoch)


# ---------------------------------------------------------------------- the losses
def test_dkd_loss_terms_are_the_weighted_terms_and_warm_up_linearly():
    g = torch.Generator().manual_seed(1)
    z_s, z_t = torch.randn(8, 6, generator=g), 4 * torch.randn(8, 6, generator=g)
    y = torch.randint(0, 6, (8,), generator=g)
    tckd, nckd = scipy_dkd(as_numpy(z_s), as_numpy(z_t), y.numpy(), 2.0)
    loss = DKDLoss(alpha=0.5, beta=3.0, temperature=2.0, warmup_epochs=10)
    # epochs from 0: (epoch + 1) / 10, then 1 (their min(epoch / 20, 1) with epochs from 1)
    for epoch, factor in ((0, 0.1), (4, 0.5), (9, 1.0), (30, 1.0)):
        terms = loss(z_s, z_t, y, task="multiclass", epoch=epoch)
        assert set(terms) == {"tckd", "nckd"}
        assert float(terms["tckd"]) == pytest.approx(factor * 0.5 * tckd, rel=1e-5)
        assert float(terms["nckd"]) == pytest.approx(factor * 3.0 * nckd, rel=1e-5)
    no_warmup = DKDLoss(warmup_epochs=0)(z_s, z_t, y, task="multiclass", epoch=0)
    assert float(no_warmup["nckd"]) == pytest.approx(
        8.0 * scipy_dkd(*map(as_numpy, (z_s, z_t)), y.numpy(), 4.0)[1], rel=1e-5
    )


def test_dist_and_kd_losses_weight_their_terms():
    g = torch.Generator().manual_seed(2)
    z_s, z_t = torch.randn(8, 6, generator=g), 4 * torch.randn(8, 6, generator=g)
    y = torch.zeros(8, dtype=torch.long)
    unit = DISTLoss(beta=1.0, gamma=1.0)(z_s, z_t, y, task="multiclass", epoch=0)
    weighted = DISTLoss(beta=0.5, gamma=3.0)(z_s, z_t, y, task="multiclass", epoch=0)
    assert set(weighted) == {"dist_inter", "dist_intra"}
    assert float(weighted["dist_inter"]) == pytest.approx(0.5 * float(unit["dist_inter"]))
    assert float(weighted["dist_intra"]) == pytest.approx(3.0 * float(unit["dist_intra"]))
    p_s, p_t = softmax(as_numpy(z_s) / 4, axis=1), softmax(as_numpy(z_t) / 4, axis=1)
    inter = np.mean([1 - np.corrcoef(a, b)[0, 1] for a, b in zip(p_s, p_t, strict=True)])
    assert float(unit["dist_inter"]) == pytest.approx(16 * inter, rel=1e-5)
    kd = KDLoss(weight=0.25, temperature=4.0)(z_s, z_t, y, task="multiclass", epoch=0)
    want = 0.25 * 16 * rel_entr(p_t, p_s).sum(1).mean()
    assert set(kd) == {"logit_loss"} and float(kd["logit_loss"]) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("loss", [DKDLoss(), DISTLoss(), KDLoss(standardize=True)])
def test_multiclass_losses_refuse_multilabel_data(loss):
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="multiclass"):
        loss(z, z, torch.ones(4, 3), task="multilabel", epoch=0)


@pytest.mark.parametrize("method", [DecoupledKD(), AttentionMaps(logit_loss=DISTLoss())])
def test_the_module_refuses_a_multiclass_logit_loss_for_multilabel_data(method):
    teacher, student = pair()
    with pytest.raises(ValueError, match="defined for task in \\['multiclass'\\], not 'multil"):
        DistillationModule(teacher, student, method=method, num_classes=CLASSES, task="multilabel")


def test_kd_loss_handles_multilabel_data():
    z_s, z_t = torch.randn(4, 3), torch.randn(4, 3)
    terms = KDLoss()(z_s, z_t, torch.ones(4, 3), task="multilabel", epoch=0)
    assert float(terms["logit_loss"]) > 0


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: DKDLoss(alpha=-1), "DKDLoss: alpha must be finite and non-negative, got -1"),
        (lambda: DKDLoss(beta=-0.5), "DKDLoss: beta must be finite and non-negative"),
        (lambda: DKDLoss(temperature=0), "DKDLoss: temperature must be positive, got 0"),
        (lambda: DKDLoss(temperature=-2), "DKDLoss: temperature must be finite and non-negat"),
        (lambda: DKDLoss(warmup_epochs=-1), "DKDLoss: warmup_epochs must be >= 0, got -1"),
        (lambda: DISTLoss(gamma=-1), "DISTLoss: gamma must be finite and non-negative"),
        (lambda: DISTLoss(beta=float("nan")), "DISTLoss: beta must be finite"),
        (lambda: KDLoss(weight=-1), "KDLoss: weight must be finite and non-negative"),
        (lambda: DecoupledKD(beta=-8), "DKDLoss: beta must be finite and non-negative"),
        (lambda: DIST(temperature=0), "DISTLoss: temperature must be positive"),
        (lambda: LogitDistillation(temperature=0), "temperature must be positive"),
    ],
)
def test_bad_options_are_refused_by_name(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_option_types_are_checked():
    with pytest.raises(TypeError, match="standardize must be true or false"):
        DKDLoss(standardize="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="warmup_epochs must be an integer"):
        DKDLoss(warmup_epochs=2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="logit_loss must be a LogitLoss"):
        AttentionMaps(logit_loss="dkd")  # type: ignore[arg-type]


# ---------------------------------------------------------------------- composition
def test_a_feature_method_refuses_logit_weight_and_logit_loss_together():
    with pytest.raises(ValueError, match="logit_weight=1.0 .Hinton's KD. and logit_loss=DKDLoss"):
        AttentionMaps(logit_weight=1.0, logit_loss=DKDLoss())


def test_attention_maps_plus_dkd_add_both_terms_with_gradients_to_the_student_only():
    teacher, student = pair()
    x, y = batch()
    plain = DistillationModule(
        teacher, student, method=AttentionMaps(), layers=PAIRS, num_classes=CLASSES
    )
    map_loss = float(plain.distillation_terms(x, y, create_graph=False).losses["map_loss"])
    plain.remove_hooks()
    method = AttentionMaps(logit_loss=DKDLoss(warmup_epochs=0, temperature=2.0))
    module = DistillationModule(teacher, student, method=method, layers=PAIRS, num_classes=CLASSES)
    out = module.distillation_terms(x, y, create_graph=True)
    assert set(out.losses) == {"map_loss", "tckd", "nckd"}
    with torch.no_grad():
        z_s, z_t = as_numpy(student(x)), as_numpy(teacher(x))
    tckd, nckd = scipy_dkd(z_s, z_t, y.numpy(), 2.0)
    # float32 KLs of summands about 1: absolute errors of a few float32 epsilons
    assert float(out.losses["tckd"].detach()) == pytest.approx(tckd, abs=2e-6)
    assert float(out.losses["nckd"].detach()) == pytest.approx(8.0 * nckd, abs=2e-6)
    assert float(out.losses["map_loss"].detach()) == pytest.approx(map_loss, rel=1e-6)
    loss = module.training_step((x, y), 0)["loss"]
    ce = float(F.cross_entropy(torch.from_numpy(z_s), y))
    assert float(loss.detach()) == pytest.approx(ce + map_loss + tckd + 8.0 * nckd, rel=1e-5)
    out.losses["nckd"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None) > 0
    assert method.label == "attention+dkd"


@pytest.mark.parametrize(
    "method",
    [
        JacobianMatching(logit_loss=DISTLoss(standardize=True)),
        InformationFlow(logit_loss=DKDLoss()),
        AttentionMaps(logit_loss=KDLoss(weight=0.5)),
    ],
)
def test_every_feature_method_takes_a_logit_loss(method):
    teacher, student = pair()
    x, y = batch()
    module = DistillationModule(teacher, student, method=method, layers=PAIRS, num_classes=CLASSES)
    out = module.distillation_terms(x, y, create_graph=True)
    expected = set(
        method.logit_term.terms(out.logits, out.teacher_logits, y, task="multiclass", epoch=0)
    )
    assert expected <= set(out.losses) and len(out.losses) > len(expected)
    assert all(torch.isfinite(v) for v in out.losses.values())


def test_composed_terms_are_logged_by_name_in_a_fit(tmp_path):
    teacher, student = pair()
    x, y = batch(n=8)
    method = AttentionMaps(logit_loss=DISTLoss())
    module = DistillationModule(teacher, student, method=method, layers=PAIRS, num_classes=CLASSES)
    trainer = pl.Trainer(**make_trainer_kwargs(tmp_path, max_epochs=1))
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4))
    metrics = trainer.callback_metrics
    for key in ("train/dist_inter", "train/dist_intra", "train/map_loss", "train/task_loss"):
        assert key in metrics
    assert float(metrics["train/dist_inter"]) > 0


# ---------------------------------------------------------------------- the logit methods
def test_logit_methods_by_name_have_their_papers_defaults():
    dkd, dist = build_method("dkd"), build_method("dist")
    assert isinstance(dkd, DecoupledKD) and isinstance(dist, DIST)
    assert dkd.options() == {
        "alpha": 1.0,
        "beta": 8.0,
        "temperature": 4.0,
        "warmup_epochs": 20,
        "standardize": False,
        "task_loss": True,
    }
    assert dist.options() == {
        "beta": 2.0,
        "gamma": 2.0,
        "temperature": 4.0,
        "standardize": False,
        "task_loss": True,
    }
    assert not dkd.uses_layers and not dist.uses_layers


def test_dkd_method_warms_up_with_the_epoch():
    teacher, student = pair()
    x, y = batch()
    method = DecoupledKD(warmup_epochs=4)
    early = method(nets(student, teacher, epoch=0), x, y, create_graph=False).losses
    late = method(nets(student, teacher, epoch=3), x, y, create_graph=False).losses
    assert float(early["tckd"]) == pytest.approx(0.25 * float(late["tckd"]), rel=1e-6)
    assert float(early["nckd"]) == pytest.approx(0.25 * float(late["nckd"]), rel=1e-6)


def test_logit_methods_train_through_the_module():
    teacher, student = pair()
    x, y = batch()
    for method in (DIST(), DecoupledKD(standardize=True), LogitDistillation(standardize=True)):
        module = DistillationModule(teacher, student, method=method, num_classes=CLASSES)
        out = module.training_step((x, y), 0)
        assert torch.isfinite(out["loss"]) and out["layer_divergence"] == {}
        assert module.layer_pairs == []


def test_labels_name_the_logit_loss_and_standardization():
    assert DecoupledKD().label == "dkd"
    assert DecoupledKD(standardize=True).label == "dkd+ls"
    assert DIST().label == "dist"
    assert LogitDistillation(standardize=True).label == "logits+ls"
    assert LogitDistillation().label == "logits"
    assert AttentionMaps(logit_loss=DKDLoss(standardize=True)).label == "attention+dkd+ls"
    assert AttentionMaps(logit_weight=1.0).label == "attention+logits"


def _build(node: dict[str, Any]) -> Any:
    module, _, name = node["_target_"].rpartition(".")
    return getattr(importlib.import_module(module), name)(
        **{k: v for k, v in node.items() if k != "_target_"}
    )


def test_options_give_the_logit_loss_as_a_node_that_rebuilds_it():
    method = AttentionMaps(map_weight=0.5, logit_loss=DKDLoss(beta=6.0, standardize=True))
    options = method.options()
    node = options["logit_loss"]
    assert node == {
        "_target_": "lightning_layerkd.methods.logit_losses.DKDLoss",
        "alpha": 1.0,
        "beta": 6.0,
        "temperature": 4.0,
        "warmup_epochs": 20,
        "standardize": True,
    }
    rebuilt = AttentionMaps(**{**options, "logit_loss": _build(node)})
    assert rebuilt.options() == options and rebuilt.label == method.label


def test_a_method_term_named_like_a_logit_term_is_refused():
    class Clashing(DistillationMethod):
        uses_layers = False

        def compute(self, nets, x, y, *, create_graph):
            logits = nets.student(x)
            return MethodOutput(logits, nets.teacher(x), {}, {"nckd": logits.sum() * 0})

    teacher, student = pair()
    x, y = batch()
    with pytest.raises(ValueError, match=r"share the names \['nckd'\]; rename"):
        Clashing(logit_loss=DKDLoss())(nets(student, teacher), x, y, create_graph=False)
