"""``DistillationModule``: a LightningModule that distils a frozen teacher into a student
through per-crucial-layer map losses (Kokane et al. 2024, eqs. 2, 4 and 6)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MultilabelAccuracy,
    MultilabelAveragePrecision,
)

from lightning_layerkd.divergence import js_divergence
from lightning_layerkd.information_flow import critical_period_weights, pkt_loss
from lightning_layerkd.jacobian_matching import (
    activation_matching_loss,
    jacobian_matching_loss,
    jacobian_norm_penalty,
    layer_jacobians,
)
from lightning_layerkd.layers import (
    CrucialLayerError,
    FeatureHooks,
    conversion_conv,
    find_crucial_layers,
    format_candidates,
    resolve_module,
    trace_feature_maps,
)
from lightning_layerkd.maps import (
    METHODS,
    TASKS,
    WEIGHT_ALIGNMENTS,
    WRTS,
    _running_stats_kept,
    compute_maps,
    constant_map_layers,
    default_target,
    match_maps,
    to_distribution,
)

__all__ = ["ALL_METHODS", "BASE_GROUP", "DistillationModule", "LayerSpec", "check_options"]

#: The map methods of Kokane et al. plus the two seed methods and the student alone.
ALL_METHODS: tuple[str, ...] = (*METHODS, "jacobian_matching", "information_flow", "none")
#: ``method_options`` per seed method, with their defaults (design.md section 6).
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    # Srinivas & Fleuret (2018): eq. 10 on the output's input-Jacobian (weight), Prop. 1's
    # squared error on the logits, Prop. 2's Jacobian-norm penalty, with or without CE.
    "jacobian_matching": {
        "output_weight": 1.0,
        "activation_weight": 0.0,
        "norm_penalty_weight": 0.0,
        "task_loss": True,
    },
    # Passalis et al. (2020): PKT (eq. 7) per layer pair and at the output, eq. 9's weights,
    # eq. 10's critical period ({"alpha_init": 100, "gamma": 0.7}) or constant weights (None).
    "information_flow": {
        "kernel": "hybrid",
        "reduction": "mean",
        "critical_period": None,
        "task_loss": True,
    },
}

#: Name of the optimizer param group that holds every non-crucial student parameter.
BASE_GROUP = "base"

LayerSpec = str | Sequence[str] | Sequence[tuple[str, str]] | Mapping[str, str]
OptimizerFactory = Callable[[Iterable[dict[str, Any]]], Optimizer]
SchedulerFactory = Callable[[Optimizer], Any]

_DEFAULT_OPTIMIZER: OptimizerFactory = partial(
    torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4
)


class DistillationModule(LightningModule):
    """Distil ``teacher`` into ``student`` with a JSD loss on crucial-layer maps.

    The training loss is ``CE(S(x), y) + map_weight * sum_j mean_i JSD(p_j^S, p_j^T)`` (eqs. 2,
    4, 6 with the JSD of eqs. 8-10), where ``p_j`` are the attention, Jacobian or Hessian maps
    of crucial layer pair ``j`` turned into distributions. Features are read by forward hooks on
    the named modules; neither model is changed. The teacher is frozen (``requires_grad=False``,
    always in eval mode, outside the optimizer).

    The optimizer has one param group per student crucial module, named by its path, plus
    ``"base"``; ``training_step`` returns ``{"loss", "layer_divergence"}`` with the per-sample
    JSD of each layer, which is what :class:`~lightning_layerkd.LayerwiseLRCallback` reads.

    Args:
        teacher: a trained network (any ``nn.Module`` returning logits); ``None`` only with
            ``method="none"`` (the student alone).
        student: the network to train.
        method: ``"attention"`` (eq. 2), ``"jacobian"`` (eq. 4), ``"hessian"`` (eq. 6, the
            Gauss-Newton diagonal, see :func:`~lightning_layerkd.maps.hessian_map`),
            ``"jacobian_matching"`` (Srinivas & Fleuret 2018), ``"information_flow"``
            (Passalis et al. 2020), or ``"none"`` for cross-entropy alone.
        layers: ``"auto"`` (design.md section 2, run on ``example_input`` or on the first
            training batch before the optimizer is built), a list of paths present in both
            networks, a list of ``(student_path, teacher_path)`` pairs, or a dict
            ``{student_path: teacher_path}``.
        num_classes: number of classes (labels for ``task="multilabel"``).
        task: ``"multiclass"`` (cross-entropy, top-1 accuracy) or ``"multilabel"``
            (BCE with logits, mAP and accuracy).
        map_weight: ``lambda``, the weight of the summed map losses.
        wrt: derivative maps with respect to the layer's ``"activation"`` (default: pixels
            correspond between any two networks) or its conversion-conv ``"weight"`` (one
            reading of the paper, which cost the student accuracy on the strong-teacher
            benchmark, ``benchmarks/RESULTS.md``).
        weight_alignment: how weight maps of teacher and student are compared:
            ``"sorted"`` per-output-channel energies in decreasing order (invariant to
            permutations of channels, which do not change a network's function) or
            ``"index"`` channel by channel (see :func:`~lightning_layerkd.maps.match_maps`).
        map_target: ``"label"`` (differentiate the true class's log-probability) or
            ``"teacher"`` (the teacher's arg-max class; label-free).
        num_probes: Hutchinson probes per step for the student's Hessian maps.
        teacher_probes: Hutchinson probes per step for the teacher's Hessian maps (no graph,
            so cheaper than the student's). ``None``: 4 for ``wrt="weight"`` (lifts the
            signal-to-noise ratio on the benchmark pair from 2.8 to 4.6) and 1 for
            ``"activation"`` (5.5 at one probe, no gain from more); ``benchmarks/RESULTS.md``.
        num_crucial_layers: how many pairs ``layers="auto"`` keeps (the deepest).
        method_options: options of the seed methods, see ``METHOD_OPTIONS`` (unknown keys are
            an error).
        example_input: an input batch for ``layers="auto"``.
        optimizer: a callable that takes the param groups and returns an optimizer, e.g.
            ``functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)`` (the default also sets
            ``weight_decay=5e-4``); Hydra's ``_partial_: true`` builds one.
        scheduler: optional callable that takes the optimizer and returns an LR scheduler.
        scheduler_interval: ``"epoch"`` or ``"step"``.
    """

    def __init__(
        self,
        teacher: nn.Module | None,
        student: nn.Module,
        *,
        method: Literal[
            "attention", "jacobian", "hessian", "jacobian_matching", "information_flow", "none"
        ] = "attention",
        layers: LayerSpec = "auto",
        num_classes: int,
        task: Literal["multiclass", "multilabel"] = "multiclass",
        map_weight: float = 1.0,
        wrt: Literal["weight", "activation"] = "activation",
        weight_alignment: Literal["sorted", "index"] = "sorted",
        map_target: Literal["label", "teacher"] = "label",
        num_probes: int = 1,
        teacher_probes: int | None = None,
        num_crucial_layers: int = 4,
        method_options: Mapping[str, Any] | None = None,
        example_input: Tensor | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
    ) -> None:
        super().__init__()
        check_options(
            method=method,
            task=task,
            wrt=wrt,
            weight_alignment=weight_alignment,
            map_target=map_target,
            num_probes=num_probes,
            teacher_probes=teacher_probes,
            map_weight=map_weight,
        )
        _check_choice("scheduler_interval", scheduler_interval, ("epoch", "step"))
        if teacher is None and method != "none":
            raise ValueError(f"method={method!r} needs a teacher; pass one or use method='none'")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.save_hyperparameters(
            ignore=["teacher", "student", "example_input", "optimizer", "scheduler"]
        )
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        self.method = method
        self.task = task
        self.num_classes = num_classes
        self.map_weight = map_weight
        self.wrt = wrt
        self.weight_alignment = weight_alignment
        self.map_target = map_target
        self.num_probes = num_probes
        if teacher_probes is None:
            teacher_probes = 4 if wrt == "weight" else 1
        self.teacher_probes = teacher_probes
        self.num_crucial_layers = num_crucial_layers
        self.method_options = _method_options(method, method_options)
        self.example_input = example_input
        self.optimizer_factory = optimizer or _DEFAULT_OPTIMIZER
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval

        self.layer_pairs: list[tuple[str, str]] | None = None
        if method == "none":
            self.layer_pairs = []
        elif not (isinstance(layers, str) and layers == "auto"):
            # information flow may distil the output alone (the auxiliary stage)
            self.layer_pairs = _normalise_layers(layers, allow_empty=method == "information_flow")
        self._student_hooks: FeatureHooks | None = None
        self._teacher_hooks: FeatureHooks | None = None

        if task == "multiclass":
            metrics = MetricCollection(
                {"acc": MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro")}
            )
        else:
            metrics = MetricCollection(
                {
                    "map": MultilabelAveragePrecision(num_labels=num_classes, average="macro"),
                    "acc": MultilabelAccuracy(num_labels=num_classes, average="micro"),
                }
            )
        self.val_metrics = metrics.clone(prefix="val/")
        self.val_jsd = nn.ModuleDict()

    # ------------------------------------------------------------------ layers and hooks
    @property
    def divergence_name(self) -> str:
        """How the per-layer term is logged: ``jsd`` (eqs. 8-10), ``jacobian_matching``
        (Srinivas & Fleuret's eq. 10) or ``pkt`` (Passalis et al.'s eq. 7)."""
        return {"jacobian_matching": "jacobian_matching", "information_flow": "pkt"}.get(
            self.method, "jsd"
        )

    @property
    def layer_names(self) -> list[str]:
        """Student crucial-module paths, which are also the param-group names."""
        if self.layer_pairs is None:
            raise RuntimeError(
                "the crucial layers are not resolved yet: they are found when fit starts, on "
                "the first batch, or by calling resolve_layers(example_input)"
            )
        return [s for s, _ in self.layer_pairs]

    def resolve_layers(self, example_input: Tensor | None = None) -> list[tuple[str, str]]:
        """Resolve ``layers`` (running the auto rule on ``example_input`` if needed), validate
        the paths and install the forward hooks. Idempotent; returns the layer pairs."""
        x = example_input if example_input is not None else self.example_input
        checked = False
        if self.layer_pairs is None:
            if x is None:
                raise ValueError(
                    "layers='auto' needs an example input to discover the crucial layers: pass "
                    "example_input=..., give explicit layers, or fit with a train dataloader"
                )
            assert self.teacher is not None
            with torch.no_grad():
                candidates = find_crucial_layers(self.teacher, self.student, x, num_layers=None)
            constant = self._constant_map_pairs(candidates, x)
            kept = [pair for pair in candidates if pair not in constant]
            if not kept:
                raise ValueError(
                    f"layers='auto' found only pairs whose {self.method} map w.r.t. the "
                    f"activation is constant (no signal): {constant}; use wrt='weight' or "
                    "method='attention', or give explicit layers"
                )
            for pair, why in constant.items():
                rank_zero_info(f"layers='auto' leaves out the pair {pair}: {why}")
            self.layer_pairs = kept[-self.num_crucial_layers :]
            checked = True
        if self.method != "none" and self._student_hooks is None:
            self._validate_pairs(x)
            if not checked and x is not None:
                for pair, why in self._constant_map_pairs(self.layer_pairs, x).items():
                    rank_zero_warn(f"crucial layer pair {pair}: {why}")
            self._student_hooks = self._make_hooks(self.student, 0, x, "student")
            self._teacher_hooks = self._make_hooks(self.teacher, 1, x, "teacher")
            for name in self.layer_names:
                if name not in self.val_jsd:
                    self.val_jsd[_key(name)] = MeanMetric()
        return list(self.layer_pairs)

    @property
    def _maps_can_be_constant(self) -> bool:
        """Activation-gradient maps are constant by construction at some layers."""
        return self.method in ("jacobian", "hessian") and self.wrt == "activation"

    def _constant_map_pairs(
        self, pairs: Sequence[tuple[str, str]] | None, x: Tensor
    ) -> dict[tuple[str, str], str]:
        """The pairs whose map is constant over its support on ``x`` for either network, with
        the reason (a map that feeds global pooling directly: JSD 0, no signal)."""
        if not self._maps_can_be_constant or not pairs:
            return {}
        assert self.teacher is not None
        sample = x[:8]
        found: dict[tuple[str, str], str] = {}
        for side, (role, model) in enumerate(
            (("student", self.student), ("teacher", self.teacher))
        ):
            paths = [pair[side] for pair in pairs]
            for path in constant_map_layers(model, sample.to(_device_of(model, x)), paths):
                for pair in pairs:
                    if pair[side] == path and pair not in found:
                        found[pair] = (
                            f"the {self.method} map w.r.t. the activation of {role} "
                            f"'{path}' is the same at every pixel (the layer feeds global "
                            "pooling directly), so its JSD is 0 and carries no signal; choose "
                            "an earlier layer, wrt='weight' or method='attention'"
                        )
        return found

    def _validate_pairs(self, x: Tensor | None) -> None:
        names = self.layer_names
        if len(set(names)) != len(names) or BASE_GROUP in names:
            raise ValueError(
                f"student crucial layers must be distinct and not named {BASE_GROUP!r}; got {names}"
            )
        for a in names:
            for b in names:
                if a != b and (a == "" or b.startswith(a + ".")):
                    raise ValueError(
                        f"student crucial layers '{a}' and '{b}' are nested, so their "
                        "parameters would fall in two param groups; choose disjoint modules"
                    )
        for student_path, teacher_path in self.layer_pairs or []:
            resolve_module(self.student, student_path, x, role="student")
            resolve_module(self.teacher, teacher_path, x, role="teacher")  # type: ignore[arg-type]

    def _make_hooks(
        self, model: nn.Module | None, side: int, x: Tensor | None, role: str
    ) -> FeatureHooks:
        assert model is not None and self.layer_pairs is not None
        paths = [pair[side] for pair in self.layer_pairs]
        modules = [resolve_module(model, path, x, role=role) for path in paths]
        if self.method in ("jacobian", "hessian") and self.wrt == "weight":
            convs = [conversion_conv(m, p) for m, p in zip(modules, paths, strict=True)]
            return FeatureHooks([c for _, c in convs], [p for p, _ in convs])
        return FeatureHooks(modules, paths)

    def remove_hooks(self) -> None:
        """Remove the forward hooks from both networks (they are re-installed on demand)."""
        for hooks in (self._student_hooks, self._teacher_hooks):
            if hooks is not None:
                hooks.remove()
        self._student_hooks = self._teacher_hooks = None

    def setup(self, stage: str) -> None:
        """Discover the crucial layers before the optimizer is built (design.md section 2)."""
        if self.method == "none" or self._student_hooks is not None:
            return
        if stage not in ("fit", "validate"):
            return  # test/predict need only the student; layers resolve lazily if used
        x = self.example_input
        if x is None and (self.layer_pairs is None or self._maps_can_be_constant):
            x = self._example_from_data(stage)
        self.resolve_layers(x)

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            # Lightning warns about modules in eval mode; the frozen teacher is so by design.
            # Only a count equal to the teacher's own modules is silenced.
            count = sum(1 for _ in self.teacher.modules())
            warnings.filterwarnings(
                "ignore",
                message=rf"Found {count} module\(s\) in eval mode at the start of training",
            )

    def teardown(self, stage: str) -> None:
        self.remove_hooks()

    def _example_from_data(self, stage: str) -> Tensor | None:
        trainer = self._trainer
        if trainer is None:
            return None
        loader: Any = None
        datamodule: Any = getattr(trainer, "datamodule", None)
        if stage == "fit":
            if datamodule is not None:
                loader = datamodule.train_dataloader()
            else:
                loader = trainer.fit_loop._data_source.dataloader()
        elif stage == "validate":
            loader = (
                datamodule.val_dataloader()
                if datamodule is not None
                else trainer.validate_loop._data_source.dataloader()
            )
        if loader is None:
            return None
        if isinstance(loader, (list, tuple)):
            loader = loader[0]
        x, _ = self.unpack_batch(next(iter(loader)))
        return x

    # ------------------------------------------------------------------ model API
    def unpack_batch(self, batch: Any) -> tuple[Tensor, Tensor]:
        """Split a batch into ``(inputs, targets)``; override for other batch layouts."""
        if isinstance(batch, (list, tuple)) and len(batch) >= 2:
            return batch[0], batch[1]
        raise TypeError(
            "DistillationModule expects batches (inputs, targets) as a tuple or list, got "
            f"{type(batch).__name__}; override unpack_batch() for other layouts"
        )

    def forward(self, x: Tensor) -> Tensor:
        """The student's logits."""
        return self.student(x)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """The student's logits for ``(inputs, ...)`` batches or bare input tensors."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.student(x)

    def train(self, mode: bool = True) -> DistillationModule:
        """Set train mode for the student; the teacher stays in eval mode (design.md 1)."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def task_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """``l_1`` of eq. 1: cross-entropy, or BCE with logits for multi-label data."""
        if self.task == "multiclass":
            return F.cross_entropy(logits, target)
        return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))

    def layer_maps(
        self, x: Tensor, y: Tensor, *, create_graph: bool
    ) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]:
        """Student logits and, per crucial layer, the ``(student, teacher)`` maps on a common
        support (:func:`~lightning_layerkd.maps.match_maps`), not yet normalised: ``(B, K)``
        per-sample maps or ``(1, K)`` weight maps. Teacher maps are constants."""
        if self.method == "none":
            return self.student(x), {}
        if self.method not in METHODS:
            raise ValueError(
                f"layer maps exist for methods {list(METHODS)}; method={self.method!r} compares "
                "input Jacobians or feature kernels instead (see loss_terms)"
            )
        self.resolve_layers(x)
        assert self.teacher is not None and self._teacher_hooks and self._student_hooks
        options: dict[str, Any] = dict(method=self.method, wrt=self.wrt, task=self.task)
        try:
            teacher_target = y if self.map_target == "label" else None
            teacher_logits, teacher_maps = compute_maps(
                self.teacher,
                x,
                self._teacher_hooks,
                target=teacher_target,
                create_graph=False,
                num_probes=self.teacher_probes,
                **options,
            )
            student_target = (
                y if self.map_target == "label" else default_target(teacher_logits, self.task)
            )
            logits, student_maps = compute_maps(
                self.student,
                x,
                self._student_hooks,
                target=student_target,
                create_graph=create_graph,
                num_probes=self.num_probes,
                **options,
            )
        except CrucialLayerError as err:
            role = "student" if err.hooks is self._student_hooks else "teacher"
            model = self.student if role == "student" else self.teacher
            assert model is not None
            raise ValueError(
                f"{role}: {err}\n{role} candidates with output shapes:\n"
                f"{format_candidates(trace_feature_maps(model, x[:2]))}"
            ) from err
        pairs = zip(self.layer_names, student_maps, teacher_maps, strict=True)
        align = self.weight_alignment
        return logits, {name: match_maps(s, t.detach(), align) for name, s, t in pairs}

    def layer_divergences(
        self, x: Tensor, y: Tensor, *, create_graph: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Student logits and, per crucial layer, the per-sample JSD between the student's
        and the teacher's maps (eqs. 8-10). Weight maps give one JSD per batch, repeated for
        each sample so that every entry counts once per sample (design.md section 5)."""
        if self.method in ("jacobian_matching", "information_flow"):
            logits, seed_divergences, _, _ = self.loss_terms(x, y, create_graph=create_graph)
            return logits, seed_divergences
        logits, maps = self.layer_maps(x, y, create_graph=create_graph)
        divergences = {}
        for name, (s, t) in maps.items():
            jsd = js_divergence(to_distribution(s), to_distribution(t))
            divergences[name] = jsd.expand(x.shape[0]) if jsd.numel() == 1 else jsd
        return logits, divergences

    # ------------------------------------------------------------------ Lightning hooks
    def loss_terms(
        self, x: Tensor, y: Tensor, *, create_graph: bool
    ) -> tuple[Tensor, dict[str, Tensor], Tensor, dict[str, Tensor]]:
        """Student logits, per-layer per-sample divergences, their weighted sum (the map
        loss, before ``map_weight``) and the method's other weighted loss terms."""
        if self.method == "jacobian_matching":
            return self._jacobian_matching_terms(x, y, create_graph)
        if self.method == "information_flow":
            return self._information_flow_terms(x, y)
        logits, divergences = self.layer_divergences(x, y, create_graph=create_graph)
        map_loss = sum((d.mean() for d in divergences.values()), x.new_zeros(()))
        return logits, divergences, map_loss, {}

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        x, y = self.unpack_batch(batch)
        logits, divergences, map_loss, extra = self.loss_terms(x, y, create_graph=True)
        task_loss = self.task_loss(logits, y)
        task_weight = 1.0 if self.method_options.get("task_loss", True) else 0.0
        loss = task_weight * task_loss + self.map_weight * map_loss  # eqs. 2, 4, 6
        loss = loss + sum(extra.values(), x.new_zeros(()))
        if self._trainer is not None:
            batch_size = x.shape[0]
            self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
            self.log("train/task_loss", task_loss, batch_size=batch_size)
            self.log("train/map_loss", map_loss, batch_size=batch_size)
            for key, value in extra.items():
                self.log(f"train/{key}", value, batch_size=batch_size)
            for name, d in divergences.items():  # epoch means: one point per epoch and layer
                self.log(
                    f"train/{self.divergence_name}/{name}",
                    d.mean(),
                    on_step=False,
                    on_epoch=True,
                    batch_size=batch_size,
                )
        return {
            "loss": loss,
            "layer_divergence": {name: d.detach() for name, d in divergences.items()},
        }

    # ------------------------------------------------------------------ seed methods
    def _jacobian_matching_terms(
        self, x: Tensor, y: Tensor, create_graph: bool
    ) -> tuple[Tensor, dict[str, Tensor], Tensor, dict[str, Tensor]]:
        """Srinivas & Fleuret (2018): eq. 10 between L2-normalised input Jacobians of the
        output (true class, or the teacher's arg-max) and, per crucial layer pair, of the
        teacher's largest average-pooled attention pixel (their section 6.3.2)."""
        self.resolve_layers(x)
        assert self.teacher is not None
        options = self.method_options
        label_free = self.map_target == "teacher"
        assert self._teacher_hooks is not None and self._student_hooks is not None
        # one forward per network serves the logits, the output's and every layer's Jacobian
        teacher = layer_jacobians(self.teacher, x, self._teacher_hooks, None if label_free else y)
        t_logits, j_teacher = teacher.logits, teacher.output
        target = t_logits.argmax(1) if label_free else y
        student = layer_jacobians(
            self.student, x, self._student_hooks, target, teacher, create_graph=create_graph
        )
        logits, j_student = student.logits, student.output
        divergences = {
            s_path: jacobian_matching_loss(s_pixel.jacobian, t_pixel.jacobian, reduction="none")
            for s_path, s_pixel, t_pixel in zip(
                self._student_hooks.paths, student.pixels, teacher.pixels, strict=True
            )
        }  # eq. 10 per sample and layer
        map_loss = options["output_weight"] * jacobian_matching_loss(j_student, j_teacher)
        map_loss = map_loss + sum((d.mean() for d in divergences.values()), x.new_zeros(()))
        extra: dict[str, Tensor] = {}
        if options["activation_weight"]:
            extra["activation_matching"] = options["activation_weight"] * activation_matching_loss(
                logits, t_logits
            )  # Prop. 1
        if options["norm_penalty_weight"] and create_graph:
            with _running_stats_kept(self.student):
                _, penalty = jacobian_norm_penalty(self.student, x)  # Prop. 2
            extra["jacobian_norm"] = options["norm_penalty_weight"] * penalty
        return logits, divergences, map_loss, extra

    def _information_flow_terms(
        self, x: Tensor, y: Tensor
    ) -> tuple[Tensor, dict[str, Tensor], Tensor, dict[str, Tensor]]:
        """Passalis et al. (2020): PKT (eq. 7) on each crucial layer pair and on the outputs,
        combined by eq. 9 with the critical-period weights of eq. 10 when configured."""
        self.resolve_layers(x)
        assert self.teacher is not None
        options = self.method_options
        assert self._teacher_hooks is not None and self._student_hooks is not None
        with torch.no_grad():
            t_logits, t_feats = _forward_recording(self.teacher, self._teacher_hooks, x)
        logits, s_feats = _forward_recording(self.student, self._student_hooks, x)
        pkt = partial(pkt_loss, kernel=options["kernel"], reduction=options["reduction"])
        names = self.layer_names
        losses = [pkt(s, t) for s, t in zip(s_feats, t_feats, strict=True)]
        weights = [1.0] * (len(names) + 1)
        critical = options["critical_period"]
        if critical is not None:  # eq. 10
            weights = critical_period_weights(len(names) + 1, self.current_epoch, **critical)
        map_loss = weights[-1] * pkt(logits, t_logits)  # the last layer: the outputs
        for weight, loss in zip(weights, losses, strict=False):
            map_loss = map_loss + weight * loss  # eq. 9
        divergences = {
            name: loss.expand(x.shape[0]) for name, loss in zip(names, losses, strict=True)
        }
        return logits, divergences, map_loss, {}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = self.unpack_batch(batch)
        derivative = self.method in ("jacobian", "hessian", "jacobian_matching")
        # Derivative maps need autograd, which Lightning's inference mode forbids.
        with torch.inference_mode(False) if derivative else nullcontext():
            if derivative:
                x, y = x.clone(), y.clone()
            logits, divergences, _, _ = self.loss_terms(x, y, create_graph=False)
        logits, y = logits.detach(), y.detach()
        batch_size = x.shape[0]
        self.log("val/loss", self.task_loss(logits, y), prog_bar=True, batch_size=batch_size)
        self.val_metrics.update(logits, y.long() if self.task == "multilabel" else y)
        self.log_dict(self.val_metrics, batch_size=batch_size, prog_bar=True)
        for name, d in divergences.items():
            metric = self.val_jsd[_key(name)]
            assert isinstance(metric, MeanMetric)
            metric.update(d.detach())
            self.log(f"val/{self.divergence_name}/{name}", metric, batch_size=batch_size)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.param_groups())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval},
        }

    def param_groups(self) -> list[dict[str, Any]]:
        """One param group per student crucial module (named by its path) plus ``"base"``;
        every trainable student parameter is in exactly one group (design.md section 2)."""
        if self.layer_pairs is None:
            self.resolve_layers(self.example_input)
        groups: list[dict[str, Any]] = []
        seen: set[int] = set()
        for name in self.layer_names:
            params = [p for p in self.student.get_submodule(name).parameters() if p.requires_grad]
            seen.update(id(p) for p in params)
            groups.append({"name": name, "params": params})
        base = [p for p in self.student.parameters() if p.requires_grad and id(p) not in seen]
        if base or not groups:
            groups.append({"name": BASE_GROUP, "params": base})
        return groups

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["layerkd_layer_pairs"] = self.layer_pairs

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("layerkd_layer_pairs")
        if saved is None:
            return
        saved = [tuple(pair) for pair in saved]
        if self.layer_pairs is None:
            self.layer_pairs = saved  # type: ignore[assignment]
        elif saved != self.layer_pairs:
            raise ValueError(
                f"the checkpoint was trained with crucial layers {saved}, but this module "
                f"uses {self.layer_pairs}; pass layers={saved} to resume it"
            )


