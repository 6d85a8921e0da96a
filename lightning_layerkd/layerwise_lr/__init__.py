"""Layer-wise learning rates (Kokane et al. 2024, eqs. 3, 11, 12): the Lightning callback and,
beside it, its rules as pure functions (as Lightning keeps ``lr_monitor.py`` apart from
the optimizers it reads)."""

from lightning_layerkd.layerwise_lr.callback import LayerwiseLRCallback
from lightning_layerkd.layerwise_lr.rules import paper_rate, relative_factors

__all__ = ["LayerwiseLRCallback", "paper_rate", "relative_factors"]
