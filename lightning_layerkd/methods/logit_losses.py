"""Logit losses that any method adds to its own terms (docs/design.md section 10): Hinton et
al.'s KD, decoupled KD (Zhao et al. 2022) and DIST (Huang et al. 2022), each with logit
standardization (Sun et al. 2024) as an option.

A logit loss is a small object with its options as constructor arguments; a method takes one as
``logit_loss`` (``AttentionMaps(logit_loss=DKDLoss())``; in the app ``method/logit_loss=dkd``),
and returns its named terms beside the method's own. The maths is in
:mod:`lightning_layerkd.functional.logit_losses`.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar

from torch import Tensor

from lightning_layerkd.functional.divergence import logit_distillation_loss
from lightning_layerkd.functional.logit_losses import decoupled_kd_terms, dist_terms

#: The name of Hinton et al.'s term (``train/logit_loss``).
LOGIT_TERM = "logit_loss"


def _non_negative(owner: str, name: str, value: float) -> float:
    """``value`` as a float; a ``ValueError`` naming ``owner``'s option ``name`` unless it is
    finite and >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {name} must be a number, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{owner}: {name} must be finite and non-negative, got {value}")
    return float(value)


class LogitLoss:
    """Base class of the logit losses: options as keyword constructor arguments, named terms
    from :meth:`terms`.

    Args:
        temperature: ``T`` of the softmax; with ``standardize``, the base temperature ``tau`` of
            ``Z(z; tau) = (z - mean z) / (tau std z)`` (Sun et al. 2024).
        standardize: z-score each sample's logits before the temperature softmax.
    """

    #: the name results are reported under (``+ls`` added with ``standardize``)
    name: ClassVar[str] = "logit_loss"
    #: the tasks the loss is defined for
    tasks: ClassVar[tuple[str, ...]] = ("multiclass",)

    def __init__(self, *, temperature: float = 4.0, standardize: bool = False) -> None:
        owner = type(self).__name__
        if _non_negative(owner, "temperature", temperature) == 0:
            raise ValueError(f"{owner}: temperature must be positive, got {temperature}")
        if not isinstance(standardize, bool):
            raise TypeError(f"{owner}: standardize must be true or false, got {standardize!r}")
        self.temperature = float(temperature)
        self.standardize = standardize

    @property
    def label(self) -> str:
        """:attr:`name`, with ``+ls`` under logit standardization (``dkd+ls``)."""
        return f"{self.name}+ls" if self.standardize else self.name

    def terms(
        self, logits: Tensor, teacher_logits: Tensor, target: Tensor, *, task: str, epoch: int
    ) -> dict[str, Tensor]:
        """The loss's named terms, weighted, for one batch (``teacher_logits`` are constants)."""
        raise NotImplementedError(f"{type(self).__name__} must implement terms()")

    def __call__(
        self, logits: Tensor, teacher_logits: Tensor, target: Tensor, *, task: str, epoch: int
    ) -> dict[str, Tensor]:
        """:meth:`terms`, after checking that the loss is defined for ``task``."""
        if task not in self.tasks:
            raise ValueError(
                f"{type(self).__name__} is defined for task in {list(self.tasks)}, not {task!r}"
                + (
                    "; KDLoss (Hinton et al.) handles multi-label data"
                    if task == "multilabel"
                    else ""
                )
            )
        return self.terms(logits, teacher_logits.detach(), target, task=task, epoch=epoch)

    def options(self) -> dict[str, Any]:
        """The constructor arguments, read from the attributes of the same names."""
        options: dict[str, Any] = {}
        for cls in type(self).__mro__[:-1]:
            for param in inspect.signature(cls.__init__).parameters.values():  # type: ignore[misc]
                if param.kind is param.KEYWORD_ONLY and hasattr(self, param.name):
                    options.setdefault(param.name, getattr(self, param.name))
        return options

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({args})"


