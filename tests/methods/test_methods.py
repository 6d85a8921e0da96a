"""The distillation-method contract (lightning_layerkd.methods): logit distillation against
SciPy, the methods through DistillationModule, the registry, the checks of
DistillationMethod.__call__, options/repr and hyperparameters."""

from __future__ import annotations

import types

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import expit, log_softmax, rel_entr, softmax
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_layerkd import DistillationModule
from lightning_layerkd.functional.divergence import logit_distillation_loss
from lightning_layerkd.methods import (
    AttentionMaps,
    DistillationMethod,
    JacobianMaps,
    LogitDistillation,
    MethodOutput,
    Networks,
    StudentOnly,
    build_method,
    method_class,
    method_names,
    register_method,
)
from lightning_layerkd.models import resnet
from tests.helpers.models import make_trainer_kwargs

CLASSES = 5
PAIRS = [("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3")]


def pair(width: int = 4) -> tuple[nn.Module, nn.Module]:
    """A (teacher, student) pair of tiny CIFAR ResNets, reproducible."""
    torch.manual_seed(0)
    return resnet(10, CLASSES, width=2 * width), resnet(10, CLASSES, width=width)


def batch(n: int = 6, size: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def logits_pair(n: int = 7, k: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Student and teacher logits of different scales, in float64."""
    rng = np.random.default_rng(seed)
    return 3.0 * rng.standard_normal((n, k)), 5.0 * rng.standard_normal((n, k))


def scipy_kd(z_s: np.ndarray, z_t: np.ndarray, temperature: float) -> float:
    """``T^2 mean_i KL(p_T,i || p_S,i)`` with ``p = softmax(z / T)``, all in SciPy."""
    p_t, p_s = softmax(z_t / temperature, axis=1), softmax(z_s / temperature, axis=1)
    return float(temperature**2 * rel_entr(p_t, p_s).sum(axis=1).mean())


def scipy_ce(z: np.ndarray, y: np.ndarray) -> float:
    return float(-log_softmax(z, axis=1)[np.arange(len(y)), y].mean())


def as_numpy(t: Tensor) -> np.ndarray:
    return t.detach().double().numpy()


# ---------------------------------------------------------------------- logit distillation
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_logit_distillation_loss_matches_scipy_kl(temperature):
    z_s, z_t = logits_pair()
    expected = scipy_kd(z_s, z_t, temperature)
    got = logit_distillation_loss(torch.from_numpy(z_s), torch.from_numpy(z_t), temperature)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(expected, rel=1e-12)
    # float32 inputs: same value to float32 precision; per-sample values with reduction="none"
    per_sample = logit_distillation_loss(
        torch.from_numpy(z_s).float(), torch.from_numpy(z_t).float(), temperature, reduction="none"
    )
    p_t, p_s = softmax(z_t / temperature, axis=1), softmax(z_s / temperature, axis=1)
    expected_rows = temperature**2 * rel_entr(p_t, p_s).sum(axis=1)
    np.testing.assert_allclose(per_sample.double().numpy(), expected_rows, rtol=1e-4, atol=1e-6)


def test_logit_distillation_temperature_changes_the_value():
    # T^2 KL at T=1 and T=4 differ by far for these logits, so the SciPy check at both
    # temperatures pins down where T enters (a formula that ignored T could match one only).
    z_s, z_t = logits_pair()
    low, high = scipy_kd(z_s, z_t, 1.0), scipy_kd(z_s, z_t, 4.0)
    assert high > 2 * low
    got = logit_distillation_loss(torch.from_numpy(z_s), torch.from_numpy(z_t), 4.0)
    assert float(got) != pytest.approx(low, rel=0.5)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_logit_distillation_loss_multilabel_is_mean_bernoulli_kl(temperature):
    z_s, z_t = logits_pair(n=5, k=4, seed=1)
    q, p = expit(z_t / temperature), expit(z_s / temperature)  # teacher, student
    kl = q * np.log(q / p) + (1 - q) * np.log((1 - q) / (1 - p))  # KL(Bern(q) || Bern(p))
    expected_rows = temperature**2 * kl.mean(axis=1)
    s, t = torch.from_numpy(z_s), torch.from_numpy(z_t)
    got = logit_distillation_loss(s, t, temperature, task="multilabel")
    assert float(got) == pytest.approx(expected_rows.mean(), rel=1e-10)
    rows = logit_distillation_loss(s, t, temperature, task="multilabel", reduction="none")
    np.testing.assert_allclose(rows.numpy(), expected_rows, rtol=1e-10)


def test_logit_distillation_gradient_reaches_the_student_only():
    temperature = 4.0
    z_s, z_t = logits_pair()
    s = torch.from_numpy(z_s).requires_grad_(True)
    t = torch.from_numpy(z_t).requires_grad_(True)
    logit_distillation_loss(s, t, temperature).backward()
    assert t.grad is None  # the teacher's logits are constants
    # d/dz_S of T^2 mean_i KL(p_T || p_S) = T (p_S - p_T) / B
    p_t, p_s = softmax(z_t / temperature, axis=1), softmax(z_s / temperature, axis=1)
    expected = temperature * (p_s - p_t) / len(z_s)
    np.testing.assert_allclose(s.grad.numpy(), expected, rtol=1e-10, atol=1e-14)


def test_logit_distillation_loss_rejects_bad_arguments():
    s, t = torch.zeros(3, 4), torch.zeros(3, 4)
    for temperature in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature must be positive"):
            logit_distillation_loss(s, t, temperature)
    with pytest.raises(ValueError, match=r"student logits \(3, 4\) and teacher logits \(3, 5\)"):
        logit_distillation_loss(s, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="task must be"):
        logit_distillation_loss(s, t, task="regression")
    with pytest.raises(ValueError, match="reduction must be"):
        logit_distillation_loss(s, t, reduction="sum")


# ---------------------------------------------------------------------- methods in the module
def test_logits_method_loss_is_ce_plus_kd_with_one_param_group():
    teacher, student = pair()
    module = DistillationModule(teacher, student, method="logits", num_classes=CLASSES)
    assert isinstance(module.method, LogitDistillation)
    assert module.method.logit_weight == 1.0 and module.method.temperature == 4.0
    x, y = batch()
    out = module.training_step((x, y), 0)
    with torch.no_grad():  # train-mode BatchNorm: the same batch gives the same logits
        z_s, z_t = as_numpy(student(x)), as_numpy(teacher(x))
    expected = scipy_ce(z_s, y.numpy()) + 1.0 * scipy_kd(z_s, z_t, 4.0)
    assert float(out["loss"].detach()) == pytest.approx(expected, rel=1e-5)
    assert out["loss"].requires_grad
    assert out["layer_divergence"] == {}
    optimizer = module.configure_optimizers()
    assert [group["name"] for group in optimizer.param_groups] == ["base"]
    assert module.layer_pairs == []


def test_logit_weight_adds_the_kd_term_to_attention_maps():
    teacher, student = pair()
    x, y = batch()
    plain = DistillationModule(
        teacher, student, method=AttentionMaps(), layers=PAIRS, num_classes=5
    )
    loss_plain = plain.training_step((x, y), 0)["loss"]
    plain.remove_hooks()
    method = AttentionMaps(logit_weight=0.5, temperature=2)
    with_kd = DistillationModule(teacher, student, method=method, layers=PAIRS, num_classes=5)
    out = with_kd.distillation_terms(x, y, create_graph=True)
    assert set(out.losses) == {"map_loss", "logit_loss"}
    loss_kd = with_kd.training_step((x, y), 0)["loss"]
    with torch.no_grad():
        z_s, z_t = as_numpy(student(x)), as_numpy(teacher(x))
    logit_term = 0.5 * scipy_kd(z_s, z_t, 2.0)
    assert logit_term > 1e-3  # a term big enough to notice
    assert float(out.losses["logit_loss"].detach()) == pytest.approx(logit_term, rel=1e-5)
    assert float(loss_kd.detach()) == pytest.approx(
        float(loss_plain.detach()) + logit_term, rel=1e-5
    )


def test_logit_loss_is_logged_in_a_fit(tmp_path):
    teacher, student = pair()
    x, y = batch(n=8)
    method = AttentionMaps(logit_weight=0.5, temperature=2)
    module = DistillationModule(teacher, student, method=method, layers=PAIRS, num_classes=5)
    trainer = pl.Trainer(**make_trainer_kwargs(tmp_path, max_epochs=1))
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4))
    metrics = trainer.callback_metrics
    assert "train/logit_loss" in metrics and "train/map_loss" in metrics
    assert float(metrics["train/logit_loss"]) > 0


# ---------------------------------------------------------------------- the registry
def test_method_names_start_with_the_builtin_methods_in_table_order():
    assert method_names()[:13] == [
        "attention",
        "jacobian",
        "hessian",
        "jacobian_matching",
        "information_flow",
        "fitnet",
        "attention_transfer",
        "crd",
        "review_kd",
        "logits",
        "dkd",
        "dist",
        "none",
    ]
    assert method_class("hessian").__name__ == "HessianMaps"


def test_registered_method_is_built_by_name():
    @register_method("test_methods_built_by_name")
    class Registered(DistillationMethod):
        divergence_name = "registered"

    assert Registered.name == "test_methods_built_by_name"
    assert method_class("test_methods_built_by_name") is Registered
    assert "test_methods_built_by_name" in method_names()
    teacher, student = pair()
    module = DistillationModule(
        teacher, student, method="test_methods_built_by_name", num_classes=CLASSES
    )
    assert type(module.method) is Registered
    assert module.hparams["method"] == "test_methods_built_by_name"
    assert module.divergence_name == "registered"
    # registering the same class again (a re-run script) is not a conflict
    assert register_method("test_methods_built_by_name")(Registered) is Registered


def test_second_class_under_a_registered_name_is_refused():
    @register_method("test_methods_taken")
    class First(DistillationMethod):
        pass

    class Second(DistillationMethod):
        pass

    with pytest.raises(ValueError, match=r"'test_methods_taken' is already registered .*First"):
        register_method("test_methods_taken")(Second)
    assert method_class("test_methods_taken") is First


def test_same_named_class_from_another_module_is_refused():
    first = types.new_class("Cosine", (DistillationMethod,))
    first.__module__ = "user_module_a"
    second = types.new_class("Cosine", (DistillationMethod,))
    second.__module__ = "user_module_b"
    register_method("test_methods_same_qualname")(first)
    with pytest.raises(ValueError, match="already registered"):
        register_method("test_methods_same_qualname")(second)


def test_a_class_is_named_by_its_own_registration_only():
    """An unregistered subclass of a registered method is named by its class (hparams, errors),
    not by its parent's name; a class registered once cannot take a second name."""

    class MyAttention(AttentionMaps):
        pass

    assert AttentionMaps.name == "attention" and MyAttention.name == "MyAttention"
    teacher, student = pair()
    module = DistillationModule(teacher, student, method=MyAttention(), num_classes=CLASSES)
    assert module.hparams["method"] == "MyAttention"
    with pytest.raises(ValueError, match="MyAttention' needs a teacher"):
        DistillationModule(None, student, method=MyAttention(), num_classes=CLASSES)
    register_method("test_methods_first_name")(MyAttention)
    assert MyAttention.name == "test_methods_first_name"
    with pytest.raises(ValueError, match="already registered as 'test_methods_first_name'"):
        register_method("test_methods_second_name")(MyAttention)


def test_unknown_method_name_lists_the_registered_ones():
    teacher, student = pair()
    with pytest.raises(ValueError, match="unknown method 'no_such_method'") as info:
        DistillationModule(teacher, student, method="no_such_method", num_classes=CLASSES)
    for name in ("attention", "jacobian", "information_flow", "logits", "none"):
        assert repr(name) in str(info.value)
    with pytest.raises(ValueError, match="registered methods"):
        method_class("no_such_method")
    with pytest.raises(TypeError, match="registered name"):
        build_method(3)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["two words", "1st", "with-dash", ""])
def test_method_name_must_be_an_identifier(name):
    with pytest.raises(ValueError, match="must be an identifier"):
        register_method(name)
    assert name not in method_names()


def test_only_distillation_methods_can_be_registered():
    with pytest.raises(TypeError, match="DistillationMethod subclass"):
        register_method("test_methods_not_a_method")(nn.Linear)
    assert "test_methods_not_a_method" not in method_names()


# ---------------------------------------------------------------------- the contract checks
class Fixed(DistillationMethod):
    """Returns whatever output the test sets (not registered)."""

    output: object = None

    def compute(self, nets, x, y, *, create_graph):
        return self.output


def nets_for(*layers: str) -> Networks:
    return Networks(nn.Identity(), nn.Identity(), None, None, tuple(layers))


def fixed(output: object, **options) -> Fixed:
    method = Fixed(**options)
    method.output = output
    return method


def test_contract_accepts_per_sample_divergences_and_adds_the_logit_term():
    x, y = torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)
    z_s, z_t = logits_pair(n=4, k=3)
    s, t = torch.from_numpy(z_s), torch.from_numpy(z_t)
    divergences = {"a": torch.rand(4), "b": torch.rand(4)}
    output = MethodOutput(s, t, divergences, {"map_loss": torch.tensor(0.25)})
    assert fixed(output)(nets_for("a", "b"), x, y, create_graph=False) is output
    out = fixed(output, logit_weight=0.5, temperature=2.0)(
        nets_for("a", "b"), x, y, create_graph=False
    )
    assert out.divergences is divergences and float(out.losses["map_loss"]) == 0.25
    assert float(out.losses["logit_loss"].detach()) == pytest.approx(0.5 * scipy_kd(z_s, z_t, 2.0))


