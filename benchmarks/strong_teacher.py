"""The strong-teacher benchmark: does distillation (and the layer-wise rule) help a student?

A trained CIFAR-10 teacher (``resnet(18, width=16)``) is distilled into ``resnet(10, width=8)``
trained on the first ``--train-images`` training images (in the order of the arrays) with crop
and flip, SGD 0.05 / momentum 0.9 / weight decay 5e-4, batch 128, MultiStepLR x0.1 at 1/2 and
3/4 of the epochs; the student is scored on the whole test split. One JSON file per
(configuration, seed) lands in ``--out``; a finished run is skipped, so a grid can be stopped
and started again. ``--report`` turns the folder into a mean ± std table.

    python benchmarks/strong_teacher.py --data /tmp/cifar10 --teacher TEACHER.pt \\
        --out benchmarks/results/strong_teacher --epochs 30 --configs all
    python benchmarks/strong_teacher.py --report --out benchmarks/results/strong_teacher

``--configs`` takes names from ``CONFIGS`` (or ``all``); seeds are the outer loop, so a grid
cut short holds whole seeds of its first configurations.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import DataLoader

from lightning_layerkd import DistillationModule, LayerwiseLRCallback
from lightning_layerkd.data import ArrayImageDataset, RandomCropFlip
from lightning_layerkd.methods import method_class
from lightning_layerkd.models import resnet

#: The teacher's normalisation (CIFAR-10 train split statistics, [0, 1] scale).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def _schedules() -> dict[str, dict[str, Any] | None]:
    return {
        "constant": None,
        "relative-0.5": {"rule": "relative", "power": -0.5},
        "relative+0.5": {"rule": "relative", "power": 0.5},
        "paper": {"rule": "paper"},
    }


def _configs() -> dict[str, dict[str, Any]]:
    configs: dict[str, dict[str, Any]] = {"student": {"method": "none", "schedule": None}}
    methods = {
        "attention": {"method": "attention"},
        "jacobian-activation": {"method": "jacobian", "wrt": "activation"},
        "jacobian-weight": {"method": "jacobian", "wrt": "weight"},
        "hessian-weight": {"method": "hessian", "wrt": "weight"},
        "hessian-activation": {"method": "hessian", "wrt": "activation"},
    }
    for method, options in methods.items():
        for schedule, rule in _schedules().items():
            configs[f"{method}/{schedule}"] = {**options, "schedule": rule}
    return configs


CONFIGS = _configs()


def load_split(data: Path, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    x = np.load(data / f"x_{split}.npy", mmap_mode="r")
    y = np.load(data / f"y_{split}.npy", mmap_mode="r")
    if limit is not None:
        x, y = x[:limit], y[:limit]
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    return images, torch.from_numpy(np.asarray(y, dtype=np.int64))


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader: DataLoader, device: str = "cpu") -> float:
    model.eval().to(device)
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / total


def run_one(args: argparse.Namespace, name: str, seed: int, test: DataLoader) -> dict[str, Any]:
    config = CONFIGS[name]
    seed_everything(seed, workers=True)
    images, labels = load_split(args.data, "train", args.train_images)
    train_set = ArrayImageDataset(images, labels, MEAN, STD, RandomCropFlip(4), seed=seed)
    train = DataLoader(
        train_set,
        batch_size=128,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    teacher = None
    if config["method"] != "none":
        teacher = resnet(18, num_classes=10, width=16)
        teacher.load_state_dict(torch.load(args.teacher, weights_only=True))
    student = resnet(10, num_classes=10, width=8)
    milestones = [args.epochs // 2, (3 * args.epochs) // 4]
    options = {k: v for k, v in config.items() if k not in ("method", "schedule")}
    module = DistillationModule(
        teacher,
        student,
        method=method_class(config["method"])(**options),
        num_classes=10,
        optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4),
        scheduler=partial(torch.optim.lr_scheduler.MultiStepLR, milestones=milestones, gamma=0.1),
    )
    callbacks = []
    if config["schedule"] is not None:
        callbacks.append(
            LayerwiseLRCallback(every_n_epochs=args.every_n_epochs, **config["schedule"])
        )
    trainer = Trainer(
        max_epochs=args.epochs,
        accelerator=args.device,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(module, train)
    seconds = time.perf_counter() - start
    record: dict[str, Any] = {
        "config": name,
        "seed": seed,
        "test_accuracy": accuracy(student, test, _torch_device(args.device)),
        "epochs": args.epochs,
        "train_images": len(train_set),
        "every_n_epochs": args.every_n_epochs,
        "layers": [list(p) for p in module.layer_pairs or []],
        "final_lrs": {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups},
        "seconds": seconds,
        "threads": torch.get_num_threads(),
        "device": args.device,
    }
    if callbacks:
        record["history"] = callbacks[0].history
    return record


def _torch_device(accelerator: str) -> str:
    return "cuda" if accelerator in ("gpu", "cuda") else "cpu"


def run_grid(args: argparse.Namespace) -> None:
    names = list(CONFIGS) if args.configs == ["all"] else args.configs
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; choose from {list(CONFIGS)}")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    images, labels = load_split(args.data, "test", None)
    test = DataLoader(ArrayImageDataset(images, labels, MEAN, STD), batch_size=500)
    teacher_file = args.out / "teacher.json"
    if not teacher_file.exists():
        teacher = resnet(18, num_classes=10, width=16)
        teacher.load_state_dict(torch.load(args.teacher, weights_only=True))
        acc = accuracy(teacher, test, _torch_device(args.device))
        teacher_file.write_text(json.dumps({"test_accuracy": acc}))
    for seed in args.seeds:
        for name in names:
            path = args.out / f"{name.replace('/', '__')}__seed{seed}.json"
            if path.exists():
                continue
            record = run_one(args, name, seed, test)
            path.write_text(json.dumps(record, indent=1))
            print(f"{name} seed {seed}: {record['test_accuracy']:.2f}% ({record['seconds']:.0f} s)")


def report(out: Path) -> str:
    runs: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(out.glob("*__seed*.json")):
        record = json.loads(path.read_text())
        runs.setdefault(record["config"], []).append(record)
    teacher = json.loads((out / "teacher.json").read_text())["test_accuracy"]
    lines = [
        "| configuration | student accuracy (%) | seeds | minus the student alone, paired by seed "
        "(points) | final crucial-layer lr / base lr |",
        "|---|---|---|---|---|",
    ]
    for name in [n for n in CONFIGS if n in runs]:
        accs = [r["test_accuracy"] for r in runs[name]]
        std = statistics.stdev(accs) if len(accs) > 1 else math.nan
        ratios = [
            v / r["final_lrs"]["base"]
            for r in runs[name]
            for k, v in r["final_lrs"].items()
            if k != "base"
        ]
        spread = f"{min(ratios):.3g} - {max(ratios):.3g}" if ratios else "-"
        mean = statistics.mean(accs)
        alone = {r["seed"]: r["test_accuracy"] for r in runs.get("student", [])}
        diffs = [r["test_accuracy"] - alone[r["seed"]] for r in runs[name] if r["seed"] in alone]
        paired = "-"
        if name != "student" and diffs:
            d_std = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
            paired = f"{statistics.mean(diffs):+.2f} ± {d_std:.2f}"
        lines.append(f"| {name} | {mean:.2f} ± {std:.2f} | {len(accs)} | {paired} | {spread} |")
    lines.append(f"| teacher | {teacher:.2f} | - | - | - |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="folder with x_train.npy ... (unpacked CIFAR-10)")
    parser.add_argument("--teacher", type=Path, help="state_dict of resnet(18, width=16)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--configs", nargs="+", default=["all"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--every-n-epochs", type=int, default=5)
    parser.add_argument("--train-images", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="accelerator")
    parser.add_argument("--report", action="store_true", help="print the table of --out")
    args = parser.parse_args()
    if args.report:
        table = report(args.out)
        (args.out / "table.md").write_text(table + "\n")
        print(table)
        return
    if args.data is None or args.teacher is None:
        parser.error("--data and --teacher are needed to run the grid")
    run_grid(args)


if __name__ == "__main__":
    main()
