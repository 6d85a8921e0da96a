"""The Hydra app (``layerkd-train``): train or load the teacher, distil the student, report.

Every object comes from the config with ``_target_``: the dataset, the models, the method
(``conf/method``), the optimizer, the schedule (scheduler and layer-wise callback), the
callbacks and the logger. Stage 1 trains the teacher or loads it from the cache
(:mod:`~lightning_layerkd.app.teacher`); stage 2 distils the student, or resumes its fit from
``ckpt_path``. Each run writes ``results.json`` next to Lightning's checkpoints and prints a
result table.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from torch import nn

from lightning_layerkd.guards import NonFiniteLossError
from lightning_layerkd.layerwise_lr.callback import LayerwiseLRCallback
from lightning_layerkd.methods import InformationFlow
from lightning_layerkd.module import DistillationModule

from . import ConfigError, signals
from .auxiliary import train_or_restore_auxiliary
from .checks import check_config, check_layers, layer_spec
from .identity import RunIdentity, run_identity
from .launcher import SweepEnded
from .logs import get_logger, route_lightning_to_root
from .run_logs import FlushLogsOnCheckpoint, build_logger
from .runs import StudentHistory, resume_from, run_dir_lock, sweep_identity
from .sweeps import share_cores
from .teacher import EpochHistory, TeacherTrainingError, atomic_write, build_trainer, train_teacher

log = get_logger(__name__)


# ---------------------------------------------------------------------- building blocks
def _model(node: Any, datamodule: Any) -> nn.Module:
    kwargs: dict[str, Any] = {"num_classes": datamodule.num_classes}
    if "lightning_layerkd.models" in str(node.get("_target_", "")):
        kwargs["in_channels"] = datamodule.in_channels
    return instantiate(node, **kwargs)


def _auxiliary_model(cfg: DictConfig, datamodule: Any) -> nn.Module:
    """The student's architecture at twice the width (information flow's auxiliary teacher)."""
    node: Any = OmegaConf.merge(cfg.model.student, {"width": int(cfg.model.student.width) * 2})
    return _model(node, datamodule)


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


def _callbacks(cfg: DictConfig, history: EpochHistory) -> tuple[list[Callback], Any]:
    """The schedule's layer-wise callback (first), the history and ``cfg.callbacks``."""
    layerwise = cfg.schedule.get("layerwise")
    built: list[Callback] = [instantiate(layerwise)] if layerwise is not None else []
    built.append(history)
    built += [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node]
    return built, (built[0] if layerwise is not None else None)


def build_datamodule(cfg: DictConfig) -> Any:
    """The dataset, prepared and set up; a data mistake (a missing path or file, unreadable
    arrays) is a :class:`ConfigError` that names it."""
    try:
        datamodule = instantiate(cfg.dataset)
        datamodule.prepare_data()
        datamodule.setup("fit")
    except (InstantiationException, FileNotFoundError, ValueError, MissingMandatoryValue) as err:
        cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ else err
        raise ConfigError(f"dataset ({cfg.dataset.get('_target_')}): {cause}") from cause
    classes = getattr(datamodule, "num_classes", None)
    if isinstance(classes, int) and classes < 2:
        raise ConfigError(
            f"dataset ({cfg.dataset.get('_target_')}): its labels hold {classes} class; a "
            "classifier (and a teacher to distil) needs at least 2: check the labels' file"
        )
    return datamodule


# ---------------------------------------------------------------------- the run
def run(cfg: DictConfig, output_dir: Path | None = None) -> dict[str, Any]:
    """Run both stages for one config and return (and write) the results; the run directory
    is locked for the whole run (one job per directory)."""
    root = Path(output_dir or HydraConfig.get().runtime.output_dir)
    with run_dir_lock(root):
        return _run(cfg, root)


