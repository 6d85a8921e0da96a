"""Values checked before anything trains: a learning rate that trains, a decay that decays,
loss weights that weigh, batch limits that leave batches, trainer options Lightning accepts,
no unknown top-level key (a misspelt one, also added with ``+``, would be dropped
silently), method options the method takes, and crucial layers both networks have
(:func:`check_config` runs them all). Each mistake is a
:class:`~lightning_layerkd.app.ConfigError` naming the key and the fix (``layerkd-train`` exits
with status 2)."""

from __future__ import annotations

import difflib
import importlib.resources
import inspect
import logging
import math
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_layerkd.layers.specs import check_layer_pairs, normalise_layers
from lightning_layerkd.methods import DistillationMethod

from . import ConfigError
from .cache_key import trainer_options


def _number(key: str, value: Any, example: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}: e.g. {key}={example}")
    return float(value)


#: method and logit-loss options that weight a loss term (DKD's alpha and beta, DIST's gamma)
LOSS_WEIGHTS = ("alpha", "beta", "gamma")


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
    method = cfg.get("method") or {}
    logit_loss = method.get("logit_loss") if isinstance(method, DictConfig) else None
    nodes = [("method", method)]
    if isinstance(logit_loss, DictConfig):
        nodes.append(("method.logit_loss", logit_loss))
    for prefix, node in nodes:
        for key, value in node.items():
            if value is None:
                continue
            if str(key).endswith("weight") or key in LOSS_WEIGHTS:
                check_positive(f"{prefix}.{key}", value, "1.0", zero=True)
            elif key == "temperature":
                check_positive(f"{prefix}.{key}", value, "4.0")
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


def method_from_config(cfg: DictConfig) -> DistillationMethod:
    """The method of ``cfg.method``; unknown options list the valid ones."""
    target = get_class(cfg.method._target_)
    valid: list[str] = []
    for cls in target.__mro__[:-1]:  # up the hierarchy while __init__ forwards **kwargs
        params = inspect.signature(cls.__init__).parameters.values()  # type: ignore[misc]
        valid += [p.name for p in params if p.kind is p.KEYWORD_ONLY]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    unknown = sorted(set(cfg.method) - {"_target_"} - set(valid))
    if unknown:
        hint = ""
        if "critical_period" in unknown:
            hint = (
                "; schedule=critical_period weights information-flow layers (Passalis et al. "
                "eq. 10) and applies to method=information_flow only"
            )
        elif "logit_loss" in unknown:
            hint = (
                f"; {target.__name__}'s logit loss is its own: set its options (e.g. "
                "method.standardize=true), or add a logit loss to a feature method "
                "(method=attention method/logit_loss=dkd)"
            )
        raise ConfigError(
            f"method options {unknown} are not options of {target.__name__}; valid: "
            f"{sorted(set(valid))}{hint}"
        )
    return instantiate(cfg.method, _convert_="all")


def check_config(cfg: DictConfig) -> DistillationMethod:
    """Fail before training on mistakes a sweep would otherwise find hours later; returns the
    method."""
    check_keys(cfg)
    for key in ("epochs", "teacher_epochs", "every_n_epochs", "num_crucial_layers", "seed"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}: e.g. {key}=8")
        if value < (0 if key == "seed" else 1):
            raise ConfigError(f"{key} must be at least {0 if key == 'seed' else 1}, got {value}")
    check_values(cfg)
    check_trainer(cfg)
    layer_spec(cfg.layers)
    try:
        method = method_from_config(cfg)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised with the config context
        raise ConfigError(f"invalid method settings: {err}") from err
    layerwise = cfg.schedule.get("layerwise")
    if layerwise is not None and int(cfg.every_n_epochs) > int(cfg.epochs):
        raise ConfigError(
            f"every_n_epochs={cfg.every_n_epochs} is larger than epochs={cfg.epochs}: the "
            "layer-wise learning rates would never be updated; lower every_n_epochs"
        )
    if layerwise is not None and not method.uses_layers:
        raise ConfigError(
            f"schedule=layerwise needs crucial layers, but method={method.name} has none; "
            "use schedule=none or schedule=multistep with it"
        )
    if cfg.schedule.get("scheduler") is not None:
        bad = [m for m in cfg.milestones if not 0 < int(m) <= int(cfg.epochs)]
        if bad:
            raise ConfigError(
                f"milestones {bad} lie outside epochs 1..{cfg.epochs}; set milestones=[...] "
                "within them, or leave milestones unset (half and three quarters of epochs)"
            )
    if getattr(method, "auxiliary", False) and "width" not in cfg.model.student:
        raise ConfigError(
            "method.auxiliary=true builds the student's architecture at twice the width, but "
            f"model.student ({cfg.model.student.get('_target_')}) has no 'width'; set "
            "method.auxiliary=false or use a lightning_layerkd.models.resnet student"
        )
    try:  # the optimizer, the scheduler and the callbacks, as they will be built
        dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        instantiate(cfg.optimizer)([{"params": [torch.zeros(1, requires_grad=True)]}])
        if cfg.schedule.get("scheduler") is not None:
            instantiate(cfg.schedule.scheduler)(dummy)
        if layerwise is not None:
            instantiate(layerwise)
    except Exception as err:  # noqa: BLE001 - re-raised with the config context
        raise ConfigError(f"invalid optimizer or schedule settings: {err}") from err
    return method


def layer_spec(layers: Any) -> Any:
    """``"auto"`` or ``(student, teacher)`` pairs from the config's ``layers``: a list of paths
    present in both networks or of ``[student, teacher]`` pairs."""
    if layers == "auto":
        return "auto"
    spec = OmegaConf.to_container(layers) if OmegaConf.is_config(layers) else layers
    try:
        return normalise_layers(spec)  # type: ignore[arg-type]
    except ValueError as err:
        raise ConfigError(
            f"layers={layers!r} is not a layer list ({err}); use layers=auto, "
            "'layers=[layer1,layer2]' (the same paths in both networks) or "
            "'layers=[[layer1,layer1],[layer2,stage2]]' ([student, teacher] pairs)"
        ) from err


def check_layers(
    method: DistillationMethod,
    teacher: nn.Module,
    student: nn.Module,
    layers: Any,
    example: torch.Tensor,
    num_layers: int,
) -> list[tuple[str, str]]:
    """Resolve ``layers`` ("auto", by the method's rule, or pairs) on an example batch;
    unknown paths list the candidates."""
    if layers == "auto":
        return method.auto_layers(teacher, student, example, num_layers)
    try:
        check_layer_pairs(student, teacher, layers, example)
    except ValueError as err:
        raise ConfigError(f"layers: {err}") from err
    return list(layers)
