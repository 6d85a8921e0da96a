"""The app's test settings: tiny runs of the Hydra config."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from lightning.pytorch import Callback, Trainer

# epochs and batches small enough for seconds per run; every_n_epochs=1 so the callback acts;
# a sweep over methods uses these, and everything else TINY
TINY_ANY_METHOD = [
    "epochs=2",
    "teacher_epochs=1",
    "milestones=[1]",
    "every_n_epochs=1",
    "limit_train_batches=3",
    "limit_val_batches=2",
    "dataset.image_size=8",
    "dataset.batch_size=16",
    "trainer.enable_progress_bar=false",
    "logger=none",
]
# the cheapest method with maps: tests pin it, not the app's default
TINY = ["method=attention", *TINY_ANY_METHOD]


# 3 epochs with the milestone explicit, so that a killed run and its resumed part see the same
# schedule, and the layer-wise callback acting every epoch (every_n_epochs=1 in TINY)
THREE = [
    *(o for o in TINY if not o.startswith(("epochs=", "milestones="))),
    "epochs=3",
    "milestones=[2]",
    "schedule=layerwise",
]


def config(*overrides: str):
    with initialize_config_module(config_module="lightning_layerkd.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


class Killed(Exception):
    """Stands for a job killed by the scheduler, an out-of-memory kill or Ctrl-C."""


class KillAt(Callback):
    """Raise :class:`Killed` as epoch ``epoch`` starts: the checkpoints of the epochs before it
    are on disk, nothing of this one is (built from the config as ``callbacks.kill``)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: Trainer, pl_module: Any) -> None:
        if trainer.current_epoch == self.epoch:
            raise Killed(f"killed as epoch {self.epoch} starts")


class Barrier(Callback):
    """Each job of a sweep checks in at ``folder`` when its student's fit starts and waits (up
    to ``timeout`` seconds) until ``parties`` jobs have: it passes only if the jobs run at the
    same time, and fails a sweep that runs them one after another."""

    def __init__(self, folder: str, parties: int = 2, timeout: float = 300.0) -> None:
        self.folder, self.parties, self.timeout = Path(folder), parties, timeout

    def on_fit_start(self, trainer: Trainer, pl_module: Any) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / str(os.getpid())).touch()
        deadline = time.monotonic() + self.timeout
        while len(list(self.folder.iterdir())) < self.parties:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no other job reached the barrier in {self.timeout} s")
            time.sleep(0.2)


class Pause(Callback):
    """Sleep ``seconds`` after each training epoch: a run slow enough to be signalled while it
    trains (built from the config as ``callbacks.pause``)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
        time.sleep(self.seconds)


class SigkillAt(Callback):
    """The process kills itself with SIGKILL as epoch ``epoch`` starts, as the system's
    out-of-memory killer would (built from the config as ``callbacks.oom``)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: Trainer, pl_module: Any) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)
