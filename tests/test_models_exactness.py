"""Incremental == naive on the four product models (random weights; EfficientNet-Lite0 real)."""
from __future__ import annotations

import pytest
import torch

import krypton
from krypton.models import build_model
from nets import randomize_batchnorm

# (model, input size, [(patch, stride)]): small inputs keep the suite fast; borders are always included
# because the grid spans the whole image.
CASES = [
    ("vgg16", 40, [(1, 13), (6, 5), (16, 8), (33, 7)]),
    ("resnet18", 48, [(1, 11), (5, 4), (16, 16), (33, 5)]),
    ("inception_v3", 83, [(3, 20), (16, 16), (33, 25)]),
    ("efficientnet_lite0", 48, [(1, 9), (7, 5), (16, 16), (33, 15)]),
]


def _model(name, dtype):
    torch.manual_seed(0)
    model = build_model(name)
    if name != "efficientnet_lite0":
        randomize_batchnorm(model)
    return model.to(dtype).eval()


@pytest.mark.parametrize("name, size, settings", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)], ids=["f64", "f32"])
def test_model_incremental_equals_naive(name, size, settings, dtype, tol):
    model = _model(name, dtype)
    explainer = krypton.Explainer(model)
    image = torch.randn(3, size, size + 3, dtype=dtype, generator=torch.Generator().manual_seed(5))
    for patch, stride in settings:
        inc = explainer.explain(image, patch_size=patch, stride=stride, fill=0.1)
        naive = explainer.explain(image, patch_size=patch, stride=stride, fill=0.1, method="naive")
        err = (inc.heatmap.double() - naive.heatmap.double()).abs().max().item()
        assert err <= tol, f"{name} patch={patch} stride={stride}: max error {err:g}"


def test_vgg16_at_224_a_handful_of_positions():
    model = _model("vgg16", torch.float32)
    explainer = krypton.Explainer(model)
    image = torch.randn(3, 224, 224, generator=torch.Generator().manual_seed(6))
    inc = explainer.explain(image, patch_size=16, stride=104)  # 3 x 3 positions, corners and centre
    naive = explainer.explain(image, patch_size=16, stride=104, method="naive")
    assert inc.heatmap.shape == (3, 3)
    assert (inc.heatmap - naive.heatmap).abs().max().item() <= 1e-4


def test_vgg16_theoretical_speedup_matches_the_paper():
    estimate = krypton.estimate_speedup(build_model("vgg16"), (1, 3, 224, 224), patch_size=16, stride=4)
    assert estimate.speedup == pytest.approx(6.5, rel=0.10)
    assert len([layer for layer in estimate.layers if layer["kind"] == "conv"]) == 13
