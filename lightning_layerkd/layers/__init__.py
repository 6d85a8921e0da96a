"""Layer plumbing: finding crucial layers (docs/design.md section 2), naming them (layer specs
and paths) and reading their features through forward hooks. No Lightning."""

from lightning_layerkd.layers.discovery import LayerInfo, find_crucial_layers, trace_feature_maps
from lightning_layerkd.layers.hooks import CrucialLayerError, FeatureHooks
from lightning_layerkd.layers.specs import LayerSpec, normalise_layers, resolve_module

__all__ = [
    "CrucialLayerError",
    "FeatureHooks",
    "LayerInfo",
    "LayerSpec",
    "find_crucial_layers",
    "normalise_layers",
    "resolve_module",
    "trace_feature_maps",
]
