"""The Hydra app (``layerkd-train``): train or load the teacher, distil the student, report.

Stage 1 trains the teacher (or loads it from a cache keyed by dataset, architecture, epochs and
seed); stage 2 distils the student with the chosen method and schedule. Each run writes
``results.json`` next to Lightning's checkpoints and prints a result table.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_layerkd.callbacks import LayerwiseLRCallback
from lightning_layerkd.layers import find_crucial_layers, resolve_module
from lightning_layerkd.module import ALL_METHODS, DistillationModule, check_options

__all__ = ["main", "run"]

METHOD_CHOICES = ALL_METHODS


class ConfigError(ValueError):
    """A configuration mistake found before training starts."""


class EpochHistory(Callback):
    """Records validation metrics after every epoch (not the sanity check) for results.json."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        row: dict[str, float] = {"epoch": trainer.current_epoch}
        row.update(
            {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        )
        self.epochs.append(row)


# ---------------------------------------------------------------------- building blocks
def _optimizer(cfg: DictConfig) -> partial:
    return partial(torch.optim.SGD, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


def _models(cfg: DictConfig, datamodule: Any) -> tuple[nn.Module, nn.Module]:
    extra: dict[str, Any] = {"num_classes": datamodule.num_classes}
    models = []
    for role in ("teacher", "student"):
        node = cfg.model[role]
        kwargs = dict(extra)
        if "lightning_layerkd.models" in str(node.get("_target_", "")):
            kwargs["in_channels"] = datamodule.in_channels
        models.append(instantiate(node, **kwargs))
    return models[0], models[1]


def _auxiliary_model(cfg: DictConfig, datamodule: Any) -> nn.Module:
    """The student's architecture at twice the width (information flow's auxiliary teacher)."""
    node: Any = OmegaConf.merge(cfg.model.student, {"width": int(cfg.model.student.width) * 2})
    kwargs: dict[str, Any] = {"num_classes": datamodule.num_classes}
    if "lightning_layerkd.models" in str(node.get("_target_", "")):
        kwargs["in_channels"] = datamodule.in_channels
    return instantiate(node, **kwargs)


def _trainer(cfg: DictConfig, epochs: int, root: Path, callbacks: list[Callback], logger: Any):
    options: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[assignment]
    return pl.Trainer(
        max_epochs=epochs,
        default_root_dir=str(root),
        callbacks=callbacks,
        logger=logger,
        limit_train_batches=cfg.limit_train_batches,
        limit_val_batches=cfg.limit_val_batches,
        **options,
    )


def _logger(cfg: DictConfig, root: Path, name: str) -> Any:
    kind = cfg.logger.name
    if kind == "none":
        return False
    if kind == "csv":
        return pl.loggers.CSVLogger(str(root), name=name)
    if kind == "wandb":
        from lightning_layerkd.wandb_utils import make_wandb_logger

        return make_wandb_logger(cfg, root, name)
    raise ConfigError(f"logger.name must be one of ['csv', 'wandb', 'none'], got {kind!r}")


def check_config(cfg: DictConfig) -> None:
    """Fail before training on mistakes a sweep would otherwise find hours later."""
    if cfg.method.name not in METHOD_CHOICES:
        raise ConfigError(
            f"method.name must be one of {list(METHOD_CHOICES)}, got {cfg.method.name!r}"
        )
    for key in ("epochs", "teacher_epochs"):
        if int(cfg[key]) < 1:
            raise ConfigError(f"{key} must be at least 1, got {cfg[key]}")
    layerwise = cfg.schedule.get("layerwise")
    if layerwise is not None and int(cfg.every_n_epochs) > int(cfg.epochs):
        raise ConfigError(
            f"every_n_epochs={cfg.every_n_epochs} is larger than epochs={cfg.epochs}: the "
            "layer-wise learning rates would never be updated; lower every_n_epochs"
        )
    if layerwise is not None and cfg.method.name == "none":
        raise ConfigError(
            "schedule=layerwise needs crucial layers, but method=none trains the student alone; "
            "use schedule=none or schedule=multistep with method=none"
        )
    if cfg.schedule.get("scheduler") is not None:
        bad = [m for m in cfg.milestones if not 0 < int(m) <= int(cfg.epochs)]
        if bad:
            raise ConfigError(f"milestones {bad} lie outside epochs 1..{cfg.epochs}")
    critical = cfg.schedule.get("critical_period")
    if critical is not None and cfg.method.name != "information_flow":
        raise ConfigError(
            f"schedule=critical_period weights information-flow layers (Passalis et al. eq. 10); "
            f"it does not apply to method={cfg.method.name}"
        )
    if cfg.method.get("auxiliary") and "width" not in cfg.model.student:
        raise ConfigError(
            "method.auxiliary=true builds the student's architecture at twice the width, but "
            f"model.student ({cfg.model.student.get('_target_')}) has no 'width'; set "
            "method.auxiliary=false or use a lightning_layerkd.models.resnet student"
        )
    try:  # the method's options, the scheduler and the callback, as they will be built
        _method_options_of(cfg)
        check_options(
            method=cfg.method.name,
            wrt=cfg.method.wrt,
            weight_alignment=cfg.method.get("weight_alignment", "sorted"),
            map_target=cfg.method.map_target,
            num_probes=cfg.method.num_probes,
            teacher_probes=cfg.method.get("teacher_probes"),
            map_weight=cfg.map_weight,
        )
        if cfg.schedule.get("scheduler") is not None:
            dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=float(cfg.lr))
            instantiate(cfg.schedule.scheduler)(dummy)
        if layerwise is not None:
            instantiate(layerwise)
    except Exception as err:  # noqa: BLE001 - re-raised with the config context
        raise ConfigError(f"invalid method or schedule settings: {err}") from err


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive file lock, so concurrent sweep jobs never train the same teacher twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)  # readers see the old file or the whole new one, never half


