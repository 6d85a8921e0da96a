"""``DistillationModule``: a LightningModule that distils a frozen teacher into a student
through per-crucial-layer map losses (Kokane et al. 2024, eqs. 2, 4 and 6)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_layerkd._common import TASKS, Task, check_choice
from lightning_layerkd.guards import (
    check_finite_loss,
    check_layer_weights,
    check_networks,
)
from lightning_layerkd.layers.discovery import format_candidates, trace_feature_maps
from lightning_layerkd.layers.hooks import CrucialLayerError, FeatureHooks
from lightning_layerkd.layers.specs import (
    LayerSpec,
    check_layer_pairs,
    normalise_layers,
    resolve_module,
)
from lightning_layerkd.methods import (
    DistillationMethod,
    LearntParts,
    MapMethod,
    MethodOutput,
    Networks,
)
from lightning_layerkd.methods.base import build_method
from lightning_layerkd.methods.parts import Shapes, hooked_shapes
from lightning_layerkd.metrics import LayerMeans, task_loss, task_metrics
from lightning_layerkd.param_groups import BASE_GROUP, add_to_param_groups, crucial_param_groups

__all__ = ["BASE_GROUP", "DistillationModule", "LayerSpec"]

OptimizerFactory = Callable[..., Optimizer]
SchedulerFactory = Callable[[Optimizer], Any]

_DEFAULT_OPTIMIZER: OptimizerFactory = partial(
    torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4
)


def split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """``(inputs, targets)`` from a tuple or list batch; other layouts are an error that says
    how to support them."""
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        "DistillationModule expects batches (inputs, targets) as a tuple or list, got "
        f"{type(batch).__name__}; override unpack_batch() for other layouts"
    )


def first_batch(trainer: Any, stage: str) -> Any:
    """The first batch of the train (``stage="fit"``) or validation dataloader the trainer
    will use, for discovering crucial layers before the optimizer exists; ``None`` if none."""
    datamodule: Any = getattr(trainer, "datamodule", None)
    if datamodule is not None:
        loader = datamodule.train_dataloader() if stage == "fit" else datamodule.val_dataloader()
    else:
        loop: Any = trainer.fit_loop if stage == "fit" else trainer.validate_loop
        loader = loop._data_source.dataloader()
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    return None if loader is None else next(iter(loader))


def batch_indices(batch: Any) -> Tensor | None:
    """The samples' indices in the training set: the third entry of an ``(inputs, targets,
    indices)`` batch (:class:`~lightning_layerkd.data.IndexedDataset`), else ``None``."""
    if isinstance(batch, (list, tuple)) and len(batch) >= 3 and isinstance(batch[2], Tensor):
        return batch[2]
    return None


def train_set_size(trainer: Any) -> int | None:
    """The number of samples of the training set the trainer will use (all ranks together),
    or ``None`` if its loader has no sized dataset."""
    datamodule: Any = getattr(trainer, "datamodule", None)
    dataset = getattr(datamodule, "train_set", None)  # an ImageDataModule after setup
    if dataset is None:
        if datamodule is not None:
            loader = datamodule.train_dataloader()
        else:
            loader = trainer.fit_loop._data_source.dataloader()
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return None


class DistillationModule(LightningModule):
    """Distil ``teacher`` into ``student`` with a distillation method's per-layer losses.

    The training loss is the task loss plus the method's loss terms; for the map methods of
    Kokane et al. that is ``CE(S(x), y) + map_weight * sum_j mean_i JSD(p_j^S, p_j^T)`` (eqs. 2,
    4, 6 with the JSD of eqs. 8-10). Features are read by forward hooks on the modules the
    method asks for; neither model is changed. The teacher is frozen (``requires_grad=False``,
    always in eval mode, outside the optimizer).

    The optimizer has one param group per student crucial module, named by its path, plus
    ``"base"``; ``training_step`` returns ``{"loss", "layer_divergence"}`` with the per-sample
    divergence of each layer, which is what :class:`~lightning_layerkd.LayerwiseLRCallback`
    reads. The module owns the Lightning side (hooks' lifetime, param groups, logging,
    metrics, checkpoints); the method owns the maths (:mod:`lightning_layerkd.methods`).

    Args:
        teacher: a trained network (any ``nn.Module`` returning logits); ``None`` only for a
            method without a teacher (``"none"``, the student alone).
        student: the network to train.
        method: a :class:`~lightning_layerkd.methods.DistillationMethod`, e.g.
            ``JacobianMaps(wrt="weight")``, or a registered name built with its defaults
            (``"attention"``, ``"jacobian"``, ``"hessian"``, ... :mod:`lightning_layerkd.methods`).
        layers: ``"auto"`` (docs/design.md section 2, run on ``example_input`` or on the first
            training batch before the optimizer is built), a list of paths present in both
            networks, a list of ``(student_path, teacher_path)`` pairs, or a dict
            ``{student_path: teacher_path}``.
        num_classes: number of classes (labels for ``task="multilabel"``).
        task: ``"multiclass"`` (cross-entropy, top-1 accuracy) or ``"multilabel"``
            (BCE with logits, mAP and accuracy).
        num_crucial_layers: how many pairs ``layers="auto"`` keeps (the deepest).
        example_input: an input batch for ``layers="auto"``.
        optimizer: a callable that takes the param groups and returns an optimizer, e.g.
            ``functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)`` (the default also sets
            ``weight_decay=5e-4``); Hydra's ``_partial_: true`` builds one.
        scheduler: optional callable that takes the optimizer and returns an LR scheduler.
        scheduler_interval: ``"epoch"`` or ``"step"``.
        check_finite: stop with an error that names the cause when the training loss is not
            finite (one host sync per step; off, a NaN spreads into the weights silently).

    Attributes:
        layer_loss_weights: each crucial layer's weight ``w_j`` in the method's layer loss
            (absent: 1), set by :meth:`set_layer_loss_weights`.
    """

    def __init__(
        self,
        teacher: nn.Module | None,
        student: nn.Module,
        *,
        method: str | DistillationMethod = "attention",
        layers: LayerSpec = "auto",
        num_classes: int,
        task: Task = "multiclass",
        num_crucial_layers: int = 4,
        example_input: Tensor | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        self.method = build_method(method)
        check_choice("task", task, TASKS)
        self.method.check_task(task)
        check_choice("scheduler_interval", scheduler_interval, ("epoch", "step"))
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        m = self.method
        check_networks(teacher, student, m.name, m.needs_teacher, m.needs_autograd)
        self.check_finite = check_finite
        self.save_hyperparameters(
            ignore=["teacher", "student", "example_input", "optimizer", "scheduler", "method"]
        )
        self.hparams.update(method=self.method.name, method_options=self.method.options())
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        self.task = task
        self.num_classes = num_classes
        self.num_crucial_layers = num_crucial_layers
        self.example_input = example_input
        self.optimizer_factory = optimizer or _DEFAULT_OPTIMIZER
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        #: the base learning rate of every group if set, else the optimizer factory's own
        self.learning_rate: float | None = None

        self.layer_pairs: list[tuple[str, str]] | None = None
        self.layer_loss_weights: dict[str, float] = {}
        if not self.method.uses_layers:
            self.layer_pairs = []
        elif not (isinstance(layers, str) and layers == "auto"):
            self.layer_pairs = normalise_layers(layers, allow_empty=self.method.allows_no_layers)
        self._student_hooks: FeatureHooks | None = None
        self._teacher_hooks: FeatureHooks | None = None
        #: the method's learnt parts (:meth:`DistillationMethod.build_parts`), once built
        self.method_parts: LearntParts | None = None
        self._part_shapes: (
            tuple[list[tuple[int, ...]], list[tuple[int, ...]], int | None] | None
        ) = None

        self.val_metrics = task_metrics(task, num_classes).clone(prefix="val/")
        self.val_jsd = LayerMeans()

    # ------------------------------------------------------------------ layers and hooks
    @property
    def divergence_name(self) -> str:
        """How the per-layer term is logged, ``train/<name>/<layer>``: the method's own."""
        return self.method.divergence_name

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
            self.layer_pairs = self.method.auto_layers(
                self.teacher, self.student, x, self.num_crucial_layers
            )
            checked = True
        if self.method.uses_layers and self._student_hooks is None:
            assert self.teacher is not None
            check_layer_pairs(self.student, self.teacher, self.layer_pairs, x)
            if not checked and x is not None:
                nets, pairs = (self.student, self.teacher), self.layer_pairs
                for pair, why in self.method.uninformative_pairs(*nets, pairs, x).items():
                    rank_zero_warn(f"crucial layer pair {pair}: {why}")
            self._student_hooks = self._make_hooks(self.student, 0, x, "student")
            self._teacher_hooks = self._make_hooks(self.teacher, 1, x, "teacher")
            for name in self.layer_names:  # created before fit moves the module to its device
                self.val_jsd.metric(name)
        if self.method.has_parts and self.method_parts is None:
            self._build_parts(x)
        return list(self.layer_pairs)

    def _build_parts(self, x: Tensor | None) -> None:
        """Build the method's learnt parts from the hooked layers' output shapes on ``x``."""
        if x is None:
            raise ValueError(
                f"{type(self.method).__name__} sizes its learnt parts from the crucial layers' "
                "outputs: pass example_input=..., or fit with a train dataloader"
            )
        assert self.teacher is not None and self._student_hooks and self._teacher_hooks
        student = hooked_shapes(self.student, self._student_hooks, x)
        teacher = hooked_shapes(self.teacher, self._teacher_hooks, x)
        size = None
        if self.method.needs_sample_indices and self._trainer is not None:
            size = train_set_size(self._trainer)
        self._make_parts(student, teacher, x.device, size)

    def _make_parts(
        self, student: Shapes, teacher: Shapes, device: torch.device, size: int | None = None
    ) -> None:
        parts = self.method.build_parts(student, teacher, size)
        if parts is not None:
            dtype = next(
                (p.dtype for p in self.student.parameters() if p.is_floating_point()), None
            )
            self.method_parts = parts.to(device=device, dtype=dtype)
            self._part_shapes = (student, teacher, size)

    def _make_hooks(
        self, model: nn.Module | None, side: int, x: Tensor | None, role: str
    ) -> FeatureHooks:
        assert model is not None and self.layer_pairs is not None
        paths = [pair[side] for pair in self.layer_pairs]
        modules = [resolve_module(model, path, x, role=role) for path in paths]
        hooked = [self.method.hook_module(model, *pm) for pm in zip(paths, modules, strict=True)]
        return FeatureHooks([m for _, m in hooked], [p for p, _ in hooked])

    def remove_hooks(self) -> None:
        """Remove the forward hooks from both networks (they are re-installed on demand)."""
        for hooks in (self._student_hooks, self._teacher_hooks):
            if hooks is not None:
                hooks.remove()
        self._student_hooks = self._teacher_hooks = None

    def setup(self, stage: str) -> None:
        """Discover the crucial layers before the optimizer is built (docs/design.md section 2)."""
        if not self.method.uses_layers or self._student_hooks is not None:
            return
        if stage not in ("fit", "validate"):  # test/predict need only the student
            return
        x = self.example_input
        needs_batch = self.method.inspects_pairs or self.method.has_parts
        if x is None and (self.layer_pairs is None or needs_batch):
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
        batch = first_batch(self._trainer, stage) if self._trainer is not None else None
        return None if batch is None else self.unpack_batch(batch)[0]

    # ------------------------------------------------------------------ model API
    def unpack_batch(self, batch: Any) -> tuple[Tensor, Tensor]:
        """Split a batch into ``(inputs, targets)``; override for other batch layouts."""
        return split_batch(batch)

    def forward(self, x: Tensor) -> Tensor:
        """The student's logits."""
        return self.student(x)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """The student's logits for bare input tensors, ``(inputs,)`` or whatever
        :meth:`unpack_batch` splits (its inputs)."""
        if isinstance(batch, Tensor):
            return self.student(batch)
        if isinstance(batch, (list, tuple)) and len(batch) == 1:
            return self.student(batch[0])
        return self.student(self.unpack_batch(batch)[0])

    def train(self, mode: bool = True) -> DistillationModule:
        """Set train mode for the student; the teacher stays in eval mode (docs/design.md 1)."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def task_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """``l_1`` of eq. 1 (:func:`~lightning_layerkd.metrics.task_loss`)."""
        return task_loss(logits, target, self.task)

    def distillation_terms(
        self, x: Tensor, y: Tensor, *, create_graph: bool, indices: Tensor | None = None
    ) -> MethodOutput:
        """The method's output for one batch: student and teacher logits, per-layer
        per-sample divergences and named loss terms (resolving the layers first if needed);
        ``indices``: the samples' indices in the training set, for methods that need them."""
        nets = self._networks(x, indices)
        try:
            return self.method(nets, x, y, create_graph=create_graph)
        except CrucialLayerError as err:
            role = "student" if err.hooks is self._student_hooks else "teacher"
            model = self.student if role == "student" else self.teacher
            assert model is not None
            raise ValueError(
                f"{role}: {err}\n{role} candidates with output shapes:\n"
                f"{format_candidates(trace_feature_maps(model, x[:2]))}"
            ) from err

    def _networks(self, x: Tensor, indices: Tensor | None = None) -> Networks:
        if self.method.uses_layers:
            self.resolve_layers(x)
        epoch = self.current_epoch if self._trainer is not None else 0
        hooks = (self._student_hooks, self._teacher_hooks)
        names = tuple(self.layer_names)
        weights, parts = self.layer_loss_weights, self.method_parts
        return Networks(
            self.student, self.teacher, *hooks, names, self.task, epoch, weights, parts, indices
        )

    def set_layer_loss_weights(self, weights: dict[str, float]) -> None:
        """Weight each crucial layer's term of the layer loss: ``lambda * sum_j w_j mean_i
        JSD_ij`` for the map methods (eqs. 2, 4, 6 with a weight per layer); what
        ``LayerwiseLRCallback(target="map_weight")`` calls. Unnamed layers keep weight 1."""
        if not self.method.supports_layer_weights:
            raise ValueError(
                f"{type(self.method).__name__} has no per-layer loss terms to weight; "
                "per-layer weights (LayerwiseLRCallback(target='map_weight')) work with the "
                "map methods, InformationFlow and the feature methods (FitNet, AttentionTransfer, "
                "CRD, ReviewKD); use target='lr'"
            )
        self.layer_loss_weights = check_layer_weights(weights, self.layer_names)

    def layer_divergences(
        self, x: Tensor, y: Tensor, *, create_graph: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Student logits and, per crucial layer, the per-sample divergence between the
        student and the teacher (for the map methods the JSD of eqs. 8-10)."""
        out = self.distillation_terms(x, y, create_graph=create_graph)
        return out.logits, out.divergences

    def layer_maps(
        self, x: Tensor, y: Tensor, *, create_graph: bool
    ) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]:
        """Student logits and, per crucial layer, the ``(student, teacher)`` maps on a common
        support (:meth:`~lightning_layerkd.methods.MapMethod.layer_maps`); map methods only."""
        if not isinstance(self.method, MapMethod):
            raise ValueError(
                f"{self.method!r} compares no layer maps; layer maps exist for map methods "
                "(AttentionMaps, JacobianMaps, HessianMaps)"
            )
        logits, _, maps = self.method.layer_maps(self._networks(x), x, y, create_graph=create_graph)
        return logits, maps

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        x, y = self.unpack_batch(batch)
        out = self.distillation_terms(x, y, create_graph=True, indices=batch_indices(batch))
        task_loss = self.task_loss(out.logits, y)
        task_weight = 1.0 if self.method.task_loss else 0.0
        loss = task_weight * task_loss + sum(out.losses.values(), x.new_zeros(()))
        if self.check_finite:
            terms = {"task_loss": task_loss, **out.losses}
            check_finite_loss(loss, terms, x, epoch=self.current_epoch, batch_idx=batch_idx)
        if self._trainer is not None:
            batch_size = x.shape[0]
            self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
            self.log("train/task_loss", task_loss, batch_size=batch_size)
            for key, value in out.losses.items():
                self.log(f"train/{key}", value, batch_size=batch_size)
            for name, d in out.divergences.items():  # epoch means: one point per epoch and layer
                key = f"train/{self.divergence_name}/{name}"
                self.log(key, d.mean(), on_step=False, on_epoch=True, batch_size=batch_size)
        return {
            "loss": loss,
            "layer_divergence": {name: d.detach() for name, d in out.divergences.items()},
        }

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = self.unpack_batch(batch)
        derivative = self.method.needs_autograd
        # Derivative maps need autograd, which Lightning's inference mode forbids.
        with torch.inference_mode(False) if derivative else nullcontext():
            if derivative:
                x, y = x.clone(), y.clone()
            logits, divergences = self.layer_divergences(x, y, create_graph=False)
        logits, y = logits.detach(), y.detach()
        batch_size = x.shape[0]
        self.log("val/loss", self.task_loss(logits, y), prog_bar=True, batch_size=batch_size)
        self.val_metrics.update(logits, y.long() if self.task == "multilabel" else y)
        self.log_dict(self.val_metrics, batch_size=batch_size, prog_bar=True)
        for name, d in divergences.items():
            metric = self.val_jsd.metric(name)
            metric.update(d.detach())
            self.log(f"val/{self.divergence_name}/{name}", metric, batch_size=batch_size)

    def configure_optimizers(self) -> Any:
        # ``learning_rate`` (set by ``Tuner.lr_find(update_attr=True)``) overrides the factory's
        overrides = {} if self.learning_rate is None else {"lr": self.learning_rate}
        optimizer = self.optimizer_factory(self.param_groups(), **overrides)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval},
        }

    def param_groups(self) -> list[dict[str, Any]]:
        """One param group per student crucial module (named by its path) plus ``"base"``;
        every trainable student parameter is in exactly one group (docs/design.md section 2)."""
        if self.layer_pairs is None or (self.method.has_parts and self.method_parts is None):
            self.resolve_layers(self.example_input)
        groups = crucial_param_groups(self.student, self.layer_names)
        if self.method_parts is None:
            return groups
        parts = self.method_parts  # a layer's learnt parts learn at that layer's rate
        owners = [*self.layer_names, BASE_GROUP]
        modules = [*parts.per_layer, parts.shared]
        return add_to_param_groups(groups, zip(owners, modules, strict=True))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["layerkd_layer_pairs"] = self.layer_pairs
        if self._part_shapes is not None:
            checkpoint["layerkd_part_shapes"] = self._part_shapes

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        shapes = checkpoint.get("layerkd_part_shapes")
        if shapes is not None and self.method_parts is None:  # e.g. load_from_checkpoint
            student, teacher = ([tuple(s) for s in side] for side in shapes[:2])
            self._make_parts(student, teacher, self.device, shapes[2] if len(shapes) > 2 else None)
        saved = [tuple(pair) for pair in checkpoint.get("layerkd_layer_pairs") or []]
        if not saved:
            return
        if self.layer_pairs is None:
            self.layer_pairs = saved  # type: ignore[assignment]
        elif saved != self.layer_pairs:
            raise ValueError(
                f"the checkpoint was trained with crucial layers {saved}, but this module "
                f"uses {self.layer_pairs}; pass layers={saved} to resume it"
            )
