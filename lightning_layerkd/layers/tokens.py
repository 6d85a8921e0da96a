"""Token models (vision transformers) for crucial-layer discovery (docs/design.md section 2):
their token layout, and the blocks whose outputs lie on the patch grid.

A timm-style vision transformer outputs ``(B, N, C)`` tokens, ``N`` = its prefix (class,
distillation, register) tokens plus the ``H x W`` patch grid; the maps read them on that grid
(:func:`lightning_layerkd.functional.maps.feature_grid`), so the grid is their spatial size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_layerkd._common import eval_mode, model_device

#: Stages a plain (isotropic) transformer is cut into when it is paired with another one: as
#: many as a ResNet has, the paper's 4 crucial layers.
TOKEN_STAGES = 4


def token_layout(model: object) -> tuple[int, int, int] | None:
    """``(prefix_tokens, H, W)`` of a timm-style vision transformer (``num_prefix_tokens`` and
    ``patch_embed.grid_size``), or ``None`` for other models."""
    prefix = getattr(model, "num_prefix_tokens", None)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if isinstance(prefix, int) and isinstance(grid, (tuple, list)) and len(grid) == 2:
        return prefix, int(grid[0]), int(grid[1])
    return None


def token_blocks(model: nn.Module, example_input: Tensor) -> tuple[tuple[int, int], list[str]]:
    """The patch grid ``(H, W)`` of a token model and its transformer blocks in forward order:
    the children of a sequence (``nn.Sequential`` or ``nn.ModuleList``) whose outputs are
    ``(B, N, C)`` tokens on the grid, of the sequence with the most of them (timm's
    ``blocks``). ``((), [])`` for a model without a token layout or without such blocks.

    One forward pass of the first two samples under ``torch.no_grad()`` in eval mode, as
    :func:`~lightning_layerkd.layers.discovery.trace_feature_maps` does."""
    layout = token_layout(model)
    if layout is None:
        return (), []  # type: ignore[return-value]
    prefix, height, width = layout
    tokens = prefix + height * width
    found: dict[str, list[tuple[int, str]]] = {}

    def hook(parent: str, path: str) -> Callable[..., None]:
        def record(module: nn.Module, args: object, output: object) -> None:
            if isinstance(output, Tensor) and output.dim() == 3 and output.shape[1] == tokens:
                seen = found.setdefault(parent, [])
                if path not in (p for _, p in seen):
                    seen.append((len(seen), path))

        return record

    handles = []
    x = example_input[:2]
    device = model_device(model)
    if device is not None:
        x = x.to(device)
    try:
        for parent, container in model.named_modules():
            if isinstance(container, (nn.Sequential, nn.ModuleList)):
                for name, child in container.named_children():
                    path = f"{parent}.{name}" if parent else name
                    handles.append(child.register_forward_hook(hook(parent, path)))
        with eval_mode(model), torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    if not found:
        return (height, width), []
    blocks = max(found.values(), key=len)
    return (height, width), [path for _, path in sorted(blocks)]


def stage_end(blocks: list[str], stage: int, stages: int) -> str:
    """The last block of stage ``stage`` (from 0) of ``stages`` stages of equal depth: block
    ``ceil((stage + 1) * D / stages) - 1`` of ``D`` blocks (12 blocks, 4 stages: 2, 5, 8, 11)."""
    return blocks[math.ceil((stage + 1) * len(blocks) / stages) - 1]


def stage_ends(blocks: list[str], stages: int = TOKEN_STAGES) -> list[str]:
    """The last block of each of ``stages`` stages of equal depth, without repeats (fewer
    when there are fewer blocks); the last stage ends with the last block."""
    return list(dict.fromkeys(stage_end(blocks, k, stages) for k in range(stages)))
