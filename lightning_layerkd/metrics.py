"""The task's loss and validation metrics: ``l_1`` of eq. 1 (Kokane et al. 2024) and the
accuracy (multi-class) or mAP and accuracy (multi-label) that the module logs."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MultilabelAccuracy,
    MultilabelAveragePrecision,
)

from lightning_layerkd._common import Task


def task_loss(logits: Tensor, target: Tensor, task: Task = "multiclass") -> Tensor:
    """``l_1`` of eq. 1: cross-entropy, or BCE with logits for multi-label 0/1 targets."""
    if task == "multiclass":
        return F.cross_entropy(logits, target)
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))


def task_metrics(task: Task, num_classes: int) -> MetricCollection:
    """``acc`` (top-1, micro) for ``"multiclass"``; ``map`` (macro) and ``acc`` (micro) over
    labels for ``"multilabel"``."""
    if task == "multiclass":
        return MetricCollection(
            {"acc": MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro")}
        )
    return MetricCollection(
        {
            "map": MultilabelAveragePrecision(num_labels=num_classes, average="macro"),
            "acc": MultilabelAccuracy(num_labels=num_classes, average="micro"),
        }
    )


class LayerMeans(nn.ModuleDict):
    """One :class:`~torchmetrics.MeanMetric` per crucial layer (the validation divergences),
    created on first use and reset by Lightning at each epoch end like any logged metric."""

    def metric(self, layer: str) -> MeanMetric:
        """The mean of ``layer`` (module paths may contain dots, which keys cannot)."""
        key = layer.replace(".", "__") or "__root__"
        if key not in self:
            self[key] = MeanMetric()
        metric = self[key]
        assert isinstance(metric, MeanMetric)
        return metric