DATASET_LABELS = {
    "DigitsDataModule": "Digits",
    "Cifar10DataModule": "CIFAR-10",
    "Cifar100DataModule": "CIFAR-100",
    "CocoDataModule": "COCO",
}


def dataset_label(cfg: DictConfig, datamodule: Any) -> str:
    """The dataset's column name in the report: "CIFAR-10", or the folder of an arrays set."""
    name = type(datamodule).__name__
    if name == "ArraysDataModule":
        return Path(str(cfg.dataset.data_dir)).name
    return DATASET_LABELS.get(name, name)


def _method_options_of(cfg: DictConfig) -> dict[str, Any]:
    options: dict[str, Any] = OmegaConf.to_container(  # type: ignore[assignment]
        cfg.method.get("options") or OmegaConf.create({}), resolve=True
    )
    critical = cfg.schedule.get("critical_period")
    if critical is not None:
        options["critical_period"] = OmegaConf.to_container(critical, resolve=True)
    from lightning_layerkd.module import _method_options

    return _method_options(cfg.method.name, options)  # unknown keys fail here


def check_layers(
    teacher: nn.Module, student: nn.Module, layers: Any, example: torch.Tensor, num_layers: int
) -> list[tuple[str, str]]:
    """Resolve ``layers`` ("auto" or pairs) on an example batch; unknown paths list candidates."""
    if layers == "auto":
        return find_crucial_layers(teacher, student, example, num_layers=num_layers)
    pairs = [(str(s), str(t)) for s, t in layers]
    for student_path, teacher_path in pairs:
        resolve_module(student, student_path, example, role="student")
        resolve_module(teacher, teacher_path, example, role="teacher")
    return pairs


