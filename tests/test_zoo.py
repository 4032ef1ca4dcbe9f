"""Architectures users serve (tests/zoo.py, torchvision layout): incremental == the slicing oracle in float64.

Small widths and inputs keep each model at a few seconds; patch/stride settings include a 1-pixel patch,
windows that reach the borders and a patch covering most of the image.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import krypton
import zoo
from krypton.rules_pixel import PixelChain
from nets import randomize_batchnorm
from oracle import occlusion_oracle

SETTINGS = [(1, 11), (5, 4), (13, 9)]
SIZE = 32


def _model(name):
    torch.manual_seed(0)
    model = randomize_batchnorm(zoo.SMALL[name]())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():  # non-trivial LayerNorm affine parameters and layer scales
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model.double().eval()


@pytest.mark.parametrize("name", list(zoo.SMALL))
def test_zoo_incremental_is_exact(name):
    model = _model(name)
    image = torch.randn(3, SIZE, SIZE + 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    explainer = krypton.Explainer(model)
    for patch, stride in SETTINGS:
        exp = explainer.explain(image, patch_size=patch, stride=stride, fill=0.2)
        assert exp.incremental
        ref = occlusion_oracle(model, image, patch, stride, 0.2, exp.label).heatmap
        err = (exp.heatmap - ref).abs().max().item()
        assert err <= 1e-9, f"{name} patch={patch} stride={stride}: max error {err:g}"


def test_convnext_blocks_are_incremental_through_layernorm_linear_and_layer_scale():
    model = _model("convnext_tiny")
    explainer = krypton.Explainer(model)
    chains = [m for m in explainer.capture.gm.modules() if isinstance(m, PixelChain)]
    # every block's permute/LayerNorm/Linear/GELU/Linear/permute, the stem's, the downsamplers' and the
    # classifier's LayerNorm2d: one fused per-pixel node each
    assert len(chains) == 6 + 1 + 3 + 1
    plan = explainer.plan((1, 3, 64, 64), 8, 8)
    kinds = {}
    for s in plan.steps:
        kinds.setdefault(s.kind, []).append(s.node.name)
    assert len(kinds["pixel"]) >= 4  # run on patches, before the incremental part stops
    assert any(n.startswith("mul") for n in kinds["unary"])  # layer_scale * block(x): per channel
    assert "stops at node features." in plan.fallback


def test_se_blocks_end_the_incremental_part():
    # MobileNetV3-small's first block already has SE (its module 1), RegNetY's every block (f.se)
    for name, where in (("mobilenet_v3_small", "features.1.block.1.avgpool"), ("regnet_y", "block1-0.f.se.avgpool")):
        model = _model(name)
        est = krypton.estimate_speedup(model, (1, 3, 64, 64), 8, 4)
        assert est.incremental and f"{where} (AdaptiveAvgPool2d)" in est.fallback_reason, (name, est.fallback_reason)
        se = model.get_submodule(est.fallback_reason.split()[3].rsplit(".", 1)[0])
        assert isinstance(se, zoo.SqueezeExcitation)
    est = krypton.estimate_speedup(_model("regnet_x"), (1, 3, 64, 64), 8, 4)
    assert ".se." not in est.fallback_reason and est.speedup > 3  # RegNetX (no SE) goes much further


@pytest.mark.parametrize("name, size", [("mobilenet_v2", 32), ("convnext_tiny", 64)])
def test_zoo_exported_matches_eager(name, size):
    model = _model(name)
    image = torch.randn(3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    program = torch.export.export(model, (image[None],))
    eager = krypton.estimate_speedup(model, (1, 3, size, size), 8, 4)
    exported = krypton.estimate_speedup(program, (1, 3, size, size), 8, 4)
    assert exported.speedup == pytest.approx(eager.speedup, rel=1e-12) and exported.full_macs == eager.full_macs
    explainer = krypton.Explainer(program)
    kinds = {s.kind for s in explainer.plan((1, 3, size, size), 7, 9).steps if not s.full}
    assert {"window", "binary"} <= kinds and (name != "convnext_tiny" or "pixel" in kinds)
    exp = explainer.explain(image, patch_size=7, stride=9)
    ref = occlusion_oracle(model, image, 7, 9, 0.0, exp.label).heatmap
    assert exp.incremental and (exp.heatmap - ref).abs().max().item() <= 1e-9