def test_contract_refuses_a_scalar_divergence_naming_the_layer_and_shape():
    x, y = torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)
    output = MethodOutput(torch.zeros(4, 3), None, {"a": torch.rand(4), "b": torch.tensor(0.1)}, {})
    with pytest.raises(ValueError, match=r"layer 'b' has shape \(\); .*shape \(4,\)"):
        fixed(output)(nets_for("a", "b"), x, y, create_graph=False)
    output = output._replace(divergences={"a": torch.rand(4), "b": torch.rand(4, 1)})
    with pytest.raises(ValueError, match=r"layer 'b' has shape \(4, 1\)"):
        fixed(output)(nets_for("a", "b"), x, y, create_graph=False)


def test_contract_refuses_divergences_for_other_layers():
    x, y = torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)
    for divergences in ({"a": torch.rand(4)}, {"a": torch.rand(4), "c": torch.rand(4)}):
        output = MethodOutput(torch.zeros(4, 3), None, divergences, {})
        with pytest.raises(ValueError, match=r"expected one per crucial layer \['a', 'b'\]"):
            fixed(output)(nets_for("a", "b"), x, y, create_graph=False)


def test_contract_refuses_logit_weight_without_teacher_logits():
    x, y = torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)
    output = MethodOutput(torch.zeros(4, 3), None, {}, {})
    assert fixed(output)(nets_for(), x, y, create_graph=False) is output  # fine without KD
    with pytest.raises(ValueError, match="returned no teacher_logits.*logit_weight=0.5"):
        fixed(output, logit_weight=0.5)(nets_for(), x, y, create_graph=False)


