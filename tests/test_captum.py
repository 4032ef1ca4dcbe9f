"""krypton.captum against Captum itself, and IncrementalModel against plain model calls."""
from __future__ import annotations

import warnings

import pytest
import torch

import krypton
import krypton.captum as kc

ca = pytest.importorskip("captum.attr")

H, W = 33, 31  # odd sizes: windows cut at both far borders


def _softmax_of(model):
    return lambda inp: torch.softmax(model(inp), dim=1)


def _images(n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, H, W, generator=g).to(dtype)


def _close(got, ref, dtype, outputs=1.0):
    """float64: 1e-9; float32: 1e-5 relative to the forward outputs (`outputs`: their largest magnitude),
    whose differences the attributions are (float32 rounding of a probability near 1 is ~6e-8)."""
    assert tuple(got.shape) == tuple(ref.shape) and got.dtype == ref.dtype
    tol = 1e-9 if dtype == torch.float64 else 1e-5 * outputs
    err = (got.double() - ref.double()).abs().max().item()
    assert err <= tol, f"max |krypton - captum| = {err:g} > {tol:g}"


def _no_fallback(call):
    with warnings.catch_warnings():
        warnings.simplefilter("error", kc.KryptonFallbackWarning)
        return call()


OCCLUSION_CASES = [
    dict(sliding_window_shapes=(3, 8, 8), strides=(3, 4, 4), target=2, baselines=0.0),
    dict(sliding_window_shapes=(3, 7, 5), strides=(3, 3, 2), target=[1, 4], baselines=0.5, perturbations_per_eval=7),
    dict(sliding_window_shapes=(1, 6, 6), strides=(1, 5, 5), target=3, baselines="per-channel"),
    dict(sliding_window_shapes=(3, 9, 9), strides=4, target=0, baselines="tensor"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", range(len(OCCLUSION_CASES)))
def test_occlusion_equals_captum(net, dtype, case):
    model = net("strided", dtype)
    x = _images(2, dtype)
    args = dict(OCCLUSION_CASES[case])
    if args["baselines"] == "per-channel":
        args["baselines"] = torch.tensor([0.3, -0.2, 0.1], dtype=dtype).view(3, 1, 1)
    elif args["baselines"] == "tensor":  # e.g. a blurred copy of each image
        args["baselines"] = torch.nn.functional.avg_pool2d(x, 5, 1, 2, count_include_pad=False)
    fn = _softmax_of(model)
    ref = ca.Occlusion(fn).attribute(x, **args)
    got = _no_fallback(lambda: kc.Occlusion(fn).attribute(x, **args))
    _close(got, ref, dtype)


def test_occlusion_module_forward_and_tuple_inputs(net):
    model = net("branchy", torch.float64)
    x = _images(1, torch.float64, seed=3)
    args = dict(sliding_window_shapes=(3, 10, 10), strides=(3, 6, 6), target=1, baselines=-0.5)
    ref = ca.Occlusion(model).attribute((x,), **args)
    explainer = kc.Occlusion(model)
    got = _no_fallback(lambda: explainer.attribute((x,), **args))
    assert isinstance(got, tuple) and len(got) == 1
    _close(got[0], ref[0], torch.float64)
    assert any(g["method"] == "incremental" for g in explainer.last_runs[0].groups)


def _segments():
    seg = torch.zeros(1, 1, H, W, dtype=torch.long)
    for i in range(4):
        for j in range(4):
            seg[..., i * 9:(i + 1) * 9, j * 8:(j + 1) * 8] = i * 4 + j
    seg[..., 5:7, 5:9] = 15  # a segment in two pieces: its box spans both
    seg[..., 30:, 20:] = 20  # at the far corner
    return seg


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_feature_ablation_segments_equal_captum(net, dtype):
    model = net("strided", dtype)
    x = _images(2, dtype, seed=1)
    fn = _softmax_of(model)
    for args in (dict(feature_mask=_segments(), target=2, baselines=0.0),
                 dict(feature_mask=_segments(), target=[1, 2], perturbations_per_eval=5,
                      baselines=torch.nn.functional.avg_pool2d(x, 3, 1, 1))):
        ref = ca.FeatureAblation(fn).attribute(x, **args)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", kc.KryptonFallbackWarning)  # big segments may run stock
            ablation = kc.FeatureAblation(fn)
            got = ablation.attribute(x, **args)
        assert ablation.last_fallback is None
        assert sum(g["positions"] for r in ablation.last_runs for g in r.groups if g["method"] == "incremental") > 0
        _close(got, ref, dtype)


def test_feature_ablation_slic_superpixels(net):
    segmentation = pytest.importorskip("skimage.segmentation")
    model = net("branchy", torch.float64)
    x = _images(1, torch.float64, seed=4)
    labels = segmentation.slic(x[0].permute(1, 2, 0).numpy(), n_segments=12, compactness=10, start_label=0,
                               channel_axis=-1)
    mask = torch.from_numpy(labels).long().view(1, 1, H, W)
    fn = _softmax_of(model)
    ref = ca.FeatureAblation(fn).attribute(x, feature_mask=mask, baselines=0.25, target=3, perturbations_per_eval=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kc.KryptonFallbackWarning)
        got = kc.FeatureAblation(fn).attribute(x, feature_mask=mask, baselines=0.25, target=3, perturbations_per_eval=4)
    _close(got, ref, torch.float64)


def test_fallback_paths_return_captums_answer(net):
    model = net("strided", torch.float64)
    x = _images(1, torch.float64, seed=2)
    other = net("branchy", torch.float64)
    two_models = lambda inp: model(inp) + other(inp)  # noqa: E731 - two modules: cannot be captured as one
    args = dict(sliding_window_shapes=(3, 8, 8), strides=(3, 5, 5), target=1)
    ref = ca.Occlusion(two_models).attribute(x, **args)
    with pytest.warns(kc.KryptonFallbackWarning, match="neither an nn.Module nor a function of exactly one"):
        got = kc.Occlusion(two_models).attribute(x, **args)
    assert torch.equal(got, ref)
    # one segment covering the whole image: not spatially local
    mask = torch.zeros(1, 1, H, W, dtype=torch.long)
    ref = ca.FeatureAblation(model).attribute(x, feature_mask=mask, target=0)
    with pytest.warns(kc.KryptonFallbackWarning, match="spatially local"):
        got = kc.FeatureAblation(model).attribute(x, feature_mask=mask, target=0)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["strided", "branchy", "pooling", "unknown"])
def test_incremental_model_equals_model(net, name, dtype):
    model = net(name, dtype)
    g = torch.Generator().manual_seed(5)
    ref = torch.randn(1, 3, 40, 40, generator=g).to(dtype)
    inc = krypton.IncrementalModel(model)
    assert torch.allclose(inc.reference(ref), model(ref), atol=0, rtol=0)
    images = ref.repeat(8, 1, 1, 1)
    for i in range(5):  # random edits
        y, x = torch.randint(0, 34, (2,), generator=g).tolist()
        h, w = torch.randint(1, 7, (2,), generator=g).tolist()
        images[i, :, y:y + h, x:x + w] = torch.randn(3, h, w, generator=g).to(dtype)
    images[5, :, 36:, 37:] = 2.0  # at the far corner
    images[6, 1, 0, 0] = -3.0  # one element at the origin
    images[7] = torch.randn(3, 40, 40, generator=g).to(dtype)  # the whole image
    unchanged = ref.clone()
    with torch.no_grad():
        expected = model(torch.cat([images, unchanged]))
    got = inc(torch.cat([images, unchanged]))
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert (got - expected).abs().max().item() <= tol
    run = inc.last_run
    assert run.unchanged == 1 and run.stock_positions >= 1  # the whole-image edit ran stock
    assert any(g["method"] == "incremental" for g in run.groups)
