"""DistillationModule: layers, hooks, the frozen teacher, param groups, losses and metrics."""

from __future__ import annotations

import copy
import functools
import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_layerkd import DistillationModule
from lightning_layerkd.functional.derivatives import jacobian_map
from lightning_layerkd.functional.divergence import js_divergence
from lightning_layerkd.functional.information_flow import pkt_loss
from lightning_layerkd.functional.jacobian_matching import input_jacobian, jacobian_matching_loss
from lightning_layerkd.functional.maps import attention_map, to_distribution
from lightning_layerkd.guards import NonFiniteLossError
from lightning_layerkd.methods import (
    AttentionMaps,
    HessianMaps,
    InformationFlow,
    JacobianMaps,
)
from lightning_layerkd.models import resnet
from tests.helpers.models import make_trainer_kwargs

PAIRS = [("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3"), ("layer4", "layer4")]


def pair(width: int = 4, classes: int = 5) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return resnet(18, num_classes=classes, width=2 * width), resnet(10, classes, width=width)


def batch(n: int = 6, size: int = 16, classes: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def loader(n: int = 24, size: int = 16, classes: int = 5, batch_size: int = 8) -> DataLoader:
    x, y = batch(n, size, classes)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    return pl.Trainer(**make_trainer_kwargs(tmp_path, **{"max_epochs": 1, **kwargs}))


def count_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


# ---------------------------------------------------------------------- crucial layers
def test_auto_layers_from_example_input_and_hooks_installed():
    teacher, student = pair()
    x, _ = batch()
    module = DistillationModule(teacher, student, num_classes=5, example_input=x)
    assert module.resolve_layers() == PAIRS
    assert count_hooks(student) == 4 and count_hooks(teacher) == 4
    module.remove_hooks()
    assert count_hooks(student) == 0 and count_hooks(teacher) == 0


def test_training_step_called_directly_discovers_layers_on_its_batch():
    teacher, student = pair()
    module = DistillationModule(teacher, student, num_classes=5)
    x, y = batch(size=12)  # no input size is hard-coded
    out = module.training_step((x, y), 0)
    assert module.layer_pairs == PAIRS
    assert set(out["layer_divergence"]) == {"layer1", "layer2", "layer3", "layer4"}
    assert out["loss"].requires_grad


def test_fit_discovers_layers_from_train_loader_before_optimizer(tmp_path):
    teacher, student = pair()
    module = DistillationModule(teacher, student, num_classes=5)
    trainer(tmp_path, max_steps=1).fit(module, loader())
    names = [g["name"] for g in trainer_optimizer(module).param_groups]
    assert names == ["layer1", "layer2", "layer3", "layer4", "base"]
    assert count_hooks(student) == 0 and count_hooks(teacher) == 0  # removed at teardown


def trainer_optimizer(module: DistillationModule) -> torch.optim.Optimizer:
    optimizer = module.trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.Optimizer)
    return optimizer


def test_fit_discovers_layers_from_datamodule(tmp_path):
    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            return loader()

    teacher, student = pair()
    module = DistillationModule(teacher, student, num_classes=5)
    trainer(tmp_path, max_steps=1).fit(module, datamodule=Data())
    assert module.layer_pairs == PAIRS


def test_explicit_layers_as_paths_pairs_or_dict():
    teacher, student = pair()
    for layers in (
        ["layer2", "layer4"],
        [("layer2", "layer2"), ("layer4", "layer4")],
        {"layer2": "layer2", "layer4": "layer4"},
    ):
        module = DistillationModule(teacher, student, num_classes=5, layers=layers)
        assert module.layer_pairs == [("layer2", "layer2"), ("layer4", "layer4")]


def test_unknown_layer_lists_candidates_with_shapes():
    teacher, student = pair()
    module = DistillationModule(teacher, student, num_classes=5, layers=[("layer9", "layer1")])
    x, _ = batch(n=2)
    with pytest.raises(ValueError) as err:
        module.resolve_layers(x)
    message = str(err.value)
    assert "student has no module 'layer9'" in message
    assert "layer1  (2, 4, 16, 16)" in message and "layer4  (2, 32, 2, 2)" in message


