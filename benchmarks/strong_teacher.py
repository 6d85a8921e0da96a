"""The strong-teacher benchmark: does distillation (and the layer-wise rule) help a student?

A trained teacher (``resnet(18, width=16)``) is distilled into ``resnet(10, width=8)`` trained on
the first ``--train-images`` training images (in the order of the arrays) with crop and flip,
SGD at ``--lrs`` / momentum 0.9 / weight decay 5e-4, batch 128, MultiStepLR x0.1 at 1/2 and 3/4
of the epochs; the student is scored on the whole test split. ``--dataset`` picks the
normalisation, the classes, the teacher and the regime's defaults (``REGIMES``). One JSON file per
(configuration, learning rate, seed) lands in ``--out``; a finished run is skipped, so a grid can
be stopped and started again. ``--jobs N`` runs N of them side by side, one thread each (every
run seeds itself, so the results equal a sequential run's). ``--report`` writes the table.

    python benchmarks/strong_teacher.py --dataset cifar100 --data /tmp/cifar100 \\
        --out benchmarks/results/strong_teacher/cifar100 --configs student --lrs 0.05 0.1 --jobs 2
    python benchmarks/strong_teacher.py --report --out benchmarks/results/strong_teacher/cifar100
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch.utils.data import DataLoader

from lightning_layerkd import DistillationModule, LayerwiseLRCallback
from lightning_layerkd.data import ArrayImageDataset, IndexedDataset, RandomCropFlip
from lightning_layerkd.methods import DISTLoss, DKDLoss, method_class
from lightning_layerkd.models import resnet
from lightning_layerkd.param_groups import named_param_groups, scale_param_group

log = logging.getLogger("strong_teacher")
INPUTS = Path(__file__).parent / "inputs"  # teachers copied here (ignored by git)


@dataclass(frozen=True)
class Regime:
    """What differs between the datasets: normalisation, classes, teacher and the scale."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_classes: int
    train_images: int
    epochs: int
    every_n_epochs: int

    def teacher(self, name: str) -> Path:
        return INPUTS / f"{name}_resnet18_w16.pt"


