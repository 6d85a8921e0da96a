"""Stateless paper maths, no Lightning: maps, divergences, derivative maps, Jacobian matching,
information flow and layer matching. The method classes in :mod:`lightning_layerkd.methods` are
built on these functions, as torchmetrics' classes are on its ``functional`` package.

==================================  ===========================================================
function                            paper
==================================  ===========================================================
:func:`attention_map`               Kokane et al. 2024, eq. 2
:func:`jacobian_map`                Kokane et al. 2024, eqs. 4-5
:func:`hessian_map`                 Kokane et al. 2024, eqs. 6-7 (Hutchinson's estimator)
:func:`js_divergence`               Kokane et al. 2024, eqs. 8-10
:func:`logit_distillation_loss`     Hinton et al. 2015 (``standardize``: Sun et al. 2024)
:func:`decoupled_kd_terms`          Zhao et al. 2022 (DKD), eqs. 1-7; :func:`dkd_loss` eq. 8
:func:`dist_terms`                  Huang et al. 2022 (DIST); :func:`dist_loss`
:func:`standardize_logits`          Sun et al. 2024 (logit standardization)
:func:`jacobian_matching_loss`      Srinivas & Fleuret 2018, eq. 10
:func:`pkt_loss`                    Passalis et al. 2020, eqs. 4-8
:func:`multi_layer_pkt_loss`        Passalis et al. 2020, eq. 9
:func:`critical_period_weights`     Passalis et al. 2020, eq. 10
==================================  ===========================================================
"""

from lightning_layerkd._common import TASKS, Task
from lightning_layerkd.functional.derivatives import compute_maps, hessian_map, jacobian_map
from lightning_layerkd.functional.divergence import (
    js_divergence,
    kl_divergence,
    logit_distillation_loss,
    map_js_divergences,
)
from lightning_layerkd.functional.information_flow import (
    critical_period_weights,
    multi_layer_pkt_loss,
    pkt_loss,
)
from lightning_layerkd.functional.jacobian_matching import (
    input_jacobian,
    jacobian_matching_loss,
)
from lightning_layerkd.functional.layer_matching import match_layers
from lightning_layerkd.functional.logit_losses import (
    decoupled_kd_terms,
    dist_loss,
    dist_terms,
    dkd_loss,
    pearson_distance,
    standardize_logits,
)
from lightning_layerkd.functional.maps import (
    attention_map,
    match_maps,
    to_distribution,
)

__all__ = [
    "TASKS",
    "Task",
    "attention_map",
    "compute_maps",
    "critical_period_weights",
    "decoupled_kd_terms",
    "dist_loss",
    "dist_terms",
    "dkd_loss",
    "hessian_map",
    "input_jacobian",
    "jacobian_map",
    "jacobian_matching_loss",
    "js_divergence",
    "kl_divergence",
    "logit_distillation_loss",
    "map_js_divergences",
    "match_layers",
    "match_maps",
    "multi_layer_pkt_loss",
    "pearson_distance",
    "pkt_loss",
    "standardize_logits",
    "to_distribution",
]
