"""Values checked before anything trains: a learning rate that trains, a decay that decays,
loss weights that weigh, batch limits that leave batches, trainer options Lightning accepts,
and no unknown top-level key (a misspelt one, also added with ``+``, would be dropped
silently). Each mistake is a :class:`~lightning_layerkd.app.ConfigError` naming the key and the
fix (``layerkd-train`` exits with status 2)."""

from __future__ import annotations

import difflib
import importlib.resources
import logging
import math
from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

from . import ConfigError
from .cache_key import trainer_options


def _number(key: str, value: Any, example: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}: e.g. {key}={example}")
    return float(value)


def check_positive(key: str, value: Any, example: str, *, zero: bool = False) -> None:
    """``value`` finite and > 0 (>= 0 with ``zero``)."""
    number = _number(key, value, example)
    if not math.isfinite(number) or number < 0 or (number == 0 and not zero):
        bound = "finite and non-negative" if zero else "finite and greater than 0"
        raise ConfigError(f"{key} must be {bound}, got {value}: e.g. {key}={example}")


def check_values(cfg: DictConfig) -> None:
    """The top-level numbers, the method's loss weights and the batch limits."""
    check_positive("lr", cfg.lr, "0.05")
    if "lr" in cfg.optimizer:
        check_positive("optimizer.lr", cfg.optimizer.lr, "0.05")
    check_positive("weight_decay", cfg.weight_decay, "5e-4", zero=True)
    decay = _number("lr_decay", cfg.lr_decay, "0.1")
    if not 0 < decay <= 1:
        raise ConfigError(
            f"lr_decay must lie in (0, 1] (the factor MultiStepLR multiplies the learning rate "
            f"by at each milestone), got {cfg.lr_decay}: e.g. lr_decay=0.1, or 1 for none"
        )
    check_positive("map_weight", cfg.map_weight, "1.0", zero=True)
    for key, value in (cfg.get("method") or {}).items():
        if str(key).endswith("weight") and value is not None:
            check_positive(f"method.{key}", value, "1.0", zero=True)
    for key in ("limit_train_batches", "limit_val_batches"):
        value = cfg.get(key)
        if value is None:
            continue
        number = _number(key, value, "10")
        if not (number >= 1 and float(number).is_integer()) and not 0 < number <= 1:
            raise ConfigError(
                f"{key}={value} is neither a number of batches (at least 1) nor a fraction in "
                f"(0, 1]{' and leaves no batches' if number == 0 else ''}: e.g. {key}=10, "
                f"{key}=0.5, or {key}=null for all"
            )


def known_keys() -> set[str]:
    """The top-level keys of ``conf/config.yaml`` and its config groups."""
    text = importlib.resources.files("lightning_layerkd.conf").joinpath("config.yaml").read_text()
    primary = OmegaConf.create(text)
    assert isinstance(primary, DictConfig)
    keys = {str(k) for k in primary if k not in ("defaults", "hydra")}
    for entry in primary.get("defaults") or []:
        if OmegaConf.is_dict(entry) or isinstance(entry, dict):
            keys |= {str(k).split("/")[0].removeprefix("override ") for k in entry}
    return keys


def check_keys(cfg: DictConfig) -> None:
    """No top-level key the configs do not know (``+mthod=jacobian`` would train attention)."""
    known = known_keys()
    unknown = sorted(str(k) for k in cfg if str(k) not in known)
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(
            f"unknown key {key!r} (set with {key}=... or +{key}=...): {hint}the top-level keys "
            f"are {', '.join(sorted(known))}"
        )


def check_trainer(cfg: DictConfig) -> None:
    """The trainer options as Lightning will take them (``trainer.precision=bogus``,
    ``trainer=gpu`` without a GPU)."""
    logging.disable(logging.INFO)  # the Trainer's "GPU available" lines, here only a check
    try:
        pl.Trainer(**{**trainer_options(cfg, 1), "logger": False})
    except Exception as err:  # noqa: BLE001 - any refusal of Lightning's is a setting's mistake
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = (
            "; use trainer=cpu on a machine without a GPU"
            if "gpu" in str(cfg.trainer.get("accelerator", "")).lower()
            else ""
        )
        raise ConfigError(f"trainer settings: {detail}{hint}") from err
    finally:
        logging.disable(logging.NOTSET)
