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
import types
import typing
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, get_method, instantiate
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


def _leaves(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every leaf of a plain config tree."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from _leaves(value, f"{prefix}[{index}]")
    else:
        yield prefix, tree


def check_finite(cfg: DictConfig) -> None:
    """Every float of the config (any group, any depth) finite: ``nan`` or ``inf`` is a
    mistake wherever it is (``method.temperature=nan`` would train, then diverge)."""
    tree = OmegaConf.to_container(cfg, resolve=False)  # an interpolation: its source is checked
    for key, value in _leaves(tree):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(
                f"{key} must be a finite number, got {value}: set {key}=<a finite number> (its "
                "default is in conf/)"
            )


def _fits(value: Any, hint: Any) -> bool | None:
    """Whether ``value`` has the type ``hint`` names; ``None`` when the hint says too little."""
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (int, bool, str):
        return isinstance(value, hint) and (hint is bool or not isinstance(value, bool))
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_fits(value, arg) for arg in typing.get_args(hint)]
        return True if any(verdicts) else (False if all(v is False for v in verdicts) else None)
    return None


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    names = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}
    return names.get(hint, "null" if hint is type(None) else str(hint))


def check_option_types(target: Any, options: dict[str, Any], group: str) -> None:
    """``options`` of ``target`` (a class or function a config group builds, e.g. ``method``)
    of the types its signature names (``method.temperature=abc`` is a mistake, not a
    traceback)."""
    hints: dict[str, Any] = {}
    functions = (
        [cls.__init__ for cls in reversed(target.__mro__[:-1])]  # type: ignore[misc]
        if inspect.isclass(target)
        else [target]
    )
    for function in functions:
        try:
            hints.update(typing.get_type_hints(function))
        except Exception:  # noqa: BLE001 - a signature we cannot read is not checked
            continue
    for key, value in options.items():
        hint = hints.get(key)
        if hint is not None and _fits(value, hint) is False:
            raise ConfigError(
                f"{group}.{key} must be {_type_name(hint)}, got {value!r} (an option of "
                f"{target.__name__})"
            )


def check_built_options(cfg: DictConfig) -> None:
    """The options of every object the config builds with ``_target_`` (dataset, models,
    optimizer, schedule, callbacks, logger) against its signature's types, the key named
    (``model.student.width=abc``, ``dataset.batch_size=1.5``)."""
    tree = OmegaConf.to_container(cfg, resolve=False)
    nodes: list[tuple[str, dict[str, Any]]] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            if "_target_" in node and prefix != "method":  # the method: method_from_config
                nodes.append((prefix, node))
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))

    walk(tree, "")
    for prefix, node in nodes:
        try:
            target = get_method(str(node["_target_"]))
        except Exception:  # noqa: BLE001 - a target that does not import: Hydra says so
            continue
        plain = {
            str(k): v
            for k, v in node.items()
            if not str(k).startswith("_") and not (isinstance(v, str) and "${" in v)
        }
        check_option_types(target, plain, prefix)


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
    if not unknown:
        options = OmegaConf.to_container(cfg.method, resolve=True)
        assert isinstance(options, dict)
        given = {str(k): v for k, v in options.items() if k != "_target_"}
        check_option_types(target, given, "method")
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


def check_some_loss(method: DistillationMethod) -> None:
    """Refuse a method whose every loss term is zero (nothing would train): no task loss, no
    logit KD, and a zero ``map_weight`` or zero weights for each of its own terms (e.g.
    Jacobian matching's ``output_weight`` and ``activation_weight``)."""
    options = method.options()
    weights = {
        k: float(v)
        for k, v in options.items()
        if k.endswith("weight") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    own = {k: v for k, v in weights.items() if k not in ("map_weight", "logit_weight")}
    scaled = weights.get("map_weight", 1.0) > 0  # map_weight scales the method's own terms
    # its own terms: their weights where it names them, else its layer term if it has layers
    has_terms = any(v > 0 for v in own.values()) if own else bool(method.uses_layers)
    distils = scaled and has_terms
    term = getattr(method, "logit_term", None)  # a logit loss, its weight or its own (DKD)
    logit = float(getattr(term, "weight", 1.0)) if term is not None else 0.0
    logit = max(logit, weights.get("logit_weight", 0.0))
    if options.get("task_loss", True) or logit > 0 or distils:
        return
    named = ", ".join(f"method.{k}={v:g}" for k, v in weights.items())
    raise ConfigError(
        f"every loss term of method={method.name} is zero (method.task_loss=false, {named}): "
        "nothing would train; set method.task_loss=true or a weight above 0"
    )


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
    check_finite(cfg)
    check_built_options(cfg)
    check_trainer(cfg)
    try:
        method = method_from_config(cfg)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised with the config context
        cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ else err
        text = str(cause)
        leaves = [k for k, _ in _leaves(OmegaConf.to_container(cfg.method), "method")]
        named = [k for k in leaves if k.split(".")[-1] in text and not k.endswith("_target_")]
        # the option the message names first
        key = min(named, key=lambda k: text.index(k.split(".")[-1])) if named else "method"
        raise ConfigError(
            f"invalid method settings: {key}: {cause} ({cfg.method._target_})"
        ) from err
    check_some_loss(method)
    if not str(cfg.teacher_cache_dir).strip():
        raise ConfigError(
            "teacher_cache_dir is empty: set it to a folder (teacher_cache_dir=<folder>), or "
            "leave it out for $LAYERKD_CACHE/teachers"
        )
    layer_spec(cfg.layers, allow_empty=method.allows_no_layers)
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


def layer_spec(layers: Any, allow_empty: bool = False) -> Any:
    """``"auto"`` or ``(student, teacher)`` pairs from the config's ``layers``: a list of paths
    present in both networks or of ``[student, teacher]`` pairs; ``layers=[]`` where the method
    allows no layers (``allow_empty``: Jacobian matching's output term alone)."""
    if layers == "auto":
        return "auto"
    spec = OmegaConf.to_container(layers) if OmegaConf.is_config(layers) else layers
    try:
        return normalise_layers(spec, allow_empty=allow_empty)  # type: ignore[arg-type]
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
