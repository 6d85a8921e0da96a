"""The contract every distillation method implements, and the registry that finds methods by
name (docs/design.md section 8).

A method is one object. It says which module it hooks for each crucial layer of each network
(:meth:`DistillationMethod.hook_module`) and, for one batch, returns the student's logits, the
teacher's logits, the per-layer per-sample divergences that
:class:`~lightning_layerkd.LayerwiseLRCallback` accumulates, and its named loss terms
(:meth:`DistillationMethod.compute`). :class:`~lightning_layerkd.DistillationModule` owns
everything else: the hooks' lifetime, the param groups, logging, metrics and checkpoints.

Every method can add a logit loss to its own terms: ``logit_loss`` (Hinton's KD, decoupled KD or
DIST, :mod:`lightning_layerkd.methods.logit_losses`), or Hinton et al.'s KD alone with
``logit_weight`` and ``temperature``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, TypeVar

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_layerkd._common import Task
from lightning_layerkd.layers.discovery import find_crucial_layers
from lightning_layerkd.layers.hooks import FeatureHooks
from lightning_layerkd.methods.logit_losses import KDLoss, LogitLoss
from lightning_layerkd.methods.parts import LearntParts


class MethodOutput(NamedTuple):
    """What a method computes for one batch.

    Attributes:
        logits: the student's logits ``(B, K)``, part of the student's graph.
        teacher_logits: the teacher's logits (constants), or ``None`` for a method without
            a teacher.
        divergences: per crucial layer (the student's path, which names its param group) a
            per-sample divergence of shape ``(B,)``; what the layer-wise rule accumulates.
        losses: named loss terms, already weighted; the training loss is the task loss plus
            their sum.
    """

    logits: Tensor
    teacher_logits: Tensor | None
    divergences: dict[str, Tensor]
    losses: dict[str, Tensor]


@dataclass(frozen=True)
class Networks:
    """What a method sees of the module for one batch: both networks, the forward hooks on
    the modules it asked for, the crucial layers' names, the task, the epoch, each layer's
    weight in the layer loss (absent: 1; see ``DistillationMethod.supports_layer_weights``),
    the method's learnt parts and the batch's sample indices in the training set (training
    batches that carry them; see ``DistillationMethod.needs_sample_indices``)."""

    student: nn.Module
    teacher: nn.Module | None
    student_hooks: FeatureHooks | None
    teacher_hooks: FeatureHooks | None
    layer_names: tuple[str, ...]
    task: Task = "multiclass"
    epoch: int = 0
    layer_weights: Mapping[str, float] = field(default_factory=dict)
    parts: LearntParts | None = None
    indices: Tensor | None = None


class DistillationMethod:
    """Base class of distillation methods: subclass it, implement :meth:`compute`, and
    register the class with :func:`register_method` to use it by name.

    Class attributes describe the method to the module, the callbacks and the app:
    ``divergence_name`` (how the per-layer term is logged, ``train/<name>/<layer>``),
    ``needs_teacher``, ``uses_layers`` (``False``: no crucial layers, one param group),
    ``allows_no_layers`` (an empty layer list is valid), ``needs_autograd`` (derivatives
    of the inputs or features, so validation runs with autograd on) and
    ``supports_layer_weights`` (:meth:`compute` multiplies each layer's loss term by
    ``nets.layer_weights[layer]``, which ``LayerwiseLRCallback(target="map_weight")`` sets) and
    ``has_parts`` (:meth:`build_parts` builds learnt parts, which :meth:`compute` finds in
    ``nets.parts``) and ``needs_sample_indices`` (training batches must carry each sample's
    index in the training set, ``nets.indices``, and :meth:`build_parts` gets the set's size).

    Args:
        task_loss: add the task loss (cross-entropy, ``l_1`` of eq. 1) to the method's terms.
        logit_weight: weight of logit distillation added to the method's own terms (Hinton et
            al. 2015, ``T^2 KL(softmax(z_T / T) || softmax(z_S / T))``); 0 leaves it out.
            Shorthand for ``logit_loss=KDLoss(weight=logit_weight, temperature=temperature)``.
        temperature: ``T`` of that logit distillation.
        logit_loss: a logit loss added to the method's own terms, its terms logged by name
            (``KDLoss``, ``DKDLoss``, ``DISTLoss``); with ``logit_weight`` > 0 it is an error.
    """

    #: the registered name; an unregistered class is named by its class name
    name: ClassVar[str] = "DistillationMethod"
    divergence_name: ClassVar[str] = "divergence"
    needs_teacher: ClassVar[bool] = True
    uses_layers: ClassVar[bool] = True
    allows_no_layers: ClassVar[bool] = False
    needs_autograd: ClassVar[bool] = False
    supports_layer_weights: ClassVar[bool] = False
    has_parts: ClassVar[bool] = False
    needs_sample_indices: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.name = cls.__name__  # not the parent's registered name; register_method sets it

    def __init__(
        self,
        *,
        task_loss: bool = True,
        logit_weight: float = 0.0,
        temperature: float = 4.0,
        logit_loss: LogitLoss | None = None,
    ) -> None:
        if logit_weight < 0:
            raise ValueError(f"logit_weight must be non-negative, got {logit_weight}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        owner = type(self).__name__
        if logit_loss is not None and not isinstance(logit_loss, LogitLoss):
            raise TypeError(
                f"{owner}: logit_loss must be a LogitLoss (KDLoss, DKDLoss, DISTLoss) or None, "
                f"got {type(logit_loss).__name__}"
            )
        if logit_loss is not None and logit_weight:
            raise ValueError(
                f"{owner}: logit_weight={logit_weight} (Hinton's KD) and logit_loss={logit_loss!r} "
                "both add a logit loss; set logit_weight to 0 or leave logit_loss out"
            )
        if (logit_weight or logit_loss is not None) and not self.needs_teacher:
            raise ValueError(f"{owner} has no teacher, so logit_weight must be 0 (no logit_loss)")
        self.task_loss = bool(task_loss)
        self.logit_weight = float(logit_weight)
        self.temperature = float(temperature)
        self.logit_loss = logit_loss
        #: the logit loss this method adds: ``logit_loss``, Hinton's KD from ``logit_weight``,
        #: or none
        self.logit_term: LogitLoss | None = logit_loss
        if logit_weight:
            self.logit_term = KDLoss(weight=logit_weight, temperature=temperature)

    @property
    def label(self) -> str:
        """The name results are reported under: :attr:`name`, with ``+`` the logit loss's label
        when the method adds one to its own terms (``AttentionMaps(logit_weight=1)`` is
        ``attention+logits``, with ``logit_loss=DKDLoss(standardize=True)``
        ``attention+dkd+ls``), so that they never share a row of a report."""
        return f"{self.name}+{self.logit_term.label}" if self.logit_term else self.name

    def check_task(self, task: str) -> None:
        """A ``ValueError`` unless the method, its logit loss included, is defined for ``task``
        (decoupled KD and DIST are multi-class only)."""
        term = self.logit_term
        if term is not None and task not in term.tasks:
            raise ValueError(
                f"{self!r}: its logit loss {type(term).__name__} is defined for task in "
                f"{list(term.tasks)}, not {task!r}; KDLoss (Hinton et al.) handles multi-label "
                "data"
            )

    # ------------------------------------------------------------------ extension points
    def compute(self, nets: Networks, x: Tensor, y: Tensor, *, create_graph: bool) -> MethodOutput:
        """The method's logits, divergences and loss terms for one batch ``(x, y)``.

        ``create_graph`` is ``True`` in training (the terms are backpropagated into the
        student) and ``False`` in validation."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute()")

    def hook_module(self, model: nn.Module, path: str, module: nn.Module) -> tuple[str, nn.Module]:
        """The module to hook for the crucial layer ``path`` of ``model``, with its path; the
        layer itself unless overridden (e.g. its conversion convolution)."""
        return path, module

    def build_parts(
        self,
        student_shapes: Sequence[tuple[int, ...]],
        teacher_shapes: Sequence[tuple[int, ...]],
        num_samples: int | None = None,
    ) -> LearntParts | None:
        """The method's learnt parts for crucial layers whose hooked outputs have, per sample,
        these shapes (the layers' order); ``None`` for a method without any. ``num_samples``:
        the training set's size, when the module knows it. Called once the layers are known,
        before the optimizer is built, and again from a checkpoint's shapes."""
        return None

    @property
    def inspects_pairs(self) -> bool:
        """Whether :meth:`uninformative_pairs` needs a batch (the module fetches one)."""
        return False

    def auto_layers(
        self, teacher: nn.Module, student: nn.Module, x: Tensor, num_layers: int
    ) -> list[tuple[str, str]]:
        """The crucial layer pairs for ``layers="auto"``: :func:`find_crucial_layers` on ``x``
        without the :meth:`uninformative_pairs`, the deepest ``num_layers`` of them."""
        with torch.no_grad():
            candidates = find_crucial_layers(teacher, student, x, num_layers=None)
        dropped = self.uninformative_pairs(student, teacher, candidates, x)
        kept = [pair for pair in candidates if pair not in dropped]
        if not kept:
            raise ValueError(
                f"layers='auto' found only pairs that carry no signal for {self!r}: {dropped}; "
                "give explicit layers or choose other method options"
            )
        for pair, why in dropped.items():
            rank_zero_info(f"layers='auto' leaves out the pair {pair}: {why}")
        return kept[-num_layers:]

    def uninformative_pairs(
        self, student: nn.Module, teacher: nn.Module, pairs: Sequence[tuple[str, str]], x: Tensor
    ) -> dict[tuple[str, str], str]:
        """Layer pairs whose divergence carries no signal for this method, with the reason;
        ``layers="auto"`` leaves them out and explicit ones get a warning."""
        return {}

    # ------------------------------------------------------------------ the one entry point
    def __call__(self, nets: Networks, x: Tensor, y: Tensor, *, create_graph: bool) -> MethodOutput:
        """:meth:`compute`, checked against the contract, plus the logit loss's terms."""
        out = self.compute(nets, x, y, create_graph=create_graph)
        if not isinstance(out, MethodOutput):
            raise TypeError(
                f"{type(self).__name__}.compute must return a MethodOutput, got "
                f"{type(out).__name__}"
            )
        if set(out.divergences) != set(nets.layer_names):
            raise ValueError(
                f"{type(self).__name__}.compute returned divergences for "
                f"{sorted(out.divergences)}; expected one per crucial layer "
                f"{list(nets.layer_names)}"
            )
        for layer, d in out.divergences.items():
            if d.shape != (x.shape[0],):
                raise ValueError(
                    f"{type(self).__name__}: the divergence of layer '{layer}' has shape "
                    f"{tuple(d.shape)}; it must be per sample, shape ({x.shape[0]},) (repeat a "
                    "per-batch value with .expand(batch_size))"
                )
        if self.logit_term is None:
            return out
        if out.teacher_logits is None:
            needs = f"logit_weight={self.logit_weight}" if self.logit_weight else "logit_loss"
            raise ValueError(
                f"{type(self).__name__}.compute returned no teacher_logits, which {needs} needs"
            )
        terms = self.logit_term(
            out.logits, out.teacher_logits.detach(), y, task=nets.task, epoch=nets.epoch
        )
        clash = sorted(set(terms) & set(out.losses))
        if clash:
            raise ValueError(
                f"{type(self).__name__}'s own loss terms and its logit loss "
                f"{self.logit_term!r} share the names {clash}; rename the method's terms"
            )
        return out._replace(losses={**out.losses, **terms})

    # ------------------------------------------------------------------ description
    def options(self) -> dict[str, Any]:
        """The constructor arguments this method was built with (for hyperparameters, logs
        and ``repr``), read from the attributes of the same names (an argument stored under
        another name is not listed)."""
        options: dict[str, Any] = {}
        for cls in type(self).__mro__:  # up the hierarchy while __init__ forwards **kwargs
            if cls is object:
                break
            params = inspect.signature(cls.__init__).parameters.values()  # type: ignore[misc]
            for param in params:
                named = param.kind in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD)
                if named and param.name != "self" and hasattr(self, param.name):
                    options.setdefault(param.name, getattr(self, param.name))
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                break
        for key, value in options.items():  # plain values (results.json): its Hydra node
            if isinstance(value, LogitLoss):
                target = f"{type(value).__module__}.{type(value).__qualname__}"
                options[key] = {"_target_": target, **value.options()}
        return options

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({args})"