REGIMES = {
    "cifar10": Regime((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 10, 5000, 10, 2),
    "cifar100": Regime((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 100, 10000, 15, 3),
}
#: Hinton et al.'s weight of the KD term where logit KD is used (T = 4).
LOGIT_WEIGHT = 1.0
#: DKD's warm-up: their 20 of 240 epochs is 0.8-1.3 of our 10-15; Lightning counts epochs, so 2
#: (half the weight in the first epoch) is the shortest warm-up there is (1 would be none: at
#: rate 0.2 on CIFAR-10, seed 0, none gave 20.44% and a 3-epoch warm-up 42.73%)
DKD_WARMUP = 2
#: Logit standardization's CIFAR-100 recipe (Sun et al.'s repository: ``--logit-stand
#: --base-temp 2 --kd-weight 9``): base temperature 2, KD weighted 9, DKD's alpha and beta times 9
LS_KD = {"standardize": True, "temperature": 2.0, "logit_weight": 9.0}
LS_DKD = {"standardize": True, "temperature": 2.0, "alpha": 9.0, "beta": 72.0}
SENSITIVITY = {
    "fixed-4,2,0.5,0.25": (4.0, 2.0, 0.5, 0.25),
    "fixed-0.25,0.5,2,4": (0.25, 0.5, 2.0, 4.0),
}


def _configs() -> dict[str, dict[str, Any]]:
    """Every configuration by name: a method with its options and what changes its rates."""
    schedules: dict[str, dict[str, Any]] = {
        "constant": {},
        "relative-0.5": {"callback": {"rule": "relative", "power": -0.5}},  # the default rule
        "relative+0.5": {"callback": {"rule": "relative", "power": 0.5}},
        "paper": {"callback": {"rule": "paper"}},
        "relative-2": {"callback": {"rule": "relative", "power": -2.0, "max_factor": 16.0}},
        "map-weight-0.5": {"callback": {"power": -0.5, "target": "map_weight"}},
        "map-weight+1": {"callback": {"power": 1.0, "target": "map_weight"}},
        **{name: {"fixed": factors} for name, factors in SENSITIVITY.items()},
    }
    maps = {
        "attention": {"method": "attention"},
        "attention+logits": {"method": "attention", "logit_weight": LOGIT_WEIGHT},
        "jacobian-activation": {"method": "jacobian", "wrt": "activation"},
        "jacobian-weight": {"method": "jacobian", "wrt": "weight"},
        "hessian-activation": {"method": "hessian", "wrt": "activation"},
        "hessian-weight": {"method": "hessian", "wrt": "weight"},
    }
    features = {  # feature methods with per-layer terms (issue 30), their papers' weights
        "fitnet": {"method": "fitnet"},
        "attention_transfer": {"method": "attention_transfer"},
        "crd": {"method": "crd"},
        "review_kd": {"method": "review_kd"},
    }
    feature_schedules = ("constant", "relative-0.5", "map-weight-0.5")
    configs: dict[str, dict[str, Any]] = {
        "student": {"method": "none"},
        "logits": {"method": "logits", "logit_weight": LOGIT_WEIGHT},
        "jacobian_matching": {"method": "jacobian_matching"},  # the output and layer1..layer4
        "information_flow": {"method": "information_flow", "auxiliary": True},
        # which of Jacobian matching's terms carry its gain (issue 28): eq. 10 on the output
        # alone, and the output plus one crucial layer's attention pixel (section 6.3.2)
        "jacobian_matching/output": {"method": "jacobian_matching", "layers": []},
        **{
            f"jacobian_matching/layer{i}": {
                "method": "jacobian_matching",
                "layers": [(f"layer{i}", f"layer{i}")],
            }
            for i in range(1, 5)
        },
        # the logit methods of the CIFAR-100 tables, at their papers' defaults (design.md 10)
        "dkd": {"method": "dkd", "warmup_epochs": DKD_WARMUP},
        "dist": {"method": "dist"},
        "logits+ls": {"method": "logits", **LS_KD},
        "dkd+ls": {"method": "dkd", "warmup_epochs": DKD_WARMUP, **LS_DKD},
        # a map method composed with a logit loss (logit_loss: any method, any logit loss)
        "attention+dkd": {"method": "attention", "logit_loss": DKDLoss(warmup_epochs=DKD_WARMUP)},
        "attention+dkd+ls": {
            "method": "attention",
            "logit_loss": DKDLoss(warmup_epochs=DKD_WARMUP, **LS_DKD),
        },
        "attention+dist": {"method": "attention", "logit_loss": DISTLoss()},
        "jacobian_matching+dkd": {
            "method": "jacobian_matching",
            "logit_loss": DKDLoss(warmup_epochs=DKD_WARMUP),
        },
        "jacobian_matching+dist": {"method": "jacobian_matching", "logit_loss": DISTLoss()},
    }
    for method, options in maps.items():
        for schedule, how in schedules.items():
            configs[f"{method}/{schedule}"] = {**options, **how}
    for method, options in features.items():
        for schedule in feature_schedules:
            configs[f"{method}/{schedule}"] = {**options, **schedules[schedule]}
    return configs


CONFIGS = _configs()
_NOT_OPTIONS = ("method", "callback", "fixed", "layers")


class FixedFactors(Callback):
    """Multiply the crucial layers' rates (in the module's layer order) by fixed factors from
    the first step: the sensitivity rows (no layer-wise callback)."""

    def __init__(self, factors: tuple[float, ...]) -> None:
        self.factors = factors

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        names = pl_module.layer_names  # type: ignore[attr-defined]
        if len(names) != len(self.factors):
            raise ValueError(f"{len(self.factors)} factors for {len(names)} layers {names}")
        groups = named_param_groups(trainer.optimizers)
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        for name, factor in zip(names, self.factors, strict=True):
            for optimizer, index in groups[name]:
                scale_param_group(optimizer, index, schedulers, factor)


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


def _load_teacher(args: argparse.Namespace, regime: Regime) -> torch.nn.Module:
    teacher = resnet(18, num_classes=regime.num_classes, width=16)
    teacher.load_state_dict(torch.load(args.teacher, weights_only=True))
    return teacher


def _fit(
    args: argparse.Namespace, module: DistillationModule, train: DataLoader, callbacks: list
) -> Trainer:
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
    trainer.fit(module, train)
    return trainer


def run_one(args: argparse.Namespace, name: str, lr: float, seed: int) -> dict[str, Any]:
    """Train one student (and information flow's auxiliary network first) and score it."""
    torch.set_num_threads(args.threads)
    regime = REGIMES[args.dataset]
    config = CONFIGS[name]
    seed_everything(seed, workers=True)
    images, labels = load_split(args.data, "train", args.train_images)
    train_set = ArrayImageDataset(
        images, labels, regime.mean, regime.std, RandomCropFlip(4), seed=seed
    )
    options = {k: v for k, v in config.items() if k not in _NOT_OPTIONS}
    method = method_class(config["method"])(**options)
    if method.needs_sample_indices:  # CRD's memory bank: batches (images, labels, indices)
        train_set = IndexedDataset(train_set)
    train = DataLoader(
        train_set, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    milestones = [args.epochs // 2, (3 * args.epochs) // 4]

    def module(
        teacher: torch.nn.Module | None, student: torch.nn.Module, method: Any, layers: Any = "auto"
    ) -> DistillationModule:
        return DistillationModule(
            teacher,
            student,
            method=method,
            layers=layers,
            num_classes=regime.num_classes,
            optimizer=partial(torch.optim.SGD, lr=lr, momentum=0.9, weight_decay=5e-4),
            scheduler=partial(
                torch.optim.lr_scheduler.MultiStepLR, milestones=milestones, gamma=0.1
            ),
        )

    start, cpu_start = time.perf_counter(), time.process_time()
    teacher = None if config["method"] == "none" else _load_teacher(args, regime)
    record: dict[str, Any] = {}
    if options.get("auxiliary"):  # Passalis et al. 3.2: the student at twice the width first
        auxiliary = resnet(10, num_classes=regime.num_classes, width=16)
        _fit(args, module(teacher, auxiliary, method, []), train, [])
        record["auxiliary_test_accuracy"] = accuracy(auxiliary, args.test_loader)
        teacher = auxiliary.requires_grad_(False)
        seed_everything(seed, workers=True)
    student = resnet(10, num_classes=regime.num_classes, width=8)
    distiller = module(teacher, student, method, config.get("layers", "auto"))
    callbacks: list[Callback] = []
    if "callback" in config:
        callbacks.append(
            LayerwiseLRCallback(every_n_epochs=args.every_n_epochs, **config["callback"])
        )
    if "fixed" in config:
        callbacks.append(FixedFactors(config["fixed"]))
    trainer = _fit(args, distiller, train, callbacks)
    record.update(
        {
            "config": name,
            "dataset": args.dataset,
            "lr": lr,
            "seed": seed,
            "test_accuracy": accuracy(student, args.test_loader, _torch_device(args.device)),
            "epochs": args.epochs,
            "train_images": len(train_set),
            "every_n_epochs": args.every_n_epochs,
            "layers": [list(p) for p in distiller.layer_pairs or []],
            "final_lrs": {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups},
            "seconds": time.perf_counter() - start,
            # this process's CPU time: core-seconds, whatever else shares the machine
            "cpu_seconds": time.process_time() - cpu_start,
            "threads": torch.get_num_threads(),
            "device": args.device,
        }
    )
    if "callback" in config:
        record["history"] = callbacks[0].history  # type: ignore[attr-defined]
    return record


def _torch_device(accelerator: str) -> str:
    return "cuda" if accelerator in ("gpu", "cuda") else "cpu"


def _run_file(out: Path, name: str, lr: float, seed: int) -> Path:
    return out / f"{name.replace('/', '__')}__lr{lr:g}__seed{seed}.json"


def _worker(args: argparse.Namespace, name: str, lr: float, seed: int) -> tuple[str, str]:
    """One run in a worker process; writes its JSON atomically and returns a log line."""
    regime = REGIMES[args.dataset]
    if getattr(args, "test_loader", None) is None:
        images, labels = load_split(args.data, "test", None)
        args.test_loader = DataLoader(
            ArrayImageDataset(images, labels, regime.mean, regime.std), batch_size=500
        )
    record = run_one(args, name, lr, seed)
    path = _run_file(args.out, name, lr, seed)
    partial_file = path.with_suffix(".json.part")
    partial_file.write_text(json.dumps(record, indent=1))
    partial_file.replace(path)
    return str(
        path
    ), f"{name} lr {lr:g} seed {seed}: {record['test_accuracy']:.2f}% ({record['seconds']:.0f} s)"


def tuned_lr(out: Path, seeds: list[int]) -> float:
    """The base learning rate at which the student alone has the best mean accuracy over
    ``seeds`` in ``out`` (every rate of the grid needs every seed)."""
    means: dict[float, list[float]] = {}
    for path in out.glob("student__lr*__seed*.json"):
        record = json.loads(path.read_text())
        if record["seed"] in seeds:
            means.setdefault(record["lr"], []).append(record["test_accuracy"])
    complete = {lr: statistics.mean(accs) for lr, accs in means.items() if len(accs) == len(seeds)}
    if not complete or len(complete) != len(means):
        raise SystemExit(
            f"--lrs tuned needs the student alone at every rate of the grid for seeds {seeds} "
            f"in {out}; found {sorted((lr, len(a)) for lr, a in means.items())}"
        )
    return max(complete, key=lambda lr: complete[lr])


def run_grid(args: argparse.Namespace) -> None:
    names = list(CONFIGS) if args.configs == ["all"] else args.configs
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; choose from {list(CONFIGS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.lrs == ["tuned"]:
        args.lrs = [tuned_lr(args.out, args.seeds)]
        log.info("the student alone's best base learning rate in %s: %g", args.out, args.lrs[0])
    else:
        args.lrs = [float(lr) for lr in args.lrs]
    regime = REGIMES[args.dataset]
    teacher_file = args.out / "teacher.json"
    if not teacher_file.exists():
        images, labels = load_split(args.data, "test", None)
        test = DataLoader(
            ArrayImageDataset(images, labels, regime.mean, regime.std), batch_size=500
        )
        acc = accuracy(_load_teacher(args, regime), test, _torch_device(args.device))
        teacher_file.write_text(json.dumps({"test_accuracy": acc, "dataset": args.dataset}))
    todo = [
        (name, lr, seed)
        for seed in args.seeds
        for lr in args.lrs
        for name in names
        if not _run_file(args.out, name, lr, seed).exists()
    ]
    log.info("%d runs to do in %s with %d job(s)", len(todo), args.out, args.jobs)
    args.test_loader = None
    if args.jobs == 1:
        for job in todo:
            log.info(_worker(args, *job)[1])
        return
    with ProcessPoolExecutor(args.jobs) as pool:
        for _, line in pool.map(partial(_worker, args), *zip(*todo, strict=True)) if todo else []:
            log.info(line)


def _paired(rows: list[dict[str, Any]], base: list[dict[str, Any]]) -> str:
    """Mean ± std of the accuracy differences to ``base``, paired by seed, and their count."""
    by_seed = {r["seed"]: r["test_accuracy"] for r in base}
    diffs = [r["test_accuracy"] - by_seed[r["seed"]] for r in rows if r["seed"] in by_seed]
    if not diffs or rows is base:
        return "-"
    d_std = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
    return f"{statistics.mean(diffs):+.2f} ± {d_std:.2f} ({len(diffs)})"


def report(out: Path) -> str:
    """The mean ± std table of ``out``, one row per (configuration, learning rate), with the
    differences to the student alone and, for a schedule, to its maps' constant schedule at the
    same rate, both paired by seed."""
    runs: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for path in sorted(out.glob("*__seed*.json")):
        record = json.loads(path.read_text())
        runs.setdefault((record["config"], record.get("lr", 0.05)), []).append(record)
    teacher = json.loads((out / "teacher.json").read_text())["test_accuracy"]
    lines = [
        "| configuration | lr | student accuracy (%) | seeds | minus the student alone "
        "(paired, seeds) | minus the constant schedule (paired, seeds) | crucial lr / base lr |",
        "|---|---|---|---|---|---|---|",
    ]
    order = {name: i for i, name in enumerate(CONFIGS)}
    for name, lr in sorted(runs, key=lambda k: (k[1], order.get(k[0], 1e9))):
        rows = runs[(name, lr)]
        accs = [r["test_accuracy"] for r in rows]
        std = statistics.stdev(accs) if len(accs) > 1 else math.nan
        ratios = [
            v / r["final_lrs"]["base"]
            for r in rows
            for k, v in r["final_lrs"].items()
            if k != "base"
        ]
        spread = f"{min(ratios):.3g} - {max(ratios):.3g}" if ratios else "-"
        maps, _, schedule = name.partition("/")
        constant = runs.get((f"{maps}/constant", lr), []) if schedule != "constant" else []
        cells = [
            name,
            f"{lr:g}",
            f"{statistics.mean(accs):.2f} ± {std:.2f}",
            str(len(accs)),
            _paired(rows, runs.get(("student", lr), rows)),
            _paired(rows, constant) if schedule else "-",
            spread,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"| teacher | - | {teacher:.2f} | - | - | - | - |")
    return "\n".join(lines)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(REGIMES), default="cifar10")
    parser.add_argument(
        "--data", type=Path, help="folder with x_train.npy ... (default /tmp/<dataset>)"
    )
    parser.add_argument(
        "--teacher", type=Path, help="default benchmarks/inputs/<dataset>_resnet18_w16.pt"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--configs", nargs="+", default=["all"])
    parser.add_argument(
        "--lrs",
        nargs="+",
        default=["0.05"],
        help="base learning rates, or 'tuned': the "
        "student alone's best rate among the runs already in --out",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, help="default: the dataset's regime")
    parser.add_argument("--every-n-epochs", type=int, help="default: the dataset's regime")
    parser.add_argument("--train-images", type=int, help="default: the dataset's regime")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="accelerator")
    parser.add_argument("--report", action="store_true", help="print the table of --out")
    args = parser.parse_args()
    if args.report:
        table = report(args.out)
        (args.out / "table.md").write_text(table + "\n")
        print(table)
        return
    regime = REGIMES[args.dataset]
    args.data = args.data or Path("/tmp") / args.dataset
    args.teacher = args.teacher or regime.teacher(args.dataset)
    args.epochs = args.epochs or regime.epochs
    args.every_n_epochs = args.every_n_epochs or regime.every_n_epochs
    args.train_images = args.train_images or regime.train_images
    for path in (args.data / "x_train.npy", args.teacher):
        if not path.exists():
            parser.error(f"{path} does not exist (see benchmarks/README.md for the inputs)")
    run_grid(args)


if __name__ == "__main__":
    main()