def test_module_that_fires_twice_is_a_clear_error():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.shared = nn.Conv2d(4, 4, 3, padding=1)
            self.head = nn.Linear(4, 5)

        def forward(self, x):
            x = self.shared(self.shared(self.stem(x)))
            return self.head(x.mean(dim=(2, 3)))

    teacher = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )
    module = DistillationModule(teacher, Twice(), num_classes=5, layers=[("shared", "1")])
    x, y = batch(n=2)
    with pytest.raises(ValueError, match="'shared' ran more than once") as err:
        module.training_step((x, y), 0)
    assert "stem  (2, 4, 16, 16)" in str(err.value)


def test_nested_crucial_layers_are_rejected():
    teacher, student = pair()
    module = DistillationModule(
        teacher, student, num_classes=5, layers=[("layer1", "layer1"), ("layer1.0", "layer2")]
    )
    with pytest.raises(ValueError, match="nested"):
        module.resolve_layers(batch(n=2)[0])


def test_bad_arguments_name_the_valid_choices():
    teacher, student = pair()
    with pytest.raises(ValueError, match=r"unknown method 'fisher'; registered methods: \['att"):
        DistillationModule(teacher, student, num_classes=5, method="fisher")
    with pytest.raises(ValueError, match="wrt must be one of"):
        JacobianMaps(wrt="input")
    with pytest.raises(TypeError, match="method must be a registered name"):
        DistillationModule(teacher, student, num_classes=5, method=3)
    with pytest.raises(ValueError, match="needs a teacher"):
        DistillationModule(None, student, num_classes=5, method="attention")
    with pytest.raises(ValueError, match="layers must be 'auto'"):
        DistillationModule(teacher, student, num_classes=5, layers="layer1")
    module = DistillationModule(teacher, student, num_classes=5)
    with pytest.raises(ValueError, match="needs an example input"):
        module.param_groups()


# ---------------------------------------------------------------------- teacher and groups
def test_teacher_is_frozen_in_eval_mode_and_unchanged_by_fit(tmp_path):
    teacher, student = pair()
    before = copy.deepcopy(teacher.state_dict())
    module = DistillationModule(teacher, student, num_classes=5, method="jacobian")
    assert not any(p.requires_grad for p in teacher.parameters())
    module.train()
    assert not teacher.training and student.training
    trainer(tmp_path, max_epochs=2).fit(module, loader(), loader())
    optimizer_params = {id(p) for g in trainer_optimizer(module).param_groups for p in g["params"]}
    assert not optimizer_params & {id(p) for p in teacher.parameters()}
    assert not any(p.requires_grad for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_param_groups_hold_every_trainable_student_parameter_exactly_once():
    teacher, student = pair()
    student.fc.weight.requires_grad_(False)
    module = DistillationModule(teacher, student, num_classes=5, layers=PAIRS)
    groups = module.param_groups()
    assert [g["name"] for g in groups] == ["layer1", "layer2", "layer3", "layer4", "base"]
    seen = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in student.parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable) and len(seen) == len(set(seen))
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in student.layer2.parameters()}
    assert id(student.conv1.weight) in {id(p) for p in groups[-1]["params"]}


MAPS = {"attention": AttentionMaps, "jacobian": JacobianMaps, "hessian": HessianMaps}


# ---------------------------------------------------------------------- loss and gradients
def test_attention_loss_is_cross_entropy_plus_weighted_jsd_by_hand():
    teacher, student = pair()
    module = DistillationModule(
        teacher, student, num_classes=5, layers=PAIRS, method=AttentionMaps(map_weight=0.5)
    )
    x, y = batch()
    out = module.training_step((x, y), 0)
    feats = {}
    hooks = [
        getattr(net, name).register_forward_hook(
            lambda m, i, o, key=(tag, name): feats.__setitem__(key, o)
        )
        for tag, net in (("s", student), ("t", teacher))
        for name in ("layer1", "layer4")
    ]
    logits = student(x)
    with torch.no_grad():
        teacher(x)
    for h in hooks:
        h.remove()
    expected_jsd = {}
    for name in ("layer1", "layer4"):
        p = to_distribution(attention_map(feats["s", name]))
        q = to_distribution(attention_map(feats["t", name]))
        expected_jsd[name] = js_divergence(p, q)
        torch.testing.assert_close(out["layer_divergence"][name], expected_jsd[name].detach())
    divergences = out["layer_divergence"]
    assert all(d.shape == (6,) and not d.requires_grad for d in divergences.values())
    expected = nn.functional.cross_entropy(logits, y) + 0.5 * sum(
        d.mean() for d in divergences.values()
    )
    torch.testing.assert_close(out["loss"], expected)


