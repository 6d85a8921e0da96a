"""Crucial layers named by the user: layer specifications, paths and conversion convolutions.

Discovery (``layers="auto"``) is in :mod:`lightning_layerkd.layers.discovery`; the persistent hooks
that read the layers during training are in :mod:`lightning_layerkd.layers.hooks`; the optimizer
param groups the layers name are in :mod:`lightning_layerkd.param_groups`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from lightning_layerkd.layers.discovery import format_candidates, trace_feature_maps
from lightning_layerkd.param_groups import BASE_GROUP

_GATE = re.compile(r"squeeze|excit|^se(module|layer|block)?$|gate|attention", re.IGNORECASE)

#: ``"auto"``, paths present in both networks, ``(student, teacher)`` pairs or a dict.
LayerSpec = str | Sequence[str] | Sequence[tuple[str, str]] | Mapping[str, str]


def resolve_module(
    model: nn.Module, path: str, example_input: Tensor | None = None, *, role: str = "model"
) -> nn.Module:
    """Return ``model.get_submodule(path)``, or raise an error that lists the valid paths.

    Args:
        model: the network.
        path: module path as in ``named_modules()``.
        example_input: if given, the error lists candidate paths with their output shapes
            (:func:`trace_feature_maps`); otherwise it lists all module paths.
        role: how the model is named in the error, e.g. ``"teacher"``.

    Raises:
        ValueError: if ``model`` has no module at ``path``.
    """
    try:
        return model.get_submodule(path)
    except AttributeError:
        pass
    if example_input is not None:
        listing = format_candidates(trace_feature_maps(model, example_input))
        raise ValueError(
            f"{role} has no module '{path}'. Candidate paths with output shapes:\n{listing}"
        )
    listing = "\n".join(f"  {name}" for name, _ in model.named_modules() if name)
    raise ValueError(f"{role} has no module '{path}'. Candidate paths:\n{listing}")


def conversion_conv(module: nn.Module, path: str = "") -> tuple[str, nn.Conv2d]:
    """The conversion convolution of a crucial module (docs/design.md, section 3).

    That is the module's first ``nn.Conv2d`` (in ``named_modules()`` order, the module itself
    included) whose input and output channels differ, else its first ``nn.Conv2d``; convolutions
    inside a squeeze-excite or attention gate (which act on pooled features) are passed over
    while the module has others.

    Args:
        module: the crucial module.
        path: the module's own path, prefixed to the returned path.

    Returns:
        The convolution's full path and the convolution.

    Raises:
        ValueError: if the module contains no ``nn.Conv2d``.
    """
    gates = [  # squeeze-excite and attention gates act on pooled features: not conversions
        name for name, m in module.named_modules() if name and _GATE.search(type(m).__name__)
    ]
    convs = [
        (name, m)
        for name, m in module.named_modules()
        if isinstance(m, nn.Conv2d) and not any(name.startswith(g + ".") for g in gates)
    ] or [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        children = "\n".join(
            f"  {name}: {type(child).__name__}" for name, child in module.named_children()
        )
        raise ValueError(
            f"module '{path}' ({type(module).__name__}) contains no nn.Conv2d; "
            f"its children:\n{children or '  (none)'}"
        )
    name, conv = next(((n, c) for n, c in convs if c.in_channels != c.out_channels), convs[0])
    return ".".join(p for p in (path, name) if p), conv


def normalise_layers(layers: LayerSpec, allow_empty: bool = False) -> list[tuple[str, str]]:
    """``(student_path, teacher_path)`` pairs from a list of paths, of pairs, or a dict."""
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


def check_layer_pairs(
    student: nn.Module,
    teacher: nn.Module,
    pairs: Sequence[tuple[str, str]],
    example_input: Tensor | None = None,
    *,
    reserved: str = BASE_GROUP,
) -> None:
    """Check that the student paths are distinct, not nested (each parameter falls in one
    param group) and not ``reserved``, and that every path exists (errors list candidates)."""
    names = [s for s, _ in pairs]
    if len(set(names)) != len(names) or reserved in names:
        raise ValueError(
            f"student crucial layers must be distinct and not named {reserved!r}; got {names}"
        )
    for a in names:
        for b in names:
            if a != b and (a == "" or b.startswith(a + ".")):
                raise ValueError(
                    f"student crucial layers '{a}' and '{b}' are nested, so their "
                    "parameters would fall in two param groups; choose disjoint modules"
                )
    for student_path, teacher_path in pairs:
        resolve_module(student, student_path, example_input, role="student")
        resolve_module(teacher, teacher_path, example_input, role="teacher")
