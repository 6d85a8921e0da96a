"""Kokane et al. (2024): attention (eq. 2), Jacobian (eq. 4) and Hessian (eq. 6) maps of the
crucial layers, compared by the JSD (eqs. 8-10).

The loss these methods add is ``map_weight * sum_j mean_i JSD(p_ij^S, p_ij^T)`` (eqs. 2, 4, 6),
where ``p`` are the maps of crucial layer pair ``j`` made distributions
(:func:`~lightning_layerkd.functional.maps.to_distribution`) on a common support
(:func:`~lightning_layerkd.functional.maps.match_maps`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_layerkd._common import check_choice, model_device
from lightning_layerkd.functional.derivatives import MapKind, compute_maps, constant_map_layers
from lightning_layerkd.functional.divergence import map_js_divergences
from lightning_layerkd.functional.maps import (
    WEIGHT_ALIGNMENTS,
    WRTS,
    WeightAlignment,
    Wrt,
    default_target,
    match_maps,
)
from lightning_layerkd.layers.specs import conversion_conv
from lightning_layerkd.methods.base import (
    DistillationMethod,
    MethodOutput,
    Networks,
    register_method,
)
from lightning_layerkd.methods.logit_losses import LogitLoss

#: ``(student, teacher)`` maps of one crucial layer pair on a common support.
MapPair = tuple[Tensor, Tensor]


class MapMethod(DistillationMethod):
    """A method that compares per-layer maps of teacher and student by the JSD.

    Args:
        map_weight: ``lambda`` of eqs. 2, 4 and 6, the weight of the summed map losses.
        map_target: derivative maps differentiate the log-probability of the true class
            (``"label"``) or of the teacher's arg-max class (``"teacher"``, label-free).
        task_loss, logit_weight, temperature, logit_loss: see :class:`DistillationMethod`.
    """

    kind: ClassVar[MapKind] = "attention"
    divergence_name = "jsd"
    supports_layer_weights = True

    def __init__(
        self,
        *,
        map_weight: float = 1.0,
        map_target: str = "label",
        task_loss: bool = True,
        logit_weight: float = 0.0,
        temperature: float = 4.0,
        logit_loss: LogitLoss | None = None,
    ) -> None:
        super().__init__(
            task_loss=task_loss,
            logit_weight=logit_weight,
            temperature=temperature,
            logit_loss=logit_loss,
        )
        if map_weight < 0:
            raise ValueError(f"map_weight must be non-negative, got {map_weight}")
        check_choice("map_target", map_target, ("label", "teacher"))
        self.map_weight = float(map_weight)
        self.map_target = map_target
        self._zero_maps_checked = False

    def _map_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~lightning_layerkd.functional.derivatives.compute_maps`."""
        return {}

    def _teacher_probes(self) -> int:
        return 1

    def _student_probes(self) -> int:
        return 1

    def _weight_alignment(self) -> WeightAlignment:
        return "sorted"

    def layer_maps(
        self, nets: Networks, x: Tensor, y: Tensor, *, create_graph: bool
    ) -> tuple[Tensor, Tensor, dict[str, MapPair]]:
        """Student logits, teacher logits and, per crucial layer, the ``(student, teacher)``
        maps on a common support, not yet normalised: ``(B, K)`` per-sample maps or ``(1, K)``
        weight maps. Teacher maps are constants."""
        assert nets.teacher is not None and nets.teacher_hooks and nets.student_hooks
        options = dict(method=self.kind, task=nets.task, **self._map_options())
        label = self.map_target == "label"
        teacher_logits, teacher_maps = compute_maps(
            nets.teacher,
            x,
            nets.teacher_hooks,
            target=y if label else None,
            create_graph=False,
            num_probes=self._teacher_probes(),
            **options,
        )
        logits, student_maps = compute_maps(
            nets.student,
            x,
            nets.student_hooks,
            target=y if label else default_target(teacher_logits, nets.task),
            create_graph=create_graph,
            num_probes=self._student_probes(),
            **options,
        )
        if not self._zero_maps_checked:  # once: one host sync on the first batch
            self._zero_maps_checked = True
            for role, hooks, found in (
                ("student", nets.student_hooks, student_maps),
                ("teacher", nets.teacher_hooks, teacher_maps),
            ):
                for path, m in zip(hooks.paths, found, strict=True):
                    if not bool(m.detach().any()):
                        rank_zero_warn(self._zero_map_message(role, path))
        align = self._weight_alignment()
        pairs = zip(nets.layer_names, student_maps, teacher_maps, strict=True)
        maps = {name: match_maps(s, _constant(t), align) for name, s, t in pairs}
        return logits, teacher_logits.detach(), maps

    def _zero_map_message(self, role: str, path: str) -> str:
        return (
            f"the {self.name} map of {role} '{path}' is all zeros on the first batch, so the "
            "layer's divergence is 0 (no signal) until it changes. A common cause: the layer "
            "sits in a residual block whose last batch norm is initialised to zero (timm's "
            "zero_init_last, torchvision's zero_init_residual), so the block starts as the "
            "identity and its weights get no gradient; initialise that norm's weight to "
            "non-zero, use maps w.r.t. the activation, or choose another layer"
        )

    def compute(self, nets: Networks, x: Tensor, y: Tensor, *, create_graph: bool) -> MethodOutput:
        """Per layer, the per-sample JSD between the maps (eqs. 8-10). A weight map gives one
        JSD per batch, repeated for each sample so that every entry counts once per sample
        (docs/design.md section 5)."""
        logits, teacher_logits, maps = self.layer_maps(nets, x, y, create_graph=create_graph)
        # One fused JSD for all layers with the same number of rows (per-sample maps have B,
        # weight maps one); usually that is every layer.
        by_rows: dict[int, list[str]] = {}
        for name, (s, _) in maps.items():
            by_rows.setdefault(s.shape[0], []).append(name)
        divergences: dict[str, Tensor] = {}
        map_loss = None
        for rows, names in by_rows.items():
            jsd = map_js_divergences([maps[n][0] for n in names], [maps[n][1] for n in names])
            loss = jsd.mean(dim=0)  # mean_i JSD_ij, then sum_j lambda_j of them
            weights = [nets.layer_weights.get(n, 1.0) for n in names]
            loss = (loss * loss.new_tensor(weights)).sum() if set(weights) != {1.0} else loss.sum()
            map_loss = loss if map_loss is None else map_loss + loss
            if rows == 1:
                jsd = jsd.expand(x.shape[0], -1)
            divergences.update(zip(names, jsd.unbind(dim=1), strict=True))
        assert map_loss is not None
        divergences = {name: divergences[name] for name in maps}  # the layers' order
        return MethodOutput(
            logits, teacher_logits, divergences, {"map_loss": self.map_weight * map_loss}
        )


