"""Incremental heatmaps equal the oracle (tests/oracle.py: plain slicing + the stock model) on the
hand-made CNNs of nets.py, which together cover every op the engine supports and one it does not."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import krypton
from nets import NETS, Head, rand_image
from oracle import assert_matches_oracle, occlusion_oracle, occlusion_oracle_origins

SHAPES = [(17, 17), (23, 19), (12, 31)]
PATCH_STRIDE = [(1, 1), (2, 1), (3, 2), (4, 4), (5, 3), (7, 7), (9, 2), (12, 5)]


def _check(explainer, image, tol, patch, stride, fill, **options):
    """explainer.explain(...) against the oracle on the same model; returns the explanation."""
    exp = explainer.explain(image, patch_size=patch, stride=stride, fill=fill, **options)
    ref = occlusion_oracle(explainer.model, image, patch, stride, fill, target=options.get("target"))
    assert_matches_oracle(exp, ref, tol, f"patch={patch} stride={stride} fill={fill} {options}")
    return exp


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("shape", SHAPES)
def test_float64_exact(net, name, shape):
    explainer = krypton.Explainer(net(name, torch.float64))
    image = rand_image(3, *shape, dtype=torch.float64, seed=2)
    for patch, stride in PATCH_STRIDE:
        if patch <= min(shape):
            _check(explainer, image, 1e-9, patch, stride, 0.3, batch_size=5)


@pytest.mark.parametrize("name", sorted(NETS))
def test_float32_exact(net, name):
    explainer = krypton.Explainer(net(name, torch.float32))
    image = rand_image(3, 20, 26, seed=3)
    for patch, stride in [(1, 1), (4, 3), (8, 8), (13, 1)]:
        _check(explainer, image, 1e-4, patch, stride, -1.0)


@pytest.mark.parametrize("name", sorted(NETS))
def test_naive_method_equals_the_oracle(net, name):
    """method="naive" (kept in the product for verification) is itself right: same stitch op and fill
    code as the incremental path, so it is checked against the oracle, never used as one."""
    explainer = krypton.Explainer(net(name, torch.float64))
    image = rand_image(3, 19, 22, dtype=torch.float64, seed=7)
    for patch, stride, fill in [(1, 3, 0.3), (5, 3, [0.5, -2.0, 1.0]), (19, 1, -1.0)]:
        exp = _check(explainer, image, 1e-9, patch, stride, fill, method="naive", batch_size=7)
        assert exp.method == "naive"


@pytest.mark.parametrize("name", sorted(NETS))
def test_memory_format_does_not_change_results(net, name):
    """channels_last (the default) and NCHW windows give the same, exact heatmap."""
    model = net(name, torch.float64)
    image = rand_image(3, 19, 22, dtype=torch.float64, seed=4)
    ref = occlusion_oracle(model, image, 5, 3, 0.0)
    maps = {}
    for channels_last in (False, True):
        exp = krypton.Explainer(model, channels_last=channels_last).explain(image, patch_size=5, stride=3)
        assert_matches_oracle(exp, ref, 1e-9, f"channels_last={channels_last}")
        maps[channels_last] = exp.heatmap
    assert (maps[False] - maps[True]).abs().max().item() <= 1e-12


def test_per_channel_and_named_fills_match_the_oracle(net):
    model = net("branchy", torch.float64)
    image = rand_image(3, 18, 21, dtype=torch.float64, seed=8)
    explainer = krypton.Explainer(model)
    exp = _check(explainer, image, 1e-9, 4, 3, [2.0, -0.5, 0.25])
    assert exp.fill == [2.0, -0.5, 0.25]
    with pytest.raises(ValueError, match="normalize"):  # a named colour needs the normalization
        explainer.explain(image, patch_size=4, stride=3, fill="gray")
    norm = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    gray = [(0.5 - m) / s for m, s in zip(*norm)]
    exp = explainer.explain(image, patch_size=4, stride=3, fill="gray", normalize=norm)
    assert exp.fill == pytest.approx(gray, abs=1e-12)
    assert_matches_oracle(exp, occlusion_oracle(model, image, 4, 3, gray), 1e-9, "gray")


def test_explicit_target_matches_the_oracle(net):
    explainer = krypton.Explainer(net("pooling", torch.float64))
    image = rand_image(3, 16, 17, dtype=torch.float64, seed=9)
    predicted = explainer.explain(image, patch_size=6, stride=5).predicted
    exp = _check(explainer, image, 1e-9, 3, 2, 0.7, target=(predicted + 3) % 7)
    assert exp.label != exp.predicted


def test_explicit_origins_match_the_oracle(net):
    model = net("strided", torch.float64)
    image = rand_image(3, 21, 18, dtype=torch.float64, seed=10)
    corners = [(0, 0), (21 - 5, 18 - 5), (0, 13), (16, 0), (7, 3), (7, 3), (2, 11)]  # corners, repeats, any order
    exp = krypton.Explainer(model).explain(image, patch_size=5, stride=1, fill=-0.4, origins=corners)
    assert_matches_oracle(exp, occlusion_oracle_origins(model, image, 5, corners, -0.4), 1e-9, "origins")


def test_patch_as_large_as_image(net):
    inc = _check(krypton.Explainer(net("branchy", torch.float64)), rand_image(3, 16, 16, dtype=torch.float64),
                 1e-9, 16, 1, 0.0)
    assert inc.heatmap.shape == (1, 1)


def test_batch_size_does_not_change_results(net):
    model = net("strided", torch.float64)
    image = rand_image(3, 21, 21, dtype=torch.float64, seed=11)
    explainer = krypton.Explainer(model)
    maps = [explainer.explain(image, patch_size=5, stride=2, batch_size=b).heatmap for b in (1, 3, 64)]
    assert torch.equal(maps[0], maps[1]) or (maps[0] - maps[1]).abs().max() < 1e-12
    assert (maps[0] - maps[2]).abs().max() < 1e-12


def _layer_speedups(model, size, patch, stride):
    layers = krypton.estimate_speedup(model, (1, 3, size, size), patch, stride).layers
    return {layer["name"]: layer["incremental_macs"] / layer["full_macs"] for layer in layers if layer["kind"] == "conv"}


def test_unknown_op_only_ends_the_incremental_part(net):
    """conv1 (before torch.roll) runs incrementally; conv2 (after it) runs in full, and the result is exact."""
    model = net("unknown", torch.float64)
    ratio = _layer_speedups(model, 20, 4, 2)
    assert ratio["conv1"] < 0.5 and ratio["conv2"] == 1.0
    _check(krypton.Explainer(model), rand_image(3, 20, 20, dtype=torch.float64, seed=12), 1e-9, 4, 2, 0.0)


class _Probe(nn.Module):
    """conv_in -> op -> probe: the probe conv runs incrementally only if `op` did."""

    def __init__(self, op, first=None):
        super().__init__()
        self.conv_in = first or nn.Conv2d(3, 4, 3, padding=1)
        self.op = op
        self.probe = nn.Conv2d(4, 4, 3, padding=1)
        self.head = Head(4)

    def forward(self, x):
        return self.head(self.probe(self.op(torch.tanh(self.conv_in(x)))))


@pytest.mark.parametrize("op, first, incremental", [
    (nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False), None, False),  # falls back to global
    (nn.MaxPool2d(2, stride=2, ceil_mode=True), None, True),  # ceil_mode max pooling stays incremental
    (nn.AvgPool2d(3, stride=1, padding=1), None, True),
    (nn.Identity(), nn.Conv2d(3, 4, 4, padding="same"), True),  # 'same' padding with an even kernel
], ids=["avg_nopad", "max_ceil", "avg_pad", "same_even_kernel"])
def test_fallbacks_for_pooling_corner_cases(op, first, incremental):
    torch.manual_seed(0)
    model = _Probe(op, first).double().eval()
    ratio = _layer_speedups(model, 23, 3, 3)
    assert ratio["conv_in"] < 0.5
    assert (ratio["probe"] < 0.5) if incremental else (ratio["probe"] == 1.0), ratio
    _check(krypton.Explainer(model), rand_image(3, 23, 23, dtype=torch.float64, seed=13), 1e-9, 3, 3, 0.5)


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
def test_bad_options_raise_value_errors_naming_the_parameter(net, options, message):
    model = net("strided", torch.float32)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        krypton.explain(model, rand_image(3, 16, 16), **{"patch_size": 4, "stride": 4, **options})


def test_bad_images(net):
    model = net("strided", torch.float32)
    with pytest.raises(ValueError, match="shape"):
        krypton.explain(model, torch.randn(16, 16))
    with pytest.raises(ValueError, match="dtype"):
        krypton.explain(model, torch.randn(3, 16, 16, dtype=torch.float64))
    bad = torch.randn(3, 16, 16)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        krypton.explain(model, bad)


def test_materialized_activations_are_reused(net):
    model = net("branchy", torch.float32)
    image = rand_image(3, 16, 16, seed=14)
    explainer = krypton.Explainer(model)
    first = explainer.explain(image, patch_size=4, stride=4)
    second = explainer.explain(image, patch_size=6, stride=2)
    assert (first.cache, second.cache) == ("miss", "hit")
    assert explainer.explain(image + 1, patch_size=4, stride=4).cache == "miss"
    explainer.clear_cache()
    assert explainer.explain(image, patch_size=4, stride=4).cache == "miss"


def test_prepare_builds_the_plans_explain_uses(net):
    model = net("strided", torch.float32)
    image = rand_image(3, 20, 20, seed=15)
    explainer = krypton.Explainer(model)
    assert explainer.plan_builds == 0
    explainer.prepare((1, 3, 20, 20), 4, 2)
    built = explainer.plan_builds
    assert built == len(explainer.groups((1, 3, 20, 20), 4, 2))  # one plan per position group, nothing else
    exp = explainer.explain(image, patch_size=4, stride=2)
    assert explainer.plan_builds == built  # prepare() built every plan explain() needs
    assert_matches_oracle(exp, occlusion_oracle(model, image, 4, 2, 0.0), 1e-4, "prepared")
    explainer.explain(image + 1, patch_size=4, stride=2, fill=0.5)  # other image and fill: same plans
    assert explainer.plan_builds == built
    explainer.explain(image, patch_size=4, stride=3)  # another grid needs new plans: the counter counts
    after = explainer.plan_builds
    assert after > built
    fresh = krypton.Explainer(model)
    fresh.explain(image, patch_size=5, stride=2)
    first = fresh.plan_builds
    assert first >= 1
    fresh.explain(image, patch_size=5, stride=2)  # the same options again build nothing
    assert fresh.plan_builds == first


def test_attribution_is_mean_drop_over_covering_windows(net):
    model = net("strided", torch.float64)
    image = rand_image(3, 13, 11, dtype=torch.float64, seed=16)
    exp = krypton.explain(model, image, patch_size=4, stride=3)
    attr = exp.attribution()
    assert attr.shape == (13, 11)
    drop = exp.probability - exp.heatmap
    # pixel (5, 5) is covered by the windows starting at rows {3} x cols {3} (4-px patch, stride 3)
    assert attr[5, 5].item() == pytest.approx(drop[1, 1].item())
    # pixel (3, 3) is covered by windows at rows {0, 3} x cols {0, 3}
    assert attr[3, 3].item() == pytest.approx(drop[:2, :2].mean().item())
    assert attr[12, 10].item() == 0.0  # no window reaches the last row/column


def test_position_groups_give_the_same_heatmap(net):
    """Positions split into border-distance groups (separate plans, tighter windows) stay exact.

    Forces 9 groups through the explainer's group table (no public switch exists for that)."""
    from krypton.grouping import groups_for

    model = net("branchy", torch.float64)
    image = rand_image(3, 30, 27, dtype=torch.float64, seed=17)
    explainer = krypton.Explainer(model)
    grid = krypton.grid_shape(30, 27, 3, 2)
    explainer._groups[((1, 3, 30, 27), 3, 2, 1.0)] = groups_for(grid, 2, [2, 6])
    grouped = explainer.explain(image, patch_size=3, stride=2, batch_size=16)
    assert grouped.groups == 9
    assert_matches_oracle(grouped, occlusion_oracle(model, image, 3, 2, 0.0), 1e-9, "9 groups")
    # explicit origins run as one group, with the windows of the worst position
    corners = [(i * 2, j * 2) for i in range(grid[0]) for j in range(grid[1])]
    one_group = krypton.Explainer(model).explain(image, patch_size=3, stride=2, origins=corners)
    assert one_group.groups == 1
    assert torch.allclose(one_group.heatmap.view(grid), grouped.heatmap, rtol=0, atol=1e-12)
    assert grouped.executed_speedup > one_group.executed_speedup