def teacher_cache_key(cfg: DictConfig) -> str:
    """Key of the teacher cache: dataset, architecture, epochs, seed and optimisation settings."""
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    assert isinstance(dataset, dict)
    for volatile in ("num_workers", "data_dir"):
        dataset.pop(volatile, None)
    payload = {
        "dataset": dataset,
        "teacher": OmegaConf.to_container(cfg.model.teacher, resolve=True),
        "epochs": cfg.teacher_epochs,
        "seed": cfg.seed,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "milestones": list(cfg.milestones),
        "lr_decay": cfg.lr_decay,
        "limit_train_batches": cfg.limit_train_batches,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return f"{cfg.model.get('name', 'teacher')}-{digest[:16]}"


def load_teacher(teacher: nn.Module, path: Path) -> None:
    """Load a cached teacher's weights (``weights_only``); a mismatch is a clear error."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        teacher.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"the teacher checkpoint {path} does not fit the configured teacher "
            f"({type(teacher).__name__}); delete it or fix model.teacher.\n{err}"
        ) from err


def train_teacher(cfg: DictConfig, datamodule: Any, teacher: nn.Module, root: Path) -> dict:
    """Stage 1: train the teacher alone, or load it from the cache."""
    cache_dir = Path(cfg.teacher_cache_dir)
    key = teacher_cache_key(cfg)
    weights, meta_path = cache_dir / f"{key}.pt", cache_dir / f"{key}.json"
    # Under strategy=ddp Lightning re-runs this script for the other ranks while rank 0 trains
    # inside the lock; they join that fit, so only rank 0 locks and writes the cache.
    rank: int = getattr(rank_zero_only, "rank", 0)
    with _locked(cache_dir / f"{key}.lock") if rank == 0 else contextlib.nullcontext():
        if weights.exists() and meta_path.exists():
            load_teacher(teacher, weights)
            meta = json.loads(meta_path.read_text())
            meta["cached"] = True
            print(f"[layerkd] teacher loaded from cache {weights}")
            return meta
        pl.seed_everything(cfg.seed, workers=True)
        module = DistillationModule(
            None,
            teacher,
            method="none",
            num_classes=datamodule.num_classes,
            task=datamodule.task,
            optimizer=_optimizer(cfg),
            scheduler=partial(
                torch.optim.lr_scheduler.MultiStepLR,
                milestones=[m for m in cfg.milestones if m <= cfg.teacher_epochs],
                gamma=cfg.lr_decay,
            ),
        )
        history = EpochHistory()
        trainer = _trainer(cfg, cfg.teacher_epochs, root / "teacher", [history], False)
        trainer.fit(module, datamodule=datamodule)
        meta = {
            "key": key,
            "val_acc": history.epochs[-1].get("val/acc") if history.epochs else None,
            "history": history.epochs,
            "epochs": cfg.teacher_epochs,
        }
        if rank == 0:
            _atomic_write(weights, lambda p: torch.save(teacher.state_dict(), p))
            _atomic_write(meta_path, lambda p: p.write_text(json.dumps(meta, indent=2)))
        meta["cached"] = False
        return meta


def run(cfg: DictConfig, output_dir: Path | None = None) -> dict[str, Any]:
    """Run both stages for one config and return (and write) the results."""
    start = time.time()
    check_config(cfg)
    root = Path(output_dir or HydraConfig.get().runtime.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.dataset)
    datamodule.prepare_data()
    datamodule.setup("fit")
    teacher, student = _models(cfg, datamodule)
    example = next(iter(datamodule.train_dataloader()))[0]
    method = cfg.method.name
    method_options = _method_options_of(cfg)
    auxiliary = _auxiliary_model(cfg, datamodule) if cfg.method.get("auxiliary") else None
    layers: Any = cfg.layers if cfg.layers == "auto" else [list(p) for p in cfg.layers]
    if method != "none":  # bad layer paths fail here, before any training
        source = auxiliary if auxiliary is not None else teacher
        layers = check_layers(source, student, layers, example, cfg.num_crucial_layers)

    teacher_meta: dict[str, Any] = {}
    if method != "none":
        teacher_meta = train_teacher(cfg, datamodule, teacher, root)

    schedule = cfg.schedule

    def distiller(source: nn.Module | None, target: nn.Module, pairs: Any) -> DistillationModule:
        return DistillationModule(
            source,
            target,
            method=method,
            layers=pairs,
            num_classes=datamodule.num_classes,
            task=datamodule.task,
            map_weight=cfg.map_weight,
            wrt=cfg.method.wrt,
            weight_alignment=cfg.method.get("weight_alignment", "sorted"),
            map_target=cfg.method.map_target,
            num_probes=cfg.method.num_probes,
            teacher_probes=cfg.method.get("teacher_probes"),
            num_crucial_layers=cfg.num_crucial_layers,
            method_options=method_options,
            example_input=example,
            optimizer=_optimizer(cfg),
            scheduler=instantiate(schedule.scheduler) if schedule.scheduler is not None else None,
        )

    auxiliary_meta: dict[str, Any] = {}
    if auxiliary is not None:
        # Passalis et al. section 3.2: the student's architecture at twice the width learns
        # from the teacher first (outputs only), then teaches the student layer by layer.
        pl.seed_everything(cfg.seed, workers=True)
        history = EpochHistory()
        trainer = _trainer(cfg, cfg.epochs, root / "auxiliary", [history], False)
        trainer.fit(distiller(teacher, auxiliary, []), datamodule=datamodule)
        auxiliary_meta = {
            "width": int(cfg.model.student.width) * 2,
            "val_acc": history.epochs[-1].get("val/acc") if history.epochs else None,
            "history": history.epochs,
        }
        auxiliary.requires_grad_(False)
        teacher = auxiliary
    module = distiller(teacher if method != "none" else None, student, layers)
    pl.seed_everything(cfg.seed, workers=True)
    history = EpochHistory()
    callbacks: list[Callback] = [
        history,
        ModelCheckpoint(dirpath=root / "checkpoints", save_last=True),
    ]
    layerwise: LayerwiseLRCallback | None = None
    if schedule.get("layerwise") is not None:
        layerwise = instantiate(schedule.layerwise)
        callbacks.insert(0, layerwise)
    if cfg.logger.name == "wandb" and method != "none":
        from lightning_layerkd.wandb_utils import LayerPanels, MapImageLogger

        if method in ("attention", "jacobian", "hessian"):  # methods with layer maps
            callbacks.append(MapImageLogger(every_n_epochs=cfg.logger.map_images_every_n_epochs))
        callbacks.append(LayerPanels())
    logger = _logger(cfg, root, "student")
    trainer = _trainer(cfg, cfg.epochs, root, callbacks, logger)
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        if cfg.logger.name == "wandb":  # one wandb run per job, also when a job fails
            from lightning_layerkd.wandb_utils import finish

            finish()

    accs = [row.get("val/acc", float("nan")) for row in history.epochs]
    best = max(range(len(accs)), key=lambda i: accs[i]) if accs else None
    optimizer = trainer.optimizers[0]
    results = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "method": method,
        "schedule": schedule.name,
        "dataset": dataset_label(cfg, datamodule),
        "layer_pairs": module.layer_pairs,
        "teacher": teacher_meta,
        "auxiliary": auxiliary_meta,
        "student": {
            "val_acc": accs[-1] if accs else None,
            "best_val_acc": accs[best] if best is not None else None,
            "best_epoch": history.epochs[best]["epoch"] if best is not None else None,
            "last_epoch": trainer.current_epoch - 1,
            "history": history.epochs,
        },
        "final_lrs": {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)},
        "eta": dict(layerwise.eta) if layerwise is not None else {},
        "layerwise": (
            {"rule": layerwise.rule, "factor": dict(layerwise.factor), "history": layerwise.history}
            if layerwise is not None
            else {}
        ),
        "wall_time_s": time.time() - start,
    }
    if method == "information_flow" and module.layer_pairs:
        from lightning_layerkd.information_flow import report_layer_matching

        # Passalis et al. eqs. 3-4: which teacher layer should feed which student layer,
        # judged by each layer's nearest-centroid accuracy on validation batches
        batches = list(itertools.islice(datamodule.val_dataloader(), 8))
        results["layer_matching"] = report_layer_matching(
            teacher, student, module.layer_pairs, batches
        )
    if trainer.is_global_zero:
        _atomic_write(
            root / "results.json",
            lambda p: p.write_text(json.dumps(results, indent=2, default=str)),
        )
    return results


def format_result(results: dict[str, Any]) -> str:
    """A small markdown table of one run."""
    student, teacher = results["student"], results.get("teacher") or {}
    rows = [
        ("method", results["method"]),
        ("schedule", results["schedule"]),
        ("teacher val acc", _pct(teacher.get("val_acc"))),
        ("student val acc (last)", _pct(student["val_acc"])),
        (
            "student val acc (best)",
            f"{_pct(student['best_val_acc'])} @ epoch {student['best_epoch']}",
        ),
        ("crucial layers", ", ".join(f"{s}<-{t}" for s, t in results["layer_pairs"] or [])),
        ("final lrs", ", ".join(f"{k}={v:.3g}" for k, v in results["final_lrs"].items())),
        ("wall time", f"{results['wall_time_s']:.1f} s"),
    ]
    lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


@hydra.main(version_base="1.3", config_path="pkg://lightning_layerkd.conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """``layerkd-train``: one job per config; ``-m`` runs a sweep."""
    results = run(cfg)
    if getattr(rank_zero_only, "rank", 0) == 0:
        print(format_result(results))
    return results["student"]["val_acc"]


if __name__ == "__main__":
    main()