@register_method("attention")
class AttentionMaps(MapMethod):
    """Attention maps ``sum_c |F_c|^2`` of the crucial layers' outputs (eq. 2)."""

    kind = "attention"


class _DerivativeMaps(MapMethod):
    """Maps of derivatives of the score ``sum_i s_i`` (eqs. 4 and 6).

    Args:
        wrt: the derivative with respect to the layer's ``"activation"`` (default: pixels
            correspond between any two networks) or its conversion conv's ``"weight"`` (one
            reading of the paper, which cost the student accuracy on the strong-teacher
            benchmark, ``benchmarks/RESULTS.md``).
        weight_alignment: how weight maps are compared: ``"sorted"`` per-output-channel
            energies in decreasing order (invariant to permutations of channels, which do not
            change a network's function) or ``"index"`` channel by channel
            (:func:`~lightning_layerkd.functional.maps.match_maps`).
        map_weight, map_target, task_loss, logit_weight, temperature, logit_loss: see
            :class:`MapMethod`.
    """

    needs_autograd = True

    def __init__(
        self,
        *,
        wrt: Wrt = "activation",
        weight_alignment: WeightAlignment = "sorted",
        map_weight: float = 1.0,
        map_target: str = "label",
        task_loss: bool = True,
        logit_weight: float = 0.0,
        temperature: float = 4.0,
        logit_loss: LogitLoss | None = None,
    ) -> None:
        super().__init__(
            map_weight=map_weight,
            map_target=map_target,
            task_loss=task_loss,
            logit_weight=logit_weight,
            temperature=temperature,
            logit_loss=logit_loss,
        )
        check_choice("wrt", wrt, WRTS)
        check_choice("weight_alignment", weight_alignment, WEIGHT_ALIGNMENTS)
        self.wrt: Wrt = wrt
        self.weight_alignment: WeightAlignment = weight_alignment

    def _map_options(self) -> dict[str, Any]:
        return {"wrt": self.wrt}

    def _weight_alignment(self) -> WeightAlignment:
        return self.weight_alignment

    def hook_module(self, model: nn.Module, path: str, module: nn.Module) -> tuple[str, nn.Module]:
        """Weight maps hook the layer's conversion convolution (docs/design.md section 3)."""
        if self.wrt == "weight":
            return conversion_conv(module, path)
        return path, module

    @property
    def inspects_pairs(self) -> bool:
        return self.wrt == "activation"

    def uninformative_pairs(
        self, student: nn.Module, teacher: nn.Module, pairs: Sequence[tuple[str, str]], x: Tensor
    ) -> dict[tuple[str, str], str]:
        """Pairs whose map w.r.t. the activation is constant over its support for either
        network (a layer that feeds global pooling directly): JSD 0, no signal."""
        if self.wrt != "activation" or not pairs:
            return {}
        sample = x[:8]
        found: dict[tuple[str, str], str] = {}
        for side, (role, model) in enumerate((("student", student), ("teacher", teacher))):
            paths = [pair[side] for pair in pairs]
            for path in constant_map_layers(
                model, sample.to(model_device(model) or x.device), paths
            ):
                for pair in pairs:
                    if pair[side] == path and pair not in found:
                        found[pair] = (
                            f"the {self.name} map w.r.t. the activation of {role} '{path}' is "
                            "the same at every pixel (the layer feeds global pooling directly), "
                            "so its JSD is 0 and carries no signal; choose an earlier layer, "
                            "wrt='weight' or method='attention'"
                        )
        return found