def _run(cfg: DictConfig, root: Path) -> dict[str, Any]:
    start = time.time()
    signals.remember_job(root)
    OmegaConf.update(cfg, "output_dir", str(root), force_add=True)
    method = check_config(cfg)
    root.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    try:  # before the teacher trains: a logit loss the data's task cannot use
        method.check_task(getattr(datamodule, "task", "multiclass"))
    except ValueError as err:
        raise ConfigError(f"method and dataset: {err}") from err
    teacher, student = _model(cfg.model.teacher, datamodule), _model(cfg.model.student, datamodule)
    example = next(iter(datamodule.train_dataloader()))[0]
    auxiliary = _auxiliary_model(cfg, datamodule) if getattr(method, "auxiliary", False) else None
    layers: Any = layer_spec(cfg.layers, allow_empty=method.allows_no_layers)
    if method.uses_layers:  # bad layer paths fail here, before any training
        source = auxiliary if auxiliary is not None else teacher
        layers = check_layers(method, source, student, layers, example, cfg.num_crucial_layers)
    history = StudentHistory()
    callbacks, layerwise = _callbacks(cfg, history)
    identity = RunIdentity(run_identity(cfg, datamodule))  # in the checkpoints: a resume is
    callbacks.append(identity)  # refused unless it is the same run
    ckpt_path = resume_from(cfg, root, callbacks)
    identity.check(ckpt_path)

    teacher_meta: dict[str, Any] = {}
    if method.needs_teacher:  # the checkpoint's teacher where the cache is empty (not an
        saved = identity.saved_teacher if auxiliary is None else None  # auxiliary network)
        teacher_meta = train_teacher(cfg, datamodule, teacher, root, saved)
        kept = {k: v for k, v in teacher_meta.items() if k not in ("cached", "restored")}
        identity.teacher = kept  # in the student's checkpoints, with the teacher's weights

    def distiller(source: nn.Module | None, target: nn.Module, pairs: Any) -> DistillationModule:
        scheduler = cfg.schedule.get("scheduler")
        return DistillationModule(
            source,
            target,
            method=method,
            layers=pairs,
            num_classes=datamodule.num_classes,
            task=datamodule.task,
            num_crucial_layers=cfg.num_crucial_layers,
            example_input=example,
            optimizer=instantiate(cfg.optimizer),
            scheduler=instantiate(scheduler) if scheduler is not None else None,
        )

    auxiliary_meta: dict[str, Any] = {}
    if auxiliary is not None:  # information flow's: trained once per run, restored on resume
        fit_auxiliary = partial(distiller, teacher, auxiliary, [])
        resume = ckpt_path is not None
        auxiliary_meta = train_or_restore_auxiliary(
            cfg, root, auxiliary, fit_auxiliary, datamodule, resume
        )
        teacher = auxiliary
    module = distiller(teacher if method.needs_teacher else None, student, layers)
    pl.seed_everything(cfg.seed, workers=True)
    logger = build_logger(cfg, ckpt_path)  # a resumed run continues its CSV and wandb run
    callbacks.append(FlushLogsOnCheckpoint())
    trainer = build_trainer(cfg, cfg.epochs, root, callbacks, logger)
    # the student's batches carry sample indices for a method with a bank of the training set
    datamodule.sample_indices = method.needs_sample_indices
    make_loader = datamodule.train_dataloader  # the student's: its generators are resumed
    datamodule.train_dataloader = lambda: history.restore(make_loader())
    try:
        with signals.deferred():
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    finally:
        del datamodule.train_dataloader
        if isinstance(logger, WandbLogger):  # one wandb run per job, also when a job fails
            from .wandb_logging import finish

            finish()

    accs = [row.get("val/acc", float("nan")) for row in history.epochs]
    best = max(range(len(accs)), key=lambda i: accs[i]) if accs else None
    optimizer = trainer.optimizers[0]
    results = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "method": method.label,  # attention+logits when logit KD is added
        "method_options": method.options(),
        "divergence_name": method.divergence_name,
        "schedule": cfg.schedule.name,
        "sweep": sweep_identity(),
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
        "eta": dict(layerwise.eta) if isinstance(layerwise, LayerwiseLRCallback) else {},
        "layerwise": (
            {"rule": layerwise.rule, "factor": dict(layerwise.factor), "history": layerwise.history}
            if isinstance(layerwise, LayerwiseLRCallback)
            else {}
        ),
        "wall_time_s": time.time() - start,
    }
    if isinstance(method, InformationFlow) and module.layer_pairs:
        from lightning_layerkd.functional.layer_matching import report_layer_matching

        # Passalis et al. eqs. 3-4: which teacher layer should feed which student layer,
        # judged by each layer's nearest-centroid accuracy on validation batches
        batches = list(itertools.islice(datamodule.val_dataloader(), 8))
        results["layer_matching"] = report_layer_matching(
            teacher, student, module.layer_pairs, batches
        )
    if trainer.is_global_zero:
        with signals.deferred():  # a complete results.json, then the stop
            atomic_write(
                root / "results.json",
                lambda p: p.write_text(json.dumps(results, indent=2, default=str)),
            )
        log.info(f"wrote {root / 'results.json'}")
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
    """``layerkd-train``: one job per config; ``-m`` runs a sweep. A configuration mistake
    prints its message and exits with status 2; a run that cannot learn, with status 1.
    Returns the student's best validation accuracy (what ``hparams_search`` maximises)."""
    route_lightning_to_root()
    share_cores()
    try:
        results = run(cfg)
    except ConfigError as err:
        print(f"layerkd-train: error: {err}", file=sys.stderr)
        sys.exit(2)
    except (NonFiniteLossError, TeacherTrainingError) as err:
        print(f"layerkd-train: {err}", file=sys.stderr)
        sys.exit(1)
    if getattr(rank_zero_only, "rank", 0) == 0:
        print(format_result(results))
    return results["student"]["best_val_acc"]


def cli() -> None:
    """The ``layerkd-train`` command: :func:`main` with SIGTERM handled (status 143 and how to
    resume, also for a sweep) and Hydra's own configuration errors (an unknown group, option or
    key) given status 2 like ours."""
    signals.install()
    try:
        main()
    except SystemExit as stop:
        if signals.stopped(stop):
            signals.finish(signals.stop_message())
        if stop.code == 1 and not signals.job_started():  # Hydra's: before any job ran
            sys.exit(2)
        raise
    except signals.Preempted:
        signals.finish(signals.stop_message())
    except SweepEnded as end:  # hydra/launcher=parallel: the jobs' statuses, as one
        signals.finish(end.message, end.status)


if __name__ == "__main__":
    cli()
