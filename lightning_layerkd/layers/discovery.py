"""Crucial-layer discovery (``layers="auto"``, docs/design.md section 2): one traced forward pass
and the rule that picks, per output size, the module whose features a map compares.

Works on plain ``nn.Module``s: the trace uses temporary hooks on a two-sample slice of the
example batch; no model is rewritten and no module needs a special forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from lightning_layerkd._common import eval_mode, model_device
from lightning_layerkd.layers.tokens import TOKEN_STAGES, stage_end, stage_ends, token_blocks

Spatial = tuple[int, ...]


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
        finish: position at which the module finished its forward (post-hook order).
        num_convs: how many convolutions the module is or contains.
        modified_in_place: its output was modified in place later in the forward pass.
    """

    path: str
    shape: tuple[int, ...]
    depth: int
    order: int
    has_params: bool
    is_leaf: bool
    has_conv: bool
    finish: int = -1
    num_convs: int = 0
    modified_in_place: bool = False

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


def trace_feature_maps(model: nn.Module, example_input: Tensor) -> list[LayerInfo]:
    """Run one forward pass and record every submodule that outputs a 4-D tensor.

    The model runs once on (at most) the first two samples of ``example_input``, under
    ``torch.no_grad()`` in eval mode (batch-norm running statistics are untouched); every
    module's train/eval flag is restored afterwards, and all temporary hooks are removed even if
    the forward fails. Only the first call of a module that is called several times (e.g. a
    shared ``ReLU``) is recorded. The input is moved to the model's device.

    Args:
        model: any ``nn.Module``; the root itself is not recorded.
        example_input: one batch, e.g. of shape ``(N, C, H, W)``.

    Returns:
        The records, sorted by the order in which the modules started their forward.
    """
    _check_input(example_input)
    example_input = example_input[:2]
    device = model_device(model)
    if device is not None:
        example_input = example_input.to(device)

    started: dict[str, int] = {}
    records: dict[str, LayerInfo] = {}
    outputs: dict[str, tuple[Tensor, int]] = {}
    finished: list[str] = []

    def pre_hook(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: object) -> None:
            started.setdefault(path, len(started))

        return hook

    def post_hook(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: object, output: object) -> None:
            if path in finished:
                return
            finished.append(path)
            if isinstance(output, Tensor) and output.dim() == 4:
                outputs[path] = (output, output._version)
                convs = sum(isinstance(m, _ConvNd) for m in module.modules())
                records[path] = LayerInfo(
                    path=path,
                    shape=tuple(output.shape),
                    depth=path.count(".") + 1,
                    order=started[path],
                    has_params=any(True for _ in module.parameters()),
                    is_leaf=not any(True for _ in module.children()),
                    has_conv=convs > 0,
                    finish=len(finished) - 1,
                    num_convs=convs,
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
    for path, (output, version) in outputs.items():
        if output._version != version:  # e.g. an nn.ReLU(inplace=True) or a functional relu_
            records[path] = replace(records[path], modified_in_place=True)
    return sorted(records.values(), key=lambda info: info.order)


def format_candidates(infos: list[LayerInfo]) -> str:
    """One line per record, ``"  path  shape"``, for error messages."""
    return "\n".join(f"  {info.path}  {info.shape}" for info in infos)


def _group_by_spatial(infos: list[LayerInfo]) -> dict[Spatial, list[LayerInfo]]:
    groups: dict[Spatial, list[LayerInfo]] = {}
    for info in infos:
        groups.setdefault(info.spatial, []).append(info)
    return groups


def _pooled(spatial: Spatial) -> bool:
    return all(s == 1 for s in spatial)


def _exclusions(infos: list[LayerInfo]) -> dict[str, str]:
    """Modules that cannot be a group's crucial module, with the reason: a container whose
    convolutions span more than two output sizes (a whole network or trunk, e.g. ``features``),
    a module inside a block that outputs another size (the first convolution of a strided
    block), and a module whose output is modified in place later in the forward pass."""
    sizes: dict[str, set[Spatial]] = {}
    for info in infos:  # sizes of convolution outputs only (a channels-last (B, H, W, C)
        if info.has_conv and not _pooled(info.spatial):  # norm output is not a size)
            parts = info.path.split(".")
            for k in range(1, len(parts) + 1):
                sizes.setdefault(".".join(parts[:k]), set()).add(info.spatial)
    by_path = {info.path: info for info in infos}
    spanning = {path for path, seen in sizes.items() if len(seen) > 2}
    why: dict[str, str] = {}
    for info in infos:
        if info.path in spanning:
            why[info.path] = f"spans {len(sizes[info.path])} output sizes"
        elif info.modified_in_place:
            why[info.path] = "its output is modified in place later"
        else:
            parts = info.path.split(".")
            for k in range(len(parts) - 1, 0, -1):
                ancestor = by_path.get(".".join(parts[:k]))
                if ancestor is None or ancestor.path in spanning:
                    continue
                if ancestor.spatial != info.spatial and not _pooled(ancestor.spatial):
                    why[info.path] = f"inside '{ancestor.path}', which outputs another size"
                    break
    return why


def _candidates(group: list[LayerInfo], excluded: dict[str, str]) -> list[LayerInfo]:
    """Records of a group that contain a convolution and are not excluded."""
    return [info for info in group if info.has_conv and info.path not in excluded]


def _rank(info: LayerInfo) -> tuple[bool, int]:
    """Blocks (two or more convolutions) before single convolutions, then the last to finish:
    the module whose output is the group's final feature map."""
    return (info.num_convs >= 2, info.finish)


def _crucial_per_group(infos: list[LayerInfo]) -> dict[Spatial, LayerInfo]:
    """Steps 1-5 of the rule in :func:`find_crucial_layers`: spatial size -> crucial record, in
    the order the crucial modules finish (the data flow)."""
    excluded = _exclusions(infos)
    crucial: dict[Spatial, LayerInfo] = {}
    for spatial, group in _group_by_spatial(infos).items():
        candidates = _candidates(group, excluded)
        if not _pooled(spatial) and candidates:
            crucial[spatial] = max(candidates, key=_rank)
    crucial = dict(sorted(crucial.items(), key=lambda item: item[1].finish))
    first = next(iter(crucial), None)
    if first is not None and crucial[first].num_convs == 1:
        del crucial[first]  # the stem: a single convolution block before the first stage
    return crucial


def _size(spatial: Spatial) -> str:
    return "x".join(map(str, spatial)) or "()"


def _describe(role: str, infos: list[LayerInfo], grid: Spatial = (), blocks: Any = ()) -> str:
    crucial = _crucial_per_group(infos)
    excluded = _exclusions(infos)
    lines = [f"{role}: groups by output spatial size (crucial module, or why dropped):"]
    if blocks:
        lines.append(f"  {_size(grid)}: {blocks[-1]} (transformer blocks on the patch grid)")
    for spatial, group in _group_by_spatial(infos).items():
        if spatial in crucial:
            why = crucial[spatial].path
        elif _pooled(spatial):
            why = "dropped: 1x1 (global pooling)"
        elif not _candidates(group, excluded):
            left_out = [f"{i.path} ({excluded[i.path]})" for i in group if i.path in excluded]
            why = "dropped: no module containing a convolution" + (
                f"; left out: {', '.join(left_out[:4])}" if left_out else ""
            )
        else:
            why = "dropped: stem"
        lines.append(f"  {_size(spatial)}: {why}")
    lines.append(f"{role} candidate modules with output shapes:")
    groups = _group_by_spatial(infos).values()
    lines.append(format_candidates([c for group in groups for c in _candidates(group, excluded)]))
    return "\n".join(lines)


def find_crucial_layers(
    teacher: nn.Module, student: nn.Module, example_input: Tensor, num_layers: int | None = 4
) -> list[tuple[str, str]]:
    """Find the crucial layer pairs of a teacher and a student CNN (``layers="auto"``).

    Kokane et al. (2024, section 4.1) compute their maps only at "the crucial conversion layers of
    the ResNet where we observe a dimensional change in the feature channels", 4 of them. For any
    pair of CNNs this is made concrete as in docs/design.md, section 2. For each network:

    1. trace one forward pass (:func:`trace_feature_maps`) and group the modules with a 4-D output
       by output spatial size ``(H, W)``;
    2. drop 1x1 groups (global pooling, where an attention map is degenerate);
    3. leave out containers whose descendants span more than two sizes (``features``,
       ``stages``, ``blocks``: a trunk, not a stage), modules inside a block that outputs another
       size (a strided bottleneck's first convolution) and modules whose output is modified in
       place later (their features would change after the hook read them);
    4. a group's crucial module is, among the remaining modules containing a convolution, a
       block (two or more convolutions) if there is one, and the last to finish its forward:
       the module whose output is the group's final feature map; groups follow the data flow;
    5. drop the stem: if the first group's crucial module holds a single convolution (the
       stride-2 ``conv1`` of an ImageNet ResNet, a ``ConvNormAct`` stem), drop that group. A
       block there (a CIFAR ResNet's ``layer1``, which shares its spatial size with the stem)
       is kept.

    Teacher and student groups of equal spatial size are then paired, in the student's forward
    order, and the deepest ``num_layers`` pairs are kept. A vision transformer's spatial size
    is its patch grid and its crucial modules are blocks picked by depth
    (:mod:`lightning_layerkd.layers.tokens`): two transformers pair the last blocks of 4 stages
    of equal depth; a transformer and a CNN pair at the grid, the CNN's ``k``-th of ``n``
    crucial layers with the end of the transformer's ``k``-th of ``n`` stages. For
    torchvision-style ResNets (and :mod:`lightning_layerkd.models`) of equal stems this gives
    ``layer1``..``layer4``; the pairs found on timm and torchvision families are in
    ``tests/layers/test_discovery.py``.

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
    (t_grid, t_blocks), (s_grid, s_blocks) = (
        token_blocks(teacher, example_input),
        token_blocks(student, example_input),
    )
    if t_blocks and s_blocks:  # two transformers: stage by stage, on one patch grid
        stages = min(TOKEN_STAGES, len(t_blocks), len(s_blocks))
        ends = zip(stage_ends(s_blocks, stages), stage_ends(t_blocks, stages), strict=True)
        pairs = list(ends) if s_grid == t_grid else []
    else:  # by spatial size; a transformer's is its patch grid, its block there at the depth
        # fraction of the CNN's layer of that size: the end of the same stage (k-th of n)
        t_crucial = {size: info.path for size, info in _crucial_per_group(t_infos).items()}
        s_crucial = {size: info.path for size, info in _crucial_per_group(s_infos).items()}
        for crucial, grid, blocks, other in (
            (t_crucial, t_grid, t_blocks, s_crucial),
            (s_crucial, s_grid, s_blocks, t_crucial),
        ):
            if blocks and grid in other:
                stage, stages = list(other).index(grid), len(other)
                crucial.pop(grid, None)  # a 4-D module at the grid's size: the patch embedding
                crucial[grid] = stage_end(blocks, stage, stages)
        pairs = [(path, t_crucial[size]) for size, path in s_crucial.items() if size in t_crucial]
    if not pairs:
        raise ValueError(
            "no teacher and student crucial layers share an output spatial size for input of "
            f"shape {tuple(example_input.shape)}; pass explicit (student_path, teacher_path) "
            "pairs instead.\n"
            + _describe("student", s_infos, s_grid, s_blocks)
            + "\n"
            + _describe("teacher", t_infos, t_grid, t_blocks)
        )
    return pairs if num_layers is None else pairs[-num_layers:]