def check_options(
    *,
    method: str = "attention",
    task: str = "multiclass",
    wrt: str = "activation",
    weight_alignment: str = "sorted",
    map_target: str = "label",
    num_probes: int = 1,
    teacher_probes: int | None = None,
    map_weight: float = 1.0,
) -> None:
    """Validate the method options of :class:`DistillationModule` (also used by the app to fail
    before any training); each error names the valid choices."""
    _check_choice("method", method, ALL_METHODS)
    _check_choice("task", task, TASKS)
    _check_choice("wrt", wrt, WRTS)
    _check_choice("weight_alignment", weight_alignment, WEIGHT_ALIGNMENTS)
    _check_choice("map_target", map_target, ("label", "teacher"))
    for name, probes in (("num_probes", num_probes), ("teacher_probes", teacher_probes)):
        if probes is not None and probes < 1:
            raise ValueError(f"{name} must be at least 1, got {probes}")
    if map_weight < 0:
        raise ValueError(f"map_weight must be non-negative, got {map_weight}")


def _key(name: str) -> str:
    # ModuleDict keys cannot contain dots.
    return name.replace(".", "__") or "__root__"


def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _device_of(model: nn.Module, x: Tensor) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else x.device


def _forward_recording(
    model: nn.Module, hooks: FeatureHooks, x: Tensor
) -> tuple[Tensor, list[Tensor]]:
    """Logits and the hooked layers' outputs of one forward pass."""
    with hooks.record() as recording:
        logits = model(x)
        return logits, hooks.outputs(recording)


