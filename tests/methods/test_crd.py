"""CRD (Tian et al. 2020) through DistillationModule: one step by hand (heads, NCE critic, the
bank update), indices required in training and no update in validation, the heads in their
layer's param group, resume identical to an uninterrupted run, bad options."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from lightning_layerkd import DistillationModule, LayerwiseLRCallback
from lightning_layerkd.data.base import IndexedDataset
from lightning_layerkd.methods import CRD
from lightning_layerkd.methods.crd import ContrastLayer
from lightning_layerkd.models import resnet
from tests.helpers.callback import BATCH, LAYERS, LR, N_TRAIN
from tests.helpers.models import make_random_dataset, make_tiny_cnn, make_trainer_kwargs

CLASSES = 5


def small_module(**options) -> tuple[DistillationModule, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    teacher = resnet(18, CLASSES, width=8).double().eval()
    student = resnet(10, CLASSES, width=4).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (4,), generator=g)
    method = CRD(dim=3, num_negatives=5, num_samples=10, tau=0.2, **options)
    layers = [("layer2", "layer2"), ("layer3", "layer4")]
    module = DistillationModule(teacher, student, method=method, layers=layers, num_classes=CLASSES)
    module.resolve_layers(x)
    return module, x, y


def feature(model: torch.nn.Module, path: str, x: torch.Tensor) -> np.ndarray:
    found = []
    handle = model.get_submodule(path).register_forward_hook(lambda m, i, o: found.append(o))
    with torch.no_grad():
        model(x)
    handle.remove()
    return found[0].numpy()


def embed(f: np.ndarray, linear: torch.nn.Linear) -> np.ndarray:
    pooled = f.mean(axis=(2, 3))
    z = pooled @ linear.weight.detach().numpy().T + linear.bias.detach().numpy()
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def test_one_training_step_by_hand_loss_and_bank_update():
    module, x, y = small_module(crd_weight=0.5)
    parts = module.method_parts
    assert parts is not None
    banks = [p.bank.clone() for p in parts.per_layer]  # type: ignore[union-attr]
    method = module.method
    assert isinstance(method, CRD)
    drawn = [method._negatives(parts, j, 4, torch.device("cpu")) for j in range(2)]  # step 0
    indices = torch.tensor([7, 2, 9, 0])
    module.set_layer_loss_weights({"layer2": 1.0, "layer3": 0.5})
    out = module.training_step((x, y, indices), 0)

    module.student.train()
    total = 0.0
    for j, (s_path, t_path) in enumerate(module.layer_pairs):
        part = parts.per_layer[j]
        assert isinstance(part, ContrastLayer)
        s = embed(feature(module.student, s_path, x), part.student_head.linear)
        t = embed(feature(module.teacher, t_path, x), part.teacher_head.linear)
        bank = banks[j].numpy()
        want = []
        for i in range(4):  # eq. 18 with eq. 19's h, N = 5 negatives, M = 10
            e = math.exp(s[i] @ t[i] / 0.2)
            loss = -math.log(e / (e + 5 / 10))
            for k in drawn[j][i].tolist():
                e_k = math.exp(s[i] @ bank[k] / 0.2)
                loss -= math.log(1 - e_k / (e_k + 5 / 10))
            want.append(loss)
        name = s_path
        np.testing.assert_allclose(out["layer_divergence"][name].numpy(), want, rtol=1e-10)
        total += {"layer2": 1.0, "layer3": 0.5}[name] * np.mean(want)
        # the bank: the batch's rows moved to normalize(0.5 v + 0.5 t), the others untouched
        updated = 0.5 * bank[indices.numpy()] + 0.5 * t
        updated /= np.linalg.norm(updated, axis=1, keepdims=True)
        np.testing.assert_allclose(part.bank[indices].numpy(), updated, rtol=1e-12)
        others = [k for k in range(10) if k not in indices.tolist()]
        assert torch.equal(part.bank[others], banks[j][others])
    ce = F.cross_entropy(module.student(x), y).item()
    assert out["loss"].item() == pytest.approx(ce + 0.5 * total, rel=1e-10)
    assert int(parts.shared.step) == 1  # type: ignore[arg-type]


def test_training_needs_indices_and_validation_leaves_the_bank_alone():
    module, x, y = small_module()
    with pytest.raises(ValueError, match="CRD needs each training sample's index"):
        module.training_step((x, y), 0)
    parts = module.method_parts
    assert parts is not None
    before = [p.bank.clone() for p in parts.per_layer]  # type: ignore[union-attr]
    module.eval()
    with torch.no_grad():
        divergences = module.layer_divergences(x, y, create_graph=False)[1]
    assert all(d.shape == (4,) and (d > 0).all() for d in divergences.values())
    for p, b in zip(parts.per_layer, before, strict=True):
        assert torch.equal(p.bank, b)  # type: ignore[arg-type]


def test_heads_join_their_layers_param_group_and_gradients_reach_them():
    module, x, y = small_module()
    groups = {g["name"]: {id(p) for p in g["params"]} for g in module.param_groups()}
    parts = module.method_parts
    assert parts is not None
    for name, part in zip(module.layer_names, parts.per_layer, strict=True):
        assert {id(p) for p in part.parameters()} <= groups[name]
    terms = module.distillation_terms(x, y, create_graph=True, indices=torch.arange(4))
    terms.losses["crd_loss"].backward()
    for part in parts.per_layer:
        assert isinstance(part, ContrastLayer)
        assert part.student_head.linear.weight.grad.abs().sum() > 0
        assert part.teacher_head.linear.weight.grad.abs().sum() > 0
        assert not part.bank.requires_grad
    assert all(p.grad is None for p in module.teacher.parameters())


def _fit(root: Path, epochs: int, ckpt_path: str | None = None) -> DistillationModule:
    seed_everything(0, workers=True)
    module = DistillationModule(
        make_tiny_cnn(8),
        make_tiny_cnn(4),
        method=CRD(dim=4, num_negatives=6),
        layers=LAYERS,
        num_classes=10,
        optimizer=functools.partial(torch.optim.SGD, lr=LR, momentum=0.9),
    )
    # a fixed order: a shuffled loader's generator is not part of a checkpoint
    loader = DataLoader(IndexedDataset(make_random_dataset(N_TRAIN, 0)), batch_size=BATCH)
    trainer = Trainer(
        max_epochs=epochs,
        deterministic=True,
        callbacks=[
            LayerwiseLRCallback(every_n_epochs=1),
            ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_epochs=1),
        ],
        **make_trainer_kwargs(root, enable_checkpointing=True, limit_val_batches=0),
    )
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return module


def test_resume_restores_heads_and_banks_and_ends_like_an_uninterrupted_run(tmp_path: Path):
    straight = _fit(tmp_path / "straight", 3)
    _fit(tmp_path / "resumed", 1)
    resumed = _fit(tmp_path / "resumed", 3, str(tmp_path / "resumed" / "ckpt" / "last.ckpt"))
    assert straight.method_parts is not None and resumed.method_parts is not None
    assert straight.method_parts.per_layer[0].bank.shape == (N_TRAIN, 4)  # type: ignore[union-attr]
    assert int(straight.method_parts.shared.step) == 9  # type: ignore[arg-type]
    s_state, r_state = straight.state_dict(), resumed.state_dict()
    assert s_state.keys() == r_state.keys()
    for key in s_state:
        torch.testing.assert_close(r_state[key], s_state[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"crd_weight": -1.0}, "crd_weight must be non-negative"),
        ({"dim": 0}, "dim must be a positive integer"),
        ({"num_negatives": 2.5}, "num_negatives must be a positive integer"),
        ({"tau": 0.0}, "tau must be positive"),
        ({"momentum": 1.0}, r"momentum must lie in \[0, 1\)"),
        ({"num_samples": 0}, "num_samples must be at least 1"),
    ],
)
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        CRD(**options)


def test_the_bank_needs_the_training_set_size():
    torch.manual_seed(0)
    module = DistillationModule(
        make_tiny_cnn(8), make_tiny_cnn(4), method="crd", layers=LAYERS, num_classes=10
    )
    with pytest.raises(ValueError, match="CRD keeps a memory bank.*num_samples"):
        module.resolve_layers(torch.randn(2, 3, 8, 8))


class SaveBanks(Callback):
    """Writes each rank's banks and step at the end of training (spawned ranks do not return)."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: Trainer, pl_module: DistillationModule) -> None:  # type: ignore[override]
        parts = pl_module.method_parts
        assert parts is not None
        torch.save(
            {"banks": [p.bank.clone() for p in parts.per_layer], "step": int(parts.shared.step)},
            self.out_dir / f"rank{trainer.global_rank}.pt",
        )


