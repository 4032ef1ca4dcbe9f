"""Incremental == the oracle (tests/oracle.py) on the product models (random weights; EfficientNet-Lite real)."""
from __future__ import annotations

import pytest
import torch

import krypton
from nets import rand_image
from krypton.models import PREPROCESS
from krypton.tuning import photo_tensor
from oracle import assert_matches_oracle, occlusion_oracle

# (model, input size, [(patch, stride)]): small inputs keep the suite fast; borders are always included
# because the grid spans the whole image.
CASES = [
    ("vgg16", 40, [(1, 13), (6, 5), (16, 8), (33, 7)]),
    ("resnet18", 48, [(1, 11), (5, 4), (16, 16), (33, 5)]),
    ("inception_v3", 83, [(3, 20), (16, 16), (33, 25)]),
    ("efficientnet_lite0", 48, [(1, 9), (7, 5), (16, 16), (33, 15)]),
    ("efficientnet_lite1", 48, [(1, 9), (16, 16)]),
    ("efficientnet_lite2", 48, [(7, 9), (33, 15)]),
]
PHOTO_LABELS = {"chelsea": range(281, 286), "coffee": (504, 967, 968)}  # cat classes; mug / espresso / cup


@pytest.mark.parametrize("name, size, settings", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)], ids=["f64", "f32"])
def test_model_incremental_equals_oracle(product_model, name, size, settings, dtype, tol):
    model = product_model(name, dtype)
    explainer = krypton.Explainer(model)
    image = rand_image(3, size, size + 3, dtype=dtype, seed=5)
    for patch, stride in settings:
        exp = explainer.explain(image, patch_size=patch, stride=stride, fill=0.1)
        ref = occlusion_oracle(model, image, patch, stride, 0.1)
        assert_matches_oracle(exp, ref, tol, f"{name} patch={patch} stride={stride}")


def test_model_naive_equals_oracle(product_model):
    model = product_model("efficientnet_lite0")
    image = rand_image(3, 48, 51, seed=5)
    exp = krypton.Explainer(model).explain(image, patch_size=16, stride=16, fill=[0.1, -0.2, 0.3], method="naive")
    assert_matches_oracle(exp, occlusion_oracle(model, image, 16, 16, [0.1, -0.2, 0.3]), 1e-4, "naive")


@pytest.mark.parametrize("name, photo", [("efficientnet_lite1", "chelsea"), ("efficientnet_lite2", "coffee")])
def test_lite_on_a_real_photo_at_full_resolution(product_model, name, photo):
    """At the model's own resolution (where its TF-SAME paddings are the ones computed for it), on a real
    photo it classifies correctly: 3 x 3 positions (corners, edges, centre), float64 within 1e-9."""
    model = product_model(name, torch.float64)
    image = photo_tensor(photo, name).double()
    size = image.shape[-1]
    stride = (size - 16) // 2
    exp = krypton.Explainer(model).explain(image, patch_size=16, stride=stride, fill="gray",
                                           normalize=(PREPROCESS[name]["mean"], PREPROCESS[name]["std"]))
    ref = occlusion_oracle(model, image, 16, stride, [(0.5 - m) / s for m, s in
                                                      zip(PREPROCESS[name]["mean"], PREPROCESS[name]["std"])])
    assert exp.heatmap.shape == (3, 3) and ref.label in PHOTO_LABELS[photo]
    assert_matches_oracle(exp, ref, 1e-9, f"{name} {photo}")


def test_vgg16_at_224_a_handful_of_positions(product_model):
    model = product_model("vgg16")
    image = rand_image(3, 224, 224, seed=6)
    exp = krypton.Explainer(model).explain(image, patch_size=16, stride=104)  # 3 x 3 positions, corners and centre
    assert exp.heatmap.shape == (3, 3)
    assert_matches_oracle(exp, occlusion_oracle(model, image, 16, 104, 0.0), 1e-4, "vgg16 224")


def test_vgg16_theoretical_speedup_matches_the_paper(product_model):
    estimate = krypton.estimate_speedup(product_model("vgg16"), (1, 3, 224, 224), patch_size=16, stride=4)
    assert estimate.speedup == pytest.approx(6.5, rel=0.10)
    assert len([layer for layer in estimate.layers if layer["kind"] == "conv"]) == 13