def _method_options(method: str, given: Mapping[str, Any] | None) -> dict[str, Any]:
    defaults = METHOD_OPTIONS.get(method, {})
    unknown = sorted(set(given or {}) - set(defaults))
    if unknown:
        raise ValueError(
            f"method_options {unknown} are not options of method={method!r}; valid: "
            f"{sorted(defaults) or 'none'}"
        )
    options = {**defaults, **(given or {})}
    critical = options.get("critical_period")
    if critical is not None and set(critical) - {"alpha_init", "gamma"}:
        raise ValueError(
            f"critical_period takes alpha_init and gamma (eq. 10), got {sorted(critical)}"
        )
    return options


def _normalise_layers(layers: LayerSpec, allow_empty: bool = False) -> list[tuple[str, str]]:
    if isinstance(layers, str):
        raise ValueError(
            f"layers must be 'auto', a list of paths, a list of (student, teacher) pairs or a "
            f"dict, got the string {layers!r}"
        )
    if isinstance(layers, Mapping):
        pairs = [(str(s), str(t)) for s, t in layers.items()]
    else:
        pairs = []
        for item in layers:
            if isinstance(item, str):
                pairs.append((item, item))
            elif isinstance(item, Sequence) and len(item) == 2:
                pairs.append((str(item[0]), str(item[1])))
            else:
                raise ValueError(
                    f"each layer must be a path or a (student_path, teacher_path) pair, "
                    f"got {item!r}"
                )
    if not pairs and not allow_empty:
        raise ValueError("layers is empty; give at least one crucial layer or use 'auto'")
    return pairs
