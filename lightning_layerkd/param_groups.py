"""The optimizer's param groups named by crucial layer (docs/design.md section 2): building them
from the student, reading them back by name from the optimizers, and rescaling one group with
the anchors its schedulers keep (also SWALR's ``swa_lr``, composed once with the layer-wise
multiplier). :class:`~lightning_layerkd.DistillationModule` builds them;
:class:`~lightning_layerkd.LayerwiseLRCallback` reads and rescales them. Plain PyTorch."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn
from torch.optim import Optimizer

#: Name of the optimizer param group that holds every non-crucial student parameter.
BASE_GROUP = "base"
#: The param-group key that remembers the ``swa_lr`` :func:`compose_swa_lrs` gave the group.
SWA_MARK = "layerwise_swa_lr"


def crucial_param_groups(model: nn.Module, names: Sequence[str]) -> list[dict[str, Any]]:
    """One param group per crucial module of ``model`` (named by its path) plus
    :data:`BASE_GROUP`; every trainable parameter is in exactly one group (docs/design.md
    section 2)."""
    groups: list[dict[str, Any]] = []
    seen: set[int] = set()
    for name in names:
        params = [p for p in model.get_submodule(name).parameters() if p.requires_grad]
        seen.update(id(p) for p in params)
        groups.append({"name": name, "params": params})
    base = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    if base or not groups:
        groups.append({"name": BASE_GROUP, "params": base})
    return groups


def add_to_param_groups(
    groups: list[dict[str, Any]], extra: Iterable[tuple[str, nn.Module]]
) -> list[dict[str, Any]]:
    """``groups`` with each ``(name, module)``'s trainable parameters added to the group of that
    name (a new group if there is none): a method's learnt parts join their crucial layer's
    group, shared ones :data:`BASE_GROUP` (docs/design.md section 11)."""
    by_name = {group["name"]: group for group in groups}
    for name, module in extra:
        if name not in by_name:
            by_name[name] = {"name": name, "params": []}
            groups.append(by_name[name])
        by_name[name]["params"].extend(p for p in module.parameters() if p.requires_grad)
    return groups


def named_param_groups(optimizers: Iterable[Optimizer]) -> dict[str, list[tuple[Optimizer, int]]]:
    """The param groups that carry a ``"name"``, by name: ``[(optimizer, group index), ...]``."""
    named: dict[str, list[tuple[Optimizer, int]]] = {}
    for optimizer in optimizers:
        for index, group in enumerate(optimizer.param_groups):
            if "name" in group:
                named.setdefault(group["name"], []).append((optimizer, index))
    return named


def first_group_lrs(named: Mapping[str, Sequence[tuple[Optimizer, int]]]) -> dict[str, float]:
    """The ``lr`` of the first param group of each name in :func:`named_param_groups`' result."""
    return {
        name: optimizer.param_groups[index]["lr"]
        for name, places in named.items()
        for optimizer, index in places[:1]
    }


def scale_param_group(
    optimizer: Optimizer, index: int, schedulers: Iterable[Any], factor: float
) -> None:
    """Multiply param group ``index`` of ``optimizer`` by ``factor``: its ``lr``, its anchors
    (``initial_lr``; OneCycleLR's ``max_lr`` / ``min_lr``; SWALR's ``swa_lr`` once
    :func:`compose_swa_lrs` has composed it) and the ``base_lrs`` / ``_last_lr`` entries of those
    ``schedulers`` (or the ones they wrap) that drive ``optimizer``."""
    group = optimizer.param_groups[index]
    group["lr"] *= factor
    for key in ("initial_lr", "max_lr", "min_lr"):  # OneCycleLR keeps its anchors here
        if isinstance(group.get(key), (int, float)):
            group[key] *= factor
    if _composed(group):  # SWALR's target; one SWALR has just written waits for compose_swa_lrs
        group["swa_lr"] = group[SWA_MARK] = group["swa_lr"] * factor
    for top in schedulers:
        for scheduler in _with_children(top):
            if getattr(scheduler, "optimizer", None) is optimizer:
                for attribute in ("base_lrs", "_last_lr"):
                    values = getattr(scheduler, attribute, None)
                    if isinstance(values, list) and index < len(values):
                        values[index] *= factor


def _with_children(scheduler: Any) -> list[Any]:
    """A scheduler and, for SequentialLR/ChainedScheduler, the schedulers it wraps."""
    found = [scheduler]
    for child in getattr(scheduler, "_schedulers", None) or []:
        found.extend(_with_children(child))
    return found


def compose_swa_lrs(
    named: Mapping[str, Sequence[tuple[Optimizer, int]]], multipliers: Mapping[str, float]
) -> dict[str, float]:
    """Multiply the ``swa_lr`` that SWALR (``torch.optim.swa_utils``, as built by Lightning's
    ``StochasticWeightAveraging``) put in each param group of :func:`named_param_groups`' result
    by its layer's multiplier (1 for a layer not in ``multipliers``); returns the new ``swa_lr``
    of the layers in ``multipliers`` that were composed now.

    SWALR anneals ``lr`` towards ``swa_lr`` linearly in both, so a group whose ``lr`` and
    ``swa_lr`` carry the same multiplier keeps it exactly. SWALR writes ``swa_lr`` when it is
    built (also when a resumed fit rebuilds it), while a restored optimizer state brings back the
    composed value: each group remembers (:data:`SWA_MARK`) the value composed last, so every
    ``swa_lr`` SWALR writes is composed once and a restored one is left alone."""
    composed: dict[str, float] = {}
    for name, places in named.items():
        for optimizer, index in places:
            group = optimizer.param_groups[index]
            if not isinstance(group.get("swa_lr"), (int, float)) or _composed(group):
                continue
            group["swa_lr"] = group[SWA_MARK] = group["swa_lr"] * multipliers.get(name, 1.0)
            if name in multipliers:
                composed[name] = float(group["swa_lr"])
    return composed


def _composed(group: Mapping[str, Any]) -> bool:
    """Whether the group's ``swa_lr`` is the one :func:`compose_swa_lrs` composed last."""
    swa_lr = group.get("swa_lr")
    return isinstance(swa_lr, (int, float)) and swa_lr == group.get(SWA_MARK)
