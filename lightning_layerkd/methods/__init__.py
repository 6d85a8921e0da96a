"""Distillation methods: one class per method behind one contract
(:class:`DistillationMethod`), found by name in a registry (:func:`register_method`).

========================  ==============================  =========================================
name                      class                           paper
========================  ==============================  =========================================
``"attention"``           :class:`AttentionMaps`          Kokane et al. 2024, eq. 2
``"jacobian"``            :class:`JacobianMaps`           Kokane et al. 2024, eq. 4
``"hessian"``             :class:`HessianMaps`            Kokane et al. 2024, eq. 6
``"jacobian_matching"``   :class:`JacobianMatching`       Srinivas & Fleuret 2018, eq. 10
``"information_flow"``    :class:`InformationFlow`        Passalis et al. 2020, eqs. 7, 9, 10
``"fitnet"``              :class:`FitNet`                 Romero et al. 2015, eq. 3
``"attention_transfer"``  :class:`AttentionTransfer`      Zagoruyko & Komodakis 2017, eq. 2
``"crd"``                 :class:`CRD`                    Tian et al. 2020, eqs. 18-19
``"review_kd"``           :class:`ReviewKD`               Chen et al. 2021, ABF and HCL
``"logits"``              :class:`LogitDistillation`      Hinton et al. 2015
``"dkd"``                 :class:`DecoupledKD`            Zhao et al. 2022, eqs. 1-8
``"dist"``                :class:`DIST`                   Huang et al. 2022
``"none"``                :class:`StudentOnly`            the student alone
========================  ==============================  =========================================

Every method adds a logit loss to its own terms with ``logit_loss``: :class:`KDLoss` (Hinton et
al.; also what ``logit_weight`` builds), :class:`DKDLoss` or :class:`DISTLoss`, each with
``standardize`` (logit standardization, Sun et al. 2024).
"""

# The registration order, which method lists and reports follow, is the table's.
# isort: off
from lightning_layerkd.methods.base import (
    DistillationMethod,
    MethodOutput,
    Networks,
    build_method,
    method_class,
    method_names,
    register_method,
)
from lightning_layerkd.methods.parts import LearntParts
from lightning_layerkd.methods.maps import AttentionMaps, HessianMaps, JacobianMaps, MapMethod
from lightning_layerkd.methods.jacobian_matching import JacobianMatching
from lightning_layerkd.methods.information_flow import InformationFlow
from lightning_layerkd.methods.features import FeatureMethod
from lightning_layerkd.methods.fitnet import FitNet
from lightning_layerkd.methods.attention_transfer import AttentionTransfer
from lightning_layerkd.methods.crd import CRD
from lightning_layerkd.methods.review_kd import ReviewKD
from lightning_layerkd.methods.logit_losses import DISTLoss, DKDLoss, KDLoss, LogitLoss
from lightning_layerkd.methods.logits import (
    DIST,
    DecoupledKD,
    LogitDistillation,
    OutputMethod,
    StudentOnly,
)

# isort: on

__all__ = [
    "DIST",
    "AttentionMaps",
    "AttentionTransfer",
    "CRD",
    "DISTLoss",
    "DKDLoss",
    "DecoupledKD",
    "DistillationMethod",
    "FeatureMethod",
    "FitNet",
    "HessianMaps",
    "InformationFlow",
    "JacobianMaps",
    "JacobianMatching",
    "KDLoss",
    "LearntParts",
    "LogitDistillation",
    "LogitLoss",
    "MapMethod",
    "MethodOutput",
    "ReviewKD",
    "Networks",
    "OutputMethod",
    "StudentOnly",
    "build_method",
    "method_class",
    "method_names",
    "register_method",
]
