"""A method's learnt parts (FitNet's regressors, CRD's heads and banks, ReviewKD's fusion):
the container the module owns, the layers' output shapes they are sized from, and their place
in the optimizer's param groups (docs/design.md section 10)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_layerkd.layers.discovery import eval_mode
from lightning_layerkd.layers.hooks import FeatureHooks
from lightning_layerkd.layers.specs import BASE_GROUP

#: per crucial layer, the per-sample shape of its hooked output
Shapes = list[tuple[int, ...]]


class LearntParts(nn.Module):
    """A method's learnt parts, built by :meth:`DistillationMethod.build_parts` and owned by the
    module: trained with the student, moved with it and saved in its checkpoints
    (``method_parts.*``).

    ``per_layer[j]`` belongs to crucial layer ``j`` (the layers' order): its parameters join
    that layer's param group, so a layer-wise rate applies to them; ``shared`` parameters join
    the ``base`` group.
    """

    def __init__(self, per_layer: Sequence[nn.Module], shared: nn.Module | None = None) -> None:
        super().__init__()
        self.per_layer = nn.ModuleList(per_layer)
        self.shared = shared if shared is not None else nn.Module()


def hooked_shapes(model: nn.Module, hooks: FeatureHooks, x: Tensor) -> Shapes:
    """The per-sample output shapes of the hooked layers on two samples of ``x`` (the model in
    eval mode, every module's mode restored; no graph)."""
    with torch.no_grad(), eval_mode(model), hooks.record() as recording:
        model(x[:2])
    return [tuple(f.shape[1:]) for f in hooks.outputs(recording)]


def with_parts(
    groups: list[dict[str, Any]], layer_names: Sequence[str], parts: LearntParts
) -> list[dict[str, Any]]:
    """``groups`` with each layer's learnt parameters in that layer's group and the shared
    ones in :data:`BASE_GROUP` (created if the student had none)."""
    by_name = {group["name"]: group for group in groups}
    owners = [*layer_names, BASE_GROUP]
    modules = [*parts.per_layer, parts.shared]
    for name, part in zip(owners, modules, strict=True):
        params = [p for p in part.parameters() if p.requires_grad]
        if name not in by_name:
            by_name[name] = {"name": name, "params": []}
            groups.append(by_name[name])
        by_name[name]["params"].extend(params)
    return groups
