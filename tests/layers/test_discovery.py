"""Crucial layers on the model families users have (timm and torchvision, random weights,
64x64 inputs): the pairs ``layers="auto"`` finds, a distillation step through them, token
models on their patch grid, and maps that are all zeros at the start."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

from lightning_layerkd import DistillationModule, find_crucial_layers
from lightning_layerkd.functional.maps import feature_grid
from lightning_layerkd.layers.specs import conversion_conv
from lightning_layerkd.methods import HessianMaps, JacobianMaps, JacobianMatching

timm = pytest.importorskip("timm")  # the timm rows need the test extra

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([1, 7])
RESNET = [(f"layer{k}", f"layer{k}") for k in (1, 2, 3, 4)]


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name.startswith("tv_"):
        return getattr(torchvision.models, name[3:])(weights=None, num_classes=10)
    kwargs = {"img_size": 64} if "vit" in name or "deit" in name else {}
    return timm.create_model(name, num_classes=10, **kwargs)


#: teacher, student and the (student, teacher) pairs that make sense for them
FAMILIES = {
    "resnet50->resnet18": ("resnet50", "resnet18", RESNET),
    "regnety_016->resnet18": (
        "regnety_016",
        "resnet18",
        [("layer1", "s1"), ("layer2", "s2"), ("layer3", "s3"), ("layer4", "s4")],
    ),
    "convnext_tiny->resnet18": (
        "convnext_tiny",
        "resnet18",
        [(f"layer{k + 1}", f"stages.{k}") for k in range(4)],  # not stem, not the whole trunk
    ),
    "mobilenet_v2->resnet18": (
        "tv_mobilenet_v2",
        "tv_resnet18",
        [
            ("layer1", "features.3"),  # the last inverted residual at each size,
            ("layer2", "features.6"),  # not the container `features`
            ("layer3", "features.13"),
            ("layer4", "features.17"),  # not features.18, a single 1x1 convolution
        ],
    ),
    "densenet121->resnet18": (
        "tv_densenet121",
        "tv_resnet18",
        [(f"layer{k}", f"features.denseblock{k}") for k in (1, 2, 3, 4)],
    ),
    "efficientnet_b0->mobilenetv3_small_100": (
        "efficientnet_b0",
        "mobilenetv3_small_100",
        [
            ("blocks.0", "blocks.1"),  # 16x16
            ("blocks.1", "blocks.2"),  # 8x8
            ("blocks.3", "blocks.4"),  # 4x4: the last block of the size
            ("blocks.4", "blocks.6"),  # 2x2: not conv_head
        ],
    ),
    # transformers: tokens on their 4x4 patch grid; two are paired stage by stage (the last
    # block of each quarter of the depth); resnet18's layer3, its 3rd of 4 crucial layers and
    # the one at the grid's size, with the end of the 3rd quarter (not the last block, whose
    # patch tokens feed no output: ViT's head reads the class token)
    "deit_tiny->vit_tiny": (
        "deit_tiny_patch16_224",
        "vit_tiny_patch16_224",
        [(f"blocks.{k}", f"blocks.{k}") for k in (2, 5, 8, 11)],
    ),
    "vit_tiny->resnet18": ("vit_tiny_patch16_224", "resnet18", [("layer3", "blocks.8")]),
    "resnet50->vit_tiny": ("resnet50", "vit_tiny_patch16_224", [("blocks.8", "layer3")]),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_auto_layers_on_model_families(family: str) -> None:
    teacher_name, student_name, expected = FAMILIES[family]
    pairs = find_crucial_layers(build(teacher_name), build(student_name), X)
    assert pairs == expected


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_distillation_step_through_the_found_layers(family: str) -> None:
    """Attention, Jacobian and Hessian maps train the student through the found layers
    (densenet121's `features` was modified in place after its hook read it; MobileNetV3's
    hardsigmoid had no double backward)."""
    teacher_name, student_name, expected = FAMILIES[family]
    for method in ["attention", JacobianMaps(), HessianMaps()]:
        student = build(student_name)
        module = DistillationModule(
            build(teacher_name), student, method=method, num_classes=10, example_input=X
        )
        out = module.training_step((X, Y), 0)
        out["loss"].backward()
        assert torch.isfinite(out["loss"])
        assert set(out["layer_divergence"]) <= {s for s, _ in expected}
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


@pytest.mark.slow
def test_weight_maps_and_the_jacobian_norm_penalty_on_mobilenetv3() -> None:
    """Weight maps hook each block's conversion convolution, not the squeeze-excite's (whose
    output an in-place ReLU overwrites); Prop. 2's penalty differentiates through hardsigmoid."""
    teacher_name, student_name, expected = FAMILIES["efficientnet_b0->mobilenetv3_small_100"]
    for method in (JacobianMaps(wrt="weight"), JacobianMatching(norm_penalty_weight=0.1)):
        module = DistillationModule(
            build(teacher_name), build(student_name), method=method, layers=expected,
            num_classes=10,
        )  # fmt: skip
        out = module.training_step((X, Y), 0)
        out["loss"].backward()
        assert torch.isfinite(out["loss"])
    assert conversion_conv(build(student_name).blocks[0], "blocks.0")[0] == "blocks.0.0.conv_dw"