class KDLoss(LogitLoss):
    """Hinton et al. 2015: ``weight * T^2 KL(softmax(z_T / T) || softmax(z_S / T))``, logged as
    ``logit_loss``; multi-label data get one two-class softmax per label (not with
    ``standardize``). What ``logit_weight`` and ``temperature`` of every method build."""

    name = "logits"
    tasks = ("multiclass", "multilabel")

    def __init__(
        self, *, weight: float = 1.0, temperature: float = 4.0, standardize: bool = False
    ) -> None:
        super().__init__(temperature=temperature, standardize=standardize)
        self.weight = _non_negative(type(self).__name__, "weight", weight)

    def terms(
        self, logits: Tensor, teacher_logits: Tensor, target: Tensor, *, task: str, epoch: int
    ) -> dict[str, Tensor]:
        kd = logit_distillation_loss(
            logits, teacher_logits, self.temperature, task=task, standardize=self.standardize
        )
        return {LOGIT_TERM: self.weight * kd}


class DKDLoss(LogitLoss):
    """Decoupled KD (Zhao et al. 2022, eq. 8): ``w(epoch) (alpha TCKD + beta NCKD)``, each
    times ``T^2`` (:func:`~lightning_layerkd.functional.logit_losses.decoupled_kd_terms`),
    logged as ``tckd`` and ``nckd``. ``w(epoch) = min((epoch + 1) / warmup_epochs, 1)``, epochs
    counted from 0: their code's linear warm-up ``min(epoch / 20, 1)`` with epochs from 1.

    Args:
        alpha: weight of TCKD (target class vs the rest).
        beta: weight of NCKD (among the non-target classes); 8 is their CIFAR-100 default.
        temperature, standardize: see :class:`LogitLoss`.
        warmup_epochs: epochs of the linear warm-up of the weight; 0 for none.
    """

    name = "dkd"

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        warmup_epochs: int = 20,
        standardize: bool = False,
    ) -> None:
        super().__init__(temperature=temperature, standardize=standardize)
        owner = type(self).__name__
        self.alpha = _non_negative(owner, "alpha", alpha)
        self.beta = _non_negative(owner, "beta", beta)
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int):
            raise TypeError(f"{owner}: warmup_epochs must be an integer, got {warmup_epochs!r}")
        if warmup_epochs < 0:
            raise ValueError(f"{owner}: warmup_epochs must be >= 0, got {warmup_epochs}")
        self.warmup_epochs = warmup_epochs

    def warmup(self, epoch: int) -> float:
        """The weight's warm-up factor in ``epoch`` (from 0)."""
        return min((epoch + 1) / self.warmup_epochs, 1.0) if self.warmup_epochs else 1.0

    def terms(
        self, logits: Tensor, teacher_logits: Tensor, target: Tensor, *, task: str, epoch: int
    ) -> dict[str, Tensor]:
        tckd, nckd = decoupled_kd_terms(
            logits, teacher_logits, target, self.temperature, standardize=self.standardize
        )
        w = self.warmup(epoch)
        return {"tckd": w * self.alpha * tckd, "nckd": w * self.beta * nckd}


class DISTLoss(LogitLoss):
    """DIST (Huang et al. 2022): ``beta L_inter + gamma L_intra``, Pearson-correlation relations
    of the softened predictions across the classes of each sample and across the batch for each
    class, each times ``T^2``
    (:func:`~lightning_layerkd.functional.logit_losses.dist_terms`), logged as ``dist_inter``
    and ``dist_intra``. The defaults are their CIFAR-100 ones.

    Args:
        beta: weight of the inter-class relation.
        gamma: weight of the intra-class relation.
        temperature, standardize: see :class:`LogitLoss`.
    """

    name = "dist"

    def __init__(
        self,
        *,
        beta: float = 2.0,
        gamma: float = 2.0,
        temperature: float = 4.0,
        standardize: bool = False,
    ) -> None:
        super().__init__(temperature=temperature, standardize=standardize)
        owner = type(self).__name__
        self.beta = _non_negative(owner, "beta", beta)
        self.gamma = _non_negative(owner, "gamma", gamma)

    def terms(
        self, logits: Tensor, teacher_logits: Tensor, target: Tensor, *, task: str, epoch: int
    ) -> dict[str, Tensor]:
        inter, intra = dist_terms(
            logits, teacher_logits, self.temperature, standardize=self.standardize
        )
        return {"dist_inter": self.beta * inter, "dist_intra": self.gamma * intra}