def test_contract_refuses_other_return_types():
    x, y = torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(TypeError, match="must return a MethodOutput, got tuple"):
        fixed((torch.zeros(4, 3), None, {}, {}))(nets_for(), x, y, create_graph=False)


def test_method_constructor_validates_common_options():
    with pytest.raises(ValueError, match="logit_weight must be non-negative"):
        AttentionMaps(logit_weight=-1)
    with pytest.raises(ValueError, match="temperature must be positive"):
        LogitDistillation(temperature=0)


# ---------------------------------------------------------------------- options and repr
def test_options_and_repr():
    assert "wrt='weight'" in repr(JacobianMaps(wrt="weight"))
    assert repr(JacobianMaps(wrt="weight")).startswith("JacobianMaps(")
    assert StudentOnly().options() == {"task_loss": True}
    assert repr(StudentOnly()) == "StudentOnly(task_loss=True)"
    assert LogitDistillation(logit_weight=2.0).options() == {
        "logit_weight": 2.0,
        "temperature": 4.0,
        "standardize": False,
        "task_loss": True,
    }


def test_options_of_a_subclass_forwarding_kwargs_include_the_parents():
    class Weighted(DistillationMethod):
        def __init__(self, *, weight: float = 1.0, **kwargs) -> None:
            super().__init__(**kwargs)
            self.weight = weight

    assert Weighted(weight=3.0, temperature=2.0).options() == {
        "weight": 3.0,
        "task_loss": True,
        "logit_weight": 0.0,
        "temperature": 2.0,
        "logit_loss": None,
    }