def test_transformer_stages_end_at_equal_depth_fractions() -> None:
    from lightning_layerkd.layers.tokens import stage_end, stage_ends, token_blocks

    blocks = [f"blocks.{k}" for k in range(12)]
    assert stage_ends(blocks) == ["blocks.2", "blocks.5", "blocks.8", "blocks.11"]
    assert stage_ends(blocks[:6]) == ["blocks.1", "blocks.2", "blocks.4", "blocks.5"]
    assert stage_ends(blocks[:2]) == ["blocks.0", "blocks.1"]
    assert stage_ends(blocks, stages=2) == ["blocks.5", "blocks.11"]
    assert stage_end(blocks, 2, 4) == "blocks.8" and stage_end(blocks[:3], 0, 4) == "blocks.0"
    grid, found = token_blocks(build("deit_tiny_patch16_224"), X)
    assert grid == (4, 4) and found == blocks  # not patch_embed, attn, mlp or norm
    assert token_blocks(build("resnet18"), X) == ((), [])


def test_tokens_are_read_on_their_patch_grid() -> None:
    tokens = torch.arange(2 * 17 * 3, dtype=torch.float32).reshape(2, 17, 3)  # cls + 4x4
    grid = feature_grid(tokens, "blocks.0")
    assert grid.shape == (2, 3, 4, 4)
    torch.testing.assert_close(grid[1, 2, 0, 1], tokens[1, 1 + 1, 2])  # token 1 of the grid
    rect = torch.randn(2, 1 + 2 * 3, 5)  # a 2x3 grid after one class token: by the model's layout
    assert feature_grid(rect, "blocks.0", layout=(1, 2, 3)).shape == (2, 5, 2, 3)
    with pytest.raises(ValueError, match=r"layer 'blocks.3' outputs \(2, 99, 3\).*patch grid"):
        feature_grid(torch.zeros(2, 99, 3), "blocks.3")  # 81 + 18 tokens: no grid fits
    with pytest.raises(ValueError, match=r"layer 'head' outputs \(2, 10\)"):
        feature_grid(torch.zeros(2, 10), "head")


@pytest.mark.parametrize("method", ["attention", "jacobian", "hessian"])
def test_vit_teacher_and_student_maps_on_the_patch_grid(method: str) -> None:
    """deit_tiny -> vit_tiny and vit_tiny -> resnet18 with explicit pairs: the maps are per
    patch (16 entries for a 4x4 grid, not one number per sample), Hessian maps run through
    the attention (the fused kernels have no forward-mode AD), and the loss trains the
    student."""
    cases = [
        ("deit_tiny_patch16_224", "vit_tiny_patch16_224", [("blocks.5", "blocks.11")]),
        ("vit_tiny_patch16_224", "resnet18", [("layer3", "blocks.11")]),
    ]
    for teacher_name, student_name, layers in cases:
        student = build(student_name)
        module = DistillationModule(
            build(teacher_name), student, method=method, layers=layers, num_classes=10
        )
        _, maps = module.layer_maps(X, Y, create_graph=False)
        (s_map, t_map) = maps[layers[0][0]]
        assert s_map.shape == t_map.shape == (2, 16)
        out = module.training_step((X, Y), 0)
        out["loss"].backward()
        assert torch.isfinite(out["loss"])
        assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_all_zero_maps_at_the_start_are_named_with_the_cause() -> None:
    """timm ResNets zero-initialise each block's last batch norm (zero_init_last): the blocks
    start as the identity, so weight maps of their convolutions are exactly 0."""
    module = DistillationModule(
        build("resnet50"), build("resnet18"), method=JacobianMaps(wrt="weight"), num_classes=10
    )
    module.resolve_layers(X)
    with pytest.warns(UserWarning, match=r"student 'layer1.0.conv1' is all zeros.*zero_init_last"):
        out = module.training_step((X, Y), 0)
    assert all(float(d.abs().max()) == 0.0 for d in out["layer_divergence"].values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: no warning on the next batch
        module.training_step((X, Y), 1)
    torch.manual_seed(0)
    ok = DistillationModule(
        build("resnet50"),
        timm.create_model("resnet18", num_classes=10, zero_init_last=False),
        method=HessianMaps(wrt="activation"),
        num_classes=10,
        layers=RESNET[:2],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ok.training_step((X, Y), 0)