@pytest.mark.parametrize("method", ["jacobian", "hessian"])
@pytest.mark.parametrize("wrt", ["weight", "activation"])
def test_map_term_trains_the_student_and_not_the_teacher(method, wrt):
    teacher, student = pair()
    module = DistillationModule(
        teacher, student, num_classes=5, layers=PAIRS[:2], method=MAPS[method](wrt=wrt)
    )
    x, y = batch()
    logits, divergences = module.layer_divergences(x, y, create_graph=True)
    map_loss = sum(d.mean() for d in divergences.values())
    assert map_loss.item() > 0
    map_loss.backward()  # the map term alone
    stem = student.conv1.weight.grad  # before every crucial layer: reached only via the maps
    assert stem is not None and torch.isfinite(stem).all() and stem.abs().sum() > 0
    assert student.layer1[0].conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    if wrt == "weight":  # one map per batch, counted once per sample
        assert all(torch.all(d == d[0]) for d in divergences.values())


def test_validation_reports_accuracy_and_layer_jsd_for_derivative_maps(tmp_path):
    teacher, student = pair()
    module = DistillationModule(
        teacher, student, num_classes=5, method=HessianMaps(wrt="activation")
    )
    fit = trainer(tmp_path, max_epochs=1)
    fit.fit(module, loader(), loader())
    metrics = fit.callback_metrics
    for key in ("val/acc", "val/loss", "val/jsd/layer1", "val/jsd/layer3", "train/jsd/layer2"):
        assert key in metrics and math.isfinite(float(metrics[key])), key
    assert "val/jsd/layer4" not in metrics  # feeds global pooling: left out for activation maps
    assert 0.0 <= float(metrics["val/acc"]) <= 1.0
    assert 0.0 <= float(metrics["val/jsd/layer1"]) <= math.log(2)


def test_validation_accuracy_is_top1_by_hand(tmp_path):
    teacher, student = pair()
    module = DistillationModule(teacher, student, num_classes=5, layers=PAIRS)
    module.eval()
    val = loader(n=16)
    [result] = trainer(tmp_path).validate(module, val, verbose=False)
    x, y = val.dataset.tensors
    with torch.no_grad():
        expected = (student(x).argmax(1) == y).float().mean().item()
    assert result["val/acc"] == pytest.approx(expected)