@register_method("jacobian")
class JacobianMaps(_DerivativeMaps):
    """Jacobian maps (eq. 4): squared first derivatives of ``sum_i s_i``; see
    :func:`~lightning_layerkd.functional.derivatives.jacobian_map`."""

    kind = "jacobian"


@register_method("hessian")
class HessianMaps(_DerivativeMaps):
    """Hessian maps (eq. 6): the Gauss-Newton diagonal by Hutchinson probes; see
    :func:`~lightning_layerkd.functional.derivatives.hessian_map`.

    Args:
        num_probes: Hutchinson probes per step for the student's maps.
        teacher_probes: probes per step for the teacher's maps (no graph, so cheaper; a
            teacher in eval mode runs them all in one pass over the batch repeated that many
            times, which holds as many times its activations).
            ``None``: 4 for ``wrt="weight"`` (lifts the signal-to-noise ratio on the benchmark
            pair from 2.8 to 4.6) and 1 for ``"activation"`` (5.5 at one probe, no gain from
            more); ``benchmarks/RESULTS.md``.
        wrt, weight_alignment, map_weight, map_target, task_loss, logit_weight, temperature,
            logit_loss: see :class:`JacobianMaps`.
    """

    kind = "hessian"

    def __init__(
        self,
        *,
        num_probes: int = 1,
        teacher_probes: int | None = None,
        wrt: Wrt = "activation",
        weight_alignment: WeightAlignment = "sorted",
        map_weight: float = 1.0,
        map_target: str = "label",
        task_loss: bool = True,
        logit_weight: float = 0.0,
        temperature: float = 4.0,
        logit_loss: LogitLoss | None = None,
    ) -> None:
        super().__init__(
            wrt=wrt,
            weight_alignment=weight_alignment,
            map_weight=map_weight,
            map_target=map_target,
            task_loss=task_loss,
            logit_weight=logit_weight,
            temperature=temperature,
            logit_loss=logit_loss,
        )
        for name, probes in (("num_probes", num_probes), ("teacher_probes", teacher_probes)):
            if probes is not None and probes < 1:
                raise ValueError(f"{name} must be at least 1, got {probes}")
        self.num_probes = int(num_probes)
        self.teacher_probes = teacher_probes

    def _student_probes(self) -> int:
        return self.num_probes

    def _teacher_probes(self) -> int:
        if self.teacher_probes is not None:
            return self.teacher_probes
        return 4 if self.wrt == "weight" else 1


def _constant(t: Tensor) -> Tensor:
    return t.detach() if t.requires_grad else t  # a detach is an op of its own