# ---------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[DistillationMethod]] = {}
M = TypeVar("M", bound=type[DistillationMethod])


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: register a :class:`DistillationMethod` subclass under ``name``, so
    that ``DistillationModule(method=name)`` builds it with its defaults."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a method name must be an identifier, got {name!r}")

    def register(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, DistillationMethod)):
            raise TypeError(f"register_method({name!r}) needs a DistillationMethod subclass")
        known = _REGISTRY.get(name)
        identity = (cls.__module__, cls.__qualname__)  # the same class, e.g. a script run again
        if known is not None and (known.__module__, known.__qualname__) != identity:
            raise ValueError(
                f"a method named {name!r} is already registered ({known.__module__}."
                f"{known.__qualname__}); choose another name"
            )
        other = [n for n, c in _REGISTRY.items() if c is cls and n != name]
        if other:
            raise ValueError(f"{cls.__qualname__} is already registered as {other[0]!r}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return register


def method_names() -> list[str]:
    """The registered method names, in registration order."""
    return list(_REGISTRY)


def method_class(name: str) -> type[DistillationMethod]:
    """The class registered under ``name``; an unknown name lists the registered ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown method {name!r}; registered methods: {method_names()} (register your "
            "own with lightning_layerkd.methods.register_method)"
        ) from None


def build_method(method: str | DistillationMethod) -> DistillationMethod:
    """``method`` itself, or the registered method of that name built with its defaults."""
    if isinstance(method, DistillationMethod):
        return method
    if isinstance(method, str):
        return method_class(method)()
    raise TypeError(
        f"method must be a registered name {method_names()} or a DistillationMethod, got "
        f"{type(method).__name__}"
    )