@pytest.mark.slow
def test_ddp_ranks_update_every_row_and_keep_equal_banks(tmp_path: Path):
    """Two CPU processes (gloo, spawn), each seeing half the samples: after one epoch both
    banks hold every sample's update (the ranks gather their embeddings), and are equal."""
    seed_everything(0)
    module = DistillationModule(
        make_tiny_cnn(8),
        make_tiny_cnn(4),
        method=CRD(dim=4, num_negatives=6),
        layers=LAYERS,
        num_classes=10,
        optimizer=functools.partial(torch.optim.SGD, lr=LR, momentum=0.9),
    )
    initial = CRD(dim=4, num_negatives=6).build_parts(
        [(4, 8, 8), (8, 4, 4)], [(8, 8, 8), (16, 4, 4)], 16
    )
    loader = DataLoader(IndexedDataset(make_random_dataset(16, 0)), batch_size=4)
    trainer = Trainer(
        max_epochs=1,
        callbacks=[SaveBanks(tmp_path)],
        **make_trainer_kwargs(
            tmp_path,
            strategy=DDPStrategy(process_group_backend="gloo", start_method="spawn"),
            devices=2,
            num_sanity_val_steps=0,
            limit_val_batches=0,
        ),
    )
    trainer.fit(module, loader)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == 2  # 8 samples per rank, batches of 4
    for j in range(2):
        a, b = ranks[0]["banks"][j], ranks[1]["banks"][j]
        assert a.shape == (16, 4)
        assert torch.equal(a, b)
        start = initial.per_layer[j].bank  # type: ignore[union-attr]
        moved = (a - start).norm(dim=1)
        assert (moved > 1e-6).all()  # every sample's row, seen by one rank or the other
        np.testing.assert_allclose(a.norm(dim=1).numpy(), 1.0, rtol=1e-6)
