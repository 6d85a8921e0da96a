"""Crucial layers: discovery (docs/design.md section 2), paths, and layer specifications.

Everything here works on plain ``nn.Module``s: discovery runs one example batch with temporary
hooks; no model is rewritten and no module needs a special forward. The persistent hooks that
read the layers during training are in :mod:`lightning_layerkd.hooks`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

__all__ = [
    "LayerInfo",
    "LayerSpec",
    "check_layer_pairs",
    "normalise_layers",
    "conversion_conv",
    "find_crucial_layers",
    "format_candidates",
    "resolve_module",
    "trace_feature_maps",
]

Spatial = tuple[int, ...]
#: ``"auto"``, paths present in both networks, ``(student, teacher)`` pairs or a dict.
LayerSpec = str | Sequence[str] | Sequence[tuple[str, str]] | Mapping[str, str]


@dataclass(frozen=True)
class LayerInfo:
    """One module whose output is a 4-D feature map, as seen by :func:`trace_feature_maps`.

    Attributes:
        path: module path as in ``named_modules()``.
        shape: shape of the module's output, batch dimension included.
        depth: nesting level, ``path.count(".") + 1``.
        order: position at which the module started its forward (pre-hook order).
        has_params: the module holds parameters (recursively).
        is_leaf: the module has no child modules.
        has_conv: the module is or contains a convolution.
    """

    path: str
    shape: tuple[int, ...]
    depth: int
    order: int
    has_params: bool
    is_leaf: bool
    has_conv: bool

    @property
    def spatial(self) -> Spatial:
        """The spatial part of the output shape, ``shape[2:]``."""
        return self.shape[2:]


def _check_input(example_input: object, ndim: int | None = None) -> None:
    """Raise unless ``example_input`` is a batched tensor (with exactly ``ndim`` dims if given)."""
    ok = isinstance(example_input, Tensor) and (
        example_input.dim() == ndim if ndim else example_input.dim() >= 2
    )
    if not ok:
        seen = (
            f"a tensor of shape {tuple(example_input.shape)}"
            if isinstance(example_input, Tensor)
            else type(example_input).__name__
        )
        want = "(N, C, H, W)" if ndim == 4 else "e.g. (N, C, H, W)"
        raise ValueError(
            f"example_input must be a tensor with a batch dimension, {want}; got {seen}"
        )


def _model_device(model: nn.Module) -> torch.device | None:
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return None if tensor is None else tensor.device


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, restoring each module's own flag on exit."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def trace_feature_maps(model: nn.Module, example_input: Tensor) -> list[LayerInfo]:
    """Run one forward pass and record every submodule that outputs a 4-D tensor.

    The model runs once under ``torch.no_grad()`` in eval mode (so batch-norm running statistics
    are untouched); every module's train/eval flag is restored afterwards, and all temporary hooks
    are removed even if the forward fails. Only the first call of a module that is called several
    times (e.g. a shared ``ReLU``) is recorded. The input is moved to the model's device.

    Args:
        model: any ``nn.Module``; the root itself is not recorded.
        example_input: one batch, e.g. of shape ``(N, C, H, W)``.

    Returns:
        The records, sorted by the order in which the modules started their forward.
    """
    _check_input(example_input)
    device = _model_device(model)
    if device is not None:
        example_input = example_input.to(device)

    started: dict[str, int] = {}
    records: dict[str, LayerInfo] = {}
    finished: set[str] = set()

    def pre_hook(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: object) -> None:
            started.setdefault(path, len(started))

        return hook

    def post_hook(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: object, output: object) -> None:
            if path in finished:
                return
            finished.add(path)
            if isinstance(output, Tensor) and output.dim() == 4:
                records[path] = LayerInfo(
                    path=path,
                    shape=tuple(output.shape),
                    depth=path.count(".") + 1,
                    order=started[path],
                    has_params=any(True for _ in module.parameters()),
                    is_leaf=not any(True for _ in module.children()),
                    has_conv=any(isinstance(m, _ConvNd) for m in module.modules()),
                )

        return hook

    handles = []
    try:
        for path, module in model.named_modules():
            if path:
                handles.append(module.register_forward_pre_hook(pre_hook(path)))
                handles.append(module.register_forward_hook(post_hook(path)))
        with eval_mode(model), torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return sorted(records.values(), key=lambda info: info.order)


def format_candidates(infos: list[LayerInfo]) -> str:
    """One line per record, ``"  path  shape"``, for error messages."""
    return "\n".join(f"  {info.path}  {info.shape}" for info in infos)


def _group_by_spatial(infos: list[LayerInfo]) -> dict[Spatial, list[LayerInfo]]:
    groups: dict[Spatial, list[LayerInfo]] = {}
    for info in infos:
        groups.setdefault(info.spatial, []).append(info)
    return groups


def _candidates(group: list[LayerInfo]) -> list[LayerInfo]:
    """Records of a group that contain a convolution, at the shallowest depth among them."""
    convs = [info for info in group if info.has_conv]
    if not convs:
        return []
    shallowest = min(info.depth for info in convs)
    return [info for info in convs if info.depth == shallowest]


def _crucial_per_group(infos: list[LayerInfo]) -> dict[Spatial, LayerInfo]:
    """Steps 1-4 of the rule in :func:`find_crucial_layers`: spatial size -> crucial record."""
    crucial: dict[Spatial, LayerInfo] = {}
    for spatial, group in _group_by_spatial(infos).items():
        candidates = _candidates(group)
        if all(s == 1 for s in spatial) or not candidates:
            continue
        crucial[spatial] = max(candidates, key=lambda info: info.order)
    first = next(iter(crucial), None)
    if first is not None and crucial[first].is_leaf:
        del crucial[first]
    return crucial


def _size(spatial: Spatial) -> str:
    return "x".join(map(str, spatial)) or "()"


def _describe(role: str, infos: list[LayerInfo]) -> str:
    crucial = _crucial_per_group(infos)
    lines = [f"{role}: groups by output spatial size (crucial module, or why dropped):"]
    for spatial, group in _group_by_spatial(infos).items():
        if spatial in crucial:
            why = crucial[spatial].path
        elif all(s == 1 for s in spatial):
            why = "dropped: 1x1 (global pooling)"
        elif not _candidates(group):
            why = "dropped: no module containing a convolution"
        else:
            why = "dropped: stem"
        lines.append(f"  {_size(spatial)}: {why}")
    lines.append(f"{role} candidate modules with output shapes:")
    lines.append(
        format_candidates(
            [c for group in _group_by_spatial(infos).values() for c in _candidates(group)]
        )
    )
    return "\n".join(lines)


def find_crucial_layers(
    teacher: nn.Module, student: nn.Module, example_input: Tensor, num_layers: int | None = 4
) -> list[tuple[str, str]]:
    """Find the crucial layer pairs of a teacher and a student CNN (``layers="auto"``).

    Kokane et al. (2024, section 4.1) compute their maps only at "the crucial conversion layers of
    the ResNet where we observe a dimensional change in the feature channels", 4 of them. For any
    pair of CNNs this is made concrete as in docs/design.md, section 2. For each network:

    1. trace one forward pass (:func:`trace_feature_maps`) and group the modules with a 4-D output
       by output spatial size ``(H, W)``, groups in order of first appearance;
    2. drop 1x1 groups (global pooling, where an attention map is degenerate);
    3. a group's crucial module is the last (in forward order) of the modules containing a
       convolution at the shallowest depth among those; a group with no such module is dropped;
    4. drop the stem: if the first remaining group's crucial module is a leaf (e.g. the stride-2
       ``conv1`` of an ImageNet ResNet), drop that group. A block there (a CIFAR ResNet's
       ``layer1``, which shares its spatial size with the stem) is kept.

    Teacher and student groups of equal spatial size are then paired, in the student's forward
    order, and the deepest ``num_layers`` pairs are kept. For torchvision-style ResNets (and
    :mod:`lightning_layerkd.models`) of equal stems this gives ``layer1``..``layer4``.

    Args:
        teacher: the teacher network.
        student: the student network.
        example_input: one batch of shape ``(N, C, H, W)`` accepted by both networks.
        num_layers: how many pairs to keep at most (the deepest ones); ``None`` keeps all.

    Returns:
        ``(student_path, teacher_path)`` pairs, shallow to deep.

    Raises:
        ValueError: if ``example_input`` is not 4-D, ``num_layers < 1``, or no teacher
            and student groups share a spatial size (the message lists what was seen).
    """
    _check_input(example_input, ndim=4)
    if num_layers is not None and num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    t_infos = trace_feature_maps(teacher, example_input)
    s_infos = trace_feature_maps(student, example_input)
    t_crucial = _crucial_per_group(t_infos)
    pairs = [
        (info.path, t_crucial[spatial].path)
        for spatial, info in _crucial_per_group(s_infos).items()
        if spatial in t_crucial
    ]
    if not pairs:
        raise ValueError(
            "no teacher and student crucial layers share an output spatial size for input of "
            f"shape {tuple(example_input.shape)}; pass explicit (student_path, teacher_path) "
            "pairs instead.\n"
            + _describe("student", s_infos)
            + "\n"
            + _describe("teacher", t_infos)
        )
    return pairs if num_layers is None else pairs[-num_layers:]


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
    included) whose input and output channels differ, else its first ``nn.Conv2d``.

    Args:
        module: the crucial module.
        path: the module's own path, prefixed to the returned path.

    Returns:
        The convolution's full path and the convolution.

    Raises:
        ValueError: if the module contains no ``nn.Conv2d``.
    """
    convs = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Conv2d)]
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
    reserved: str = "base",
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
