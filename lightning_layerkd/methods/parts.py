"""A method's learnt parts (FitNet's regressors, CRD's heads and banks, ReviewKD's fusion):
the container the module owns and the layers' output shapes they are sized from
(docs/design.md section 11); their param groups are built by
:func:`~lightning_layerkd.param_groups.add_to_param_groups`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_layerkd._common import eval_mode
from lightning_layerkd.layers.hooks import FeatureHooks

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
