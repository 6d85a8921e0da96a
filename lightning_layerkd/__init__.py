"""lightning-layerkd: knowledge distillation with layer-wise learning rates for PyTorch Lightning.

Implements Kokane, Uddin & Xu (2024), "Improving Knowledge Distillation in Transfer Learning with
Layer-wise Learning Rates": per-crucial-layer attention, Jacobian and Hessian map losses
(:class:`DistillationModule`) and the layer-wise learning-rate rule (:class:`LayerwiseLRCallback`).
The package's layers are drawn in docs/architecture.md.
"""

from lightning_layerkd.layers import find_crucial_layers
from lightning_layerkd.layerwise_lr import LayerwiseLRCallback
from lightning_layerkd.module import DistillationModule

__all__ = ["DistillationModule", "LayerwiseLRCallback", "find_crucial_layers"]
__version__ = "0.1.0"