def test_multilabel_uses_bce_and_reports_map_and_accuracy(tmp_path):
    teacher, student = pair()
    x, _ = batch(n=16)
    y = (torch.rand(16, 5, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    data = DataLoader(TensorDataset(x, y), batch_size=8)
    module = DistillationModule(
        teacher, student, num_classes=5, task="multilabel", method=JacobianMaps(wrt="activation")
    )
    out = module.training_step((x[:8], y[:8]), 0)
    logits = student(x[:8])
    bce = nn.functional.binary_cross_entropy_with_logits(logits, y[:8])
    maps = sum(d.mean() for d in out["layer_divergence"].values())
    torch.testing.assert_close(out["loss"], bce + maps, rtol=1e-5, atol=1e-6)
    fit = trainer(tmp_path)
    fit.fit(module, data, data)
    assert {"val/map", "val/acc"} <= set(fit.callback_metrics)


def test_label_free_target_and_student_alone():
    teacher, student = pair()
    x, y = batch()
    module = DistillationModule(
        teacher, student, num_classes=5, layers=PAIRS, method=JacobianMaps(map_target="teacher")
    )
    out = module.training_step((x, torch.full_like(y, 4)), 0)  # labels unused by the maps
    ref = DistillationModule(teacher, student, num_classes=5, layers=PAIRS, method="jacobian")
    ref_out = ref.training_step((x, teacher(x).argmax(1)), 0)
    for name in out["layer_divergence"]:
        torch.testing.assert_close(out["layer_divergence"][name], ref_out["layer_divergence"][name])
    alone = DistillationModule(None, student, num_classes=5, method="none")
    result = alone.training_step((x, y), 0)
    torch.testing.assert_close(result["loss"], nn.functional.cross_entropy(student(x), y))
    assert result["layer_divergence"] == {}
    assert [g["name"] for g in alone.param_groups()] == ["base"]


def test_jacobian_weight_divergence_equals_functional_maps_by_hand():
    teacher, student = pair()
    module = DistillationModule(
        teacher, student, num_classes=5, layers=PAIRS[1:3], method=JacobianMaps(wrt="weight")
    )
    x, y = batch()
    _, divergences = module.layer_divergences(x, y, create_graph=False)
    module.remove_hooks()
    t_maps = jacobian_map(teacher, x, ["layer2", "layer3"], y, wrt="weight")
    s_maps = jacobian_map(student, x, ["layer2", "layer3"], y, wrt="weight")
    for name, s_map, t_map in zip(["layer2", "layer3"], s_maps, t_maps, strict=True):
        # per-output-channel sums in decreasing order (the default weight_alignment="sorted"),
        # pooled to the student's width (the teacher is twice as wide: pairs averaged)
        s_sum = s_map.flatten(1).sum(1).sort(descending=True).values
        t_sum = t_map.flatten(1).sum(1).sort(descending=True).values
        t_pooled = t_sum.view(-1, 2).mean(1)
        expected = js_divergence(to_distribution(s_sum[None]), to_distribution(t_pooled[None]))
        torch.testing.assert_close(divergences[name], expected.expand(6), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("wrt", ["weight", "activation"])
def test_hessian_maps_run_under_bf16_autocast(wrt):
    teacher, student = pair()
    module = DistillationModule(
        teacher, student, num_classes=5, layers=PAIRS[:2], method=HessianMaps(wrt=wrt)
    )
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module.training_step((x, y), 0)
    out["loss"].backward()
    assert all(torch.isfinite(d).all() for d in out["layer_divergence"].values())
    assert student.conv1.weight.grad is not None


def test_predict_needs_no_layers(tmp_path):
    teacher, student = pair()
    module = DistillationModule(teacher, student, num_classes=5)
    [logits] = trainer(tmp_path).predict(module, DataLoader(TensorDataset(batch()[0]), 6))
    assert logits.shape == (6, 5) and module.layer_pairs is None


def test_jacobian_matching_terms_train_the_student_through_input_jacobians():
    teacher, student = pair()
    module = DistillationModule(
        teacher, student, num_classes=5, layers=PAIRS[:2], method="jacobian_matching"
    )
    x, y = batch()
    logits, _, divergences, losses = module.distillation_terms(x, y, create_graph=True)
    map_loss = losses.pop("map_loss")
    assert losses == {} and set(divergences) == {"layer1", "layer2"}
    assert all(d.shape == (6,) and (d >= 0).all() and (d <= 4).all() for d in divergences.values())
    expected_output = jacobian_matching_loss(
        input_jacobian(student, x, y)[1], input_jacobian(teacher, x, y)[1]
    )
    expected = expected_output + sum(d.mean() for d in divergences.values())
    torch.testing.assert_close(map_loss.detach(), expected, rtol=1e-4, atol=1e-6)
    map_loss.backward()  # double backward through the input gradients
    assert student.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_information_flow_uses_critical_period_weights_of_the_epoch():
    teacher, student = pair()
    method = InformationFlow(critical_period={"alpha_init": 100.0, "gamma": 0.7})
    module = DistillationModule(teacher, student, num_classes=5, layers=PAIRS[1:3], method=method)
    x, y = batch()
    _, _, divergences, losses = module.distillation_terms(x, y, create_graph=True)
    map_loss = losses["map_loss"]
    layer_terms = sum(d[0] for d in divergences.values())
    with torch.no_grad():
        output_term = pkt_loss(student(x), teacher(x), reduction="mean")
    # epoch 0: intermediate layers weigh alpha_init, the output 1 (eq. 10)
    torch.testing.assert_close(
        map_loss.detach(), 100.0 * layer_terms + output_term, rtol=1e-4, atol=1e-6
    )
    with pytest.raises(ValueError, match=r"critical_period takes alpha_init and gamma"):
        InformationFlow(critical_period={"alpha": 1})
    with pytest.raises(TypeError, match="unexpected keyword argument 'alpha'"):
        InformationFlow(alpha=1)


# ------------------------------------------------------------- degenerate pairs (section 3)
@pytest.mark.parametrize(
    ("method", "wrt", "expected"),
    [
        ("jacobian", "activation", ["layer1", "layer2", "layer3"]),
        ("hessian", "activation", ["layer1", "layer2", "layer3"]),
        ("jacobian", "weight", ["layer1", "layer2", "layer3", "layer4"]),
        ("attention", None, ["layer1", "layer2", "layer3", "layer4"]),
    ],
)
def test_auto_layers_leave_out_pairs_whose_map_is_constant(method, wrt, expected):
    """layer4 feeds global pooling directly: its activation-gradient map is the same at every
    pixel, so layers='auto' does not pick it for activation maps (and does for the others)."""
    torch.manual_seed(0)
    teacher, student = resnet(18, num_classes=10, width=8), resnet(10, num_classes=10, width=4)
    x = torch.randn(8, 3, 32, 32)
    module = DistillationModule(
        teacher,
        student,
        method=AttentionMaps() if method == "attention" else MAPS[method](wrt=wrt),
        num_classes=10,
        example_input=x,
    )
    assert [s for s, _ in module.resolve_layers()] == expected


def test_explicit_constant_pair_is_warned_about_by_name():
    """An explicit pair with a constant map is kept (the user asked for it) with a warning that
    names it; its JSD is 0 up to float noise, which is why."""
    torch.manual_seed(0)
    teacher, student = resnet(18, num_classes=10, width=8), resnet(10, num_classes=10, width=4)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    module = DistillationModule(
        teacher,
        student,
        method=JacobianMaps(wrt="activation"),
        num_classes=10,
        layers=["layer3", "layer4"],
        example_input=x,
    )
    with pytest.warns(UserWarning, match=r"\('layer4', 'layer4'\).*same at every pixel") as got:
        module.resolve_layers()
    assert not any("'layer3'" in str(w.message) for w in got)
    _, divergences = module.layer_divergences(x, y, create_graph=False)
    assert float(divergences["layer4"].max()) < 1e-9
    assert float(divergences["layer3"].min()) > 1e-4


def test_constant_map_layers_on_a_plain_cnn():
    from lightning_layerkd.functional.derivatives import constant_map_layers

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    x = torch.randn(4, 3, 6, 6)
    assert constant_map_layers(model, x, ["0", "2", "3"]) == ["3"]  # "3" feeds the pooling


def test_teacher_and_student_probes_go_to_their_roles(monkeypatch):
    """Hessian maps: ``teacher_probes`` for the teacher's maps (no graph), ``num_probes`` for
    the student's; a bad count is refused with the option's name."""
    import lightning_layerkd.methods.maps as module_file

    calls = []
    real = module_file.compute_maps

    def spy(model, *args, **kwargs):
        calls.append((kwargs["create_graph"], kwargs["num_probes"]))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(module_file, "compute_maps", spy)
    teacher, student = pair()
    x, y = batch()
    module = DistillationModule(
        teacher, student, num_classes=5, layers=PAIRS[:2], method=HessianMaps(num_probes=2)
    )
    module.layer_divergences(x, y, create_graph=True)
    assert calls == [(False, 1), (True, 2)]  # teacher_probes=None: 1 for wrt="activation"
    calls.clear()
    options = dict(num_classes=5, layers=PAIRS[:2])
    DistillationModule(teacher, student, method=HessianMaps(wrt="weight"), **options)
    DistillationModule(
        teacher, student, method=HessianMaps(wrt="weight"), **options
    ).layer_divergences(x, y, create_graph=False)
    assert calls == [(False, 4), (False, 1)]  # teacher_probes=None: 4 for wrt="weight"
    calls.clear()
    method = HessianMaps(wrt="weight", num_probes=2, teacher_probes=3)
    DistillationModule(teacher, student, method=method, **options).layer_divergences(
        x, y, create_graph=True
    )
    assert calls == [(False, 3), (True, 2)]
    with pytest.raises(ValueError, match="teacher_probes must be at least 1"):
        HessianMaps(teacher_probes=0)


# ------------------------------------------------------------- guards (nothing silently wrong)
def test_one_nan_image_stops_the_fit_with_the_cause(tmp_path):
    """A NaN input makes the loss NaN: the fit stops at that batch, naming the batch and the
    non-finite inputs, before the student's weights turn NaN."""
    teacher, student = pair()
    x, y = batch(n=24)
    x[13, 0, 2, 2] = math.nan  # batch 1 (batch size 8)
    module = DistillationModule(teacher, student, num_classes=5, layers=PAIRS[:2])
    data = DataLoader(TensorDataset(x, y), batch_size=8)
    with pytest.raises(NonFiniteLossError, match=r"batch 1 .*1 non-finite input values"):
        trainer(tmp_path).fit(module, data)
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_a_huge_learning_rate_stops_with_a_hint(tmp_path):
    teacher, student = pair()
    module = DistillationModule(
        teacher,
        student,
        num_classes=5,
        layers=PAIRS[:2],
        optimizer=functools.partial(torch.optim.SGD, lr=1e12),
    )
    with pytest.raises(NonFiniteLossError, match="lower lr"):
        trainer(tmp_path, max_epochs=3).fit(module, loader())


def test_frozen_or_compiled_students_are_refused_with_the_fix():
    teacher, student = pair()
    with pytest.raises(ValueError, match=r"no trainable parameters.*requires_grad_\(True\)"):
        DistillationModule(teacher, student.requires_grad_(False), num_classes=5)
    student.requires_grad_(True)
    compiled = torch.compile(student)
    with pytest.raises(ValueError, match=r"compiled with torch.compile.*student._orig_mod"):
        DistillationModule(teacher, compiled, method="hessian", num_classes=5)
    DistillationModule(teacher, compiled, method="attention", num_classes=5)  # no derivatives


def test_predict_step_uses_an_unpack_batch_override(tmp_path):
    class DictBatches(DistillationModule):
        def unpack_batch(self, batch):
            return batch["image"], batch["label"]

    teacher, student = pair()
    module = DictBatches(teacher, student, num_classes=5)
    x, y = batch()
    data = DataLoader([{"image": xi, "label": yi} for xi, yi in zip(x, y, strict=True)], 3)
    logits = torch.cat(trainer(tmp_path).predict(module, data))
    torch.testing.assert_close(logits, student.eval()(x))


def test_lr_find_sets_the_learning_rate_of_every_group(tmp_path):
    """``Tuner.lr_find(update_attr=True)`` finds ``learning_rate`` on the module and the next
    optimizer uses it for every param group, over the optimizer factory's own ``lr``."""
    from lightning.pytorch.tuner import Tuner

    teacher, student = pair()
    module = DistillationModule(teacher, student, num_classes=5, layers=PAIRS[:2])
    fit = trainer(tmp_path, max_epochs=1)
    data = loader(n=96, batch_size=4)
    result = Tuner(fit).lr_find(module, data, num_training=20, early_stop_threshold=None)
    assert result is not None and module.learning_rate == result.suggestion() is not None
    optimizer = module.configure_optimizers()  # no scheduler: the optimizer itself
    assert {g["lr"] for g in optimizer.param_groups} == {module.learning_rate}


# ---------------------------------------------------------------------- one network, two roles
def test_the_same_network_as_teacher_and_student_is_a_clear_error():
    """Freezing the teacher would freeze the student it is: refused, with the fix; a copy is a
    teacher (self-distillation), and the student stays trainable."""
    _, net = pair()
    message = (
        r"^teacher and student share the same module: the teacher is frozen "
        r"\(requires_grad_\(False\)\), which would freeze the student with it; pass a separate "
        r"teacher, e.g. copy.deepcopy\(student\) for self-distillation$"
    )
    with pytest.raises(ValueError, match=message):
        DistillationModule(net, net, num_classes=5, layers=PAIRS[:1])
    wrapper = nn.Sequential(net)  # another module around the same parameters
    with pytest.raises(ValueError, match=r"^teacher and student share \d+ parameters: "):
        DistillationModule(wrapper, net, num_classes=5, layers=[("layer1", "0.layer1")])
    assert all(p.requires_grad for p in net.parameters())
    module = DistillationModule(copy.deepcopy(net), net, num_classes=5, layers=PAIRS[:1])
    assert all(p.requires_grad for p in module.student.parameters())