def test_hparams_record_the_method_name_and_options():
    teacher, student = pair()
    module = DistillationModule(teacher, student, method="jacobian", num_classes=CLASSES)
    assert module.hparams["method"] == "jacobian"
    assert module.hparams["method_options"]["wrt"] == "activation"
    assert module.hparams["method_options"] == JacobianMaps().options()
    module = DistillationModule(
        teacher, student, method=JacobianMaps(wrt="weight"), num_classes=CLASSES
    )
    assert module.hparams["method"] == "jacobian"
    assert module.hparams["method_options"]["wrt"] == "weight"


# ---------------------------------------------------------------------- methods without a teacher
def test_student_only_needs_the_task_loss():
    with pytest.raises(ValueError, match="needs task_loss=True"):
        StudentOnly(task_loss=False)


def test_student_only_trains_without_a_teacher():
    _, student = pair()
    module = DistillationModule(None, student, method="none", num_classes=CLASSES)
    x, y = batch()
    out = module.training_step((x, y), 0)
    with torch.no_grad():
        expected = F.cross_entropy(student(x), y)
    assert float(out["loss"].detach()) == pytest.approx(float(expected), rel=1e-6)
    assert out["layer_divergence"] == {}


@pytest.mark.parametrize("method", ["logits", LogitDistillation(), "attention"])
def test_methods_with_a_teacher_refuse_teacher_none(method):
    _, student = pair()
    with pytest.raises(ValueError, match="needs a teacher; pass one or use method='none'"):
        DistillationModule(None, student, method=method, num_classes=CLASSES)


def test_a_method_adding_logit_kd_is_labelled_apart_from_the_method_alone():
    # results and reports key on the label: attention with and without logit KD never merge
    assert AttentionMaps().label == "attention"
    assert AttentionMaps(logit_weight=0.5).label == "attention+logits"
    assert JacobianMaps(logit_weight=1.0).label == "jacobian+logits"
    assert LogitDistillation(logit_weight=1.0).label == "logits"  # logit KD is the method
    assert StudentOnly().label == "none"

    class OutputsOnly(DistillationMethod):  # a user's method without crucial layers
        uses_layers = False

    assert OutputsOnly(logit_weight=1.0).label == "OutputsOnly+logits"
    assert OutputsOnly().label == "OutputsOnly"
