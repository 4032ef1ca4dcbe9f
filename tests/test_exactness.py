"""Incremental heatmaps equal naive full re-inference of every occluded image (random weights)."""
from __future__ import annotations

import pytest
import torch

import krypton
from nets import NETS, randomize_batchnorm

SHAPES = [(17, 17), (23, 19), (12, 31)]
PATCH_STRIDE = [(1, 1), (2, 1), (3, 2), (4, 4), (5, 3), (7, 7), (9, 2), (12, 5)]


def _net(name: str, dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(NETS[name]()).to(dtype).eval()


def _compare(model, image, tol, **options):
    explainer = krypton.Explainer(model)
    inc = explainer.explain(image, method="incremental", **options)
    naive = explainer.explain(image, method="naive", **options)
    assert inc.heatmap.shape == naive.heatmap.shape
    assert inc.label == naive.label
    err = (inc.heatmap.double() - naive.heatmap.double()).abs().max().item()
    assert err <= tol, f"max |incremental - naive| = {err:g} > {tol:g} for {options}"
    return inc


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("shape", SHAPES)
def test_float64_exact(name, shape):
    model = _net(name, torch.float64)
    image = torch.randn(3, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for patch, stride in PATCH_STRIDE:
        if patch <= min(shape):
            _compare(model, image, 1e-9, patch_size=patch, stride=stride, fill=0.3, batch_size=5)


@pytest.mark.parametrize("name", sorted(NETS))
def test_float32_exact(name):
    model = _net(name, torch.float32)
    image = torch.randn(3, 20, 26, generator=torch.Generator().manual_seed(3))
    for patch, stride in [(1, 1), (4, 3), (8, 8), (13, 1)]:
        _compare(model, image, 1e-4, patch_size=patch, stride=stride, fill=-1.0)


def test_patch_as_large_as_image():
    model = _net("branchy", torch.float64)
    image = torch.randn(3, 16, 16, dtype=torch.float64)
    inc = _compare(model, image, 1e-9, patch_size=16, stride=1)
    assert inc.heatmap.shape == (1, 1)


def test_batch_size_does_not_change_results():
    model = _net("strided", torch.float64)
    image = torch.randn(3, 21, 21, dtype=torch.float64)
    explainer = krypton.Explainer(model)
    maps = [explainer.explain(image, patch_size=5, stride=2, batch_size=b).heatmap for b in (1, 3, 64)]
    assert torch.equal(maps[0], maps[1]) or (maps[0] - maps[1]).abs().max() < 1e-12
    assert (maps[0] - maps[2]).abs().max() < 1e-12


def test_unknown_op_only_ends_the_incremental_part():
    model = _net("unknown", torch.float64)
    explainer = krypton.Explainer(model)
    plan = explainer.plan((1, 3, 20, 20), 4, 2)
    kinds = [s.kind for s in plan.steps]
    assert "window" in kinds and "project" in kinds and "full" in kinds
    roll = next(s for s in plan.steps if s.node.name == "roll")
    assert roll.kind == "full"


def test_fallbacks_for_pooling_corner_cases():
    model = _net("pooling", torch.float64)
    plan = krypton.Explainer(model).plan((1, 3, 24, 24), 3, 3)
    by_name = {s.node.name: s.kind for s in plan.steps if s.kind != "project"}
    assert by_name["conv1"] == "window"  # 'same' padding with an even kernel
    assert by_name["avg_nopad"] == "full"  # count_include_pad=False with padding
    assert by_name["max_pool2d"] == "window"  # ceil_mode max pooling


def test_fill_named_colours_need_normalization():
    model = _net("strided", torch.float32)
    image = torch.randn(3, 16, 16)
    with pytest.raises(ValueError, match="normalize"):
        krypton.explain(model, image, patch_size=4, stride=4, fill="gray")
    norm = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    exp = krypton.explain(model, image, patch_size=4, stride=4, fill="gray", normalize=norm)
    assert exp.fill[0] == pytest.approx((0.5 - 0.485) / 0.229)


@pytest.mark.parametrize("options, message", [
    ({"patch_size": 0}, "patch_size=0"),
    ({"patch_size": 40}, "patch_size=40"),
    ({"stride": 0}, "stride=0"),
    ({"stride": 2.5}, "stride"),
    ({"method": "fast"}, "method='fast'"),
    ({"target": 7}, "target=7"),
    ({"target": -1}, "target=-1"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"fill": "purple"}, "fill"),
    ({"fill": [1.0, 2.0]}, "fill"),
    ({"tau": 0.0}, "tau=0.0"),
])
def test_bad_options_raise_value_errors_naming_the_parameter(options, message):
    model = _net("strided", torch.float32)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        krypton.explain(model, torch.randn(3, 16, 16), **{"patch_size": 4, "stride": 4, **options})


def test_bad_images():
    model = _net("strided", torch.float32)
    with pytest.raises(ValueError, match="shape"):
        krypton.explain(model, torch.randn(16, 16))
    with pytest.raises(ValueError, match="dtype"):
        krypton.explain(model, torch.randn(3, 16, 16, dtype=torch.float64))
    bad = torch.randn(3, 16, 16)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        krypton.explain(model, bad)


def test_materialized_activations_are_reused():
    model = _net("branchy", torch.float32)
    image = torch.randn(3, 16, 16)
    explainer = krypton.Explainer(model)
    first = explainer.explain(image, patch_size=4, stride=4)
    second = explainer.explain(image, patch_size=6, stride=2)
    assert (first.cache, second.cache) == ("miss", "hit")
    assert explainer.explain(image + 1, patch_size=4, stride=4).cache == "miss"
    explainer.clear_cache()
    assert explainer.explain(image, patch_size=4, stride=4).cache == "miss"


def test_prepare_builds_the_plans_explain_uses():
    model = _net("strided", torch.float32)
    explainer = krypton.Explainer(model)
    explainer.prepare((1, 3, 20, 20), 4, 2)
    built = explainer.plan_builds
    assert built == len(explainer.groups((1, 3, 20, 20), 4, 2))  # one plan per position group, nothing else
    explainer.explain(torch.randn(3, 20, 20), patch_size=4, stride=2)
    assert explainer.plan_builds == built


def test_attribution_is_mean_drop_over_covering_windows():
    model = _net("strided", torch.float64)
    image = torch.randn(3, 13, 11, dtype=torch.float64)
    exp = krypton.explain(model, image, patch_size=4, stride=3)
    attr = exp.attribution()
    assert attr.shape == (13, 11)
    drop = exp.probability - exp.heatmap
    # pixel (5, 5) is covered by the windows starting at rows {3} x cols {3} (4-px patch, stride 3)
    assert attr[5, 5].item() == pytest.approx(drop[1, 1].item())
    # pixel (3, 3) is covered by windows at rows {0, 3} x cols {0, 3}
    assert attr[3, 3].item() == pytest.approx(drop[:2, :2].mean().item())
    assert attr[12, 10].item() == 0.0  # no window reaches the last row/column


def test_position_groups_give_the_same_heatmap():
    """Positions split into border-distance groups (separate plans, tighter windows) stay exact."""
    from krypton.grouping import groups_for

    model = _net("branchy", torch.float64)
    image = torch.randn(3, 30, 27, dtype=torch.float64)
    explainer = krypton.Explainer(model)
    grid = krypton.grid_shape(30, 27, 3, 2)
    explainer._groups[((1, 3, 30, 27), 3, 2, 1.0)] = groups_for(grid, 2, [2, 6])
    grouped = explainer.explain(image, patch_size=3, stride=2, batch_size=16)
    naive = explainer.explain(image, patch_size=3, stride=2, method="naive")
    assert grouped.groups == 9
    assert (grouped.heatmap - naive.heatmap).abs().max().item() <= 1e-9
    one_group = krypton.Explainer(model)
    one_group._groups[((1, 3, 30, 27), 3, 2, 1.0)] = groups_for(grid, 2, [])
    assert grouped.executed_speedup > one_group.explain(image, patch_size=3, stride=2).executed_speedup


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("channels_last", [False, True])
def test_memory_format_does_not_change_results(name, channels_last):
    model = _net(name, torch.float64)
    image = torch.randn(3, 19, 22, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    explainer = krypton.Explainer(model, channels_last=channels_last)
    inc = explainer.explain(image, patch_size=5, stride=3)
    naive = explainer.explain(image, patch_size=5, stride=3, method="naive")
    assert (inc.heatmap - naive.heatmap).abs().max().item() <= 1e-9
