"""Approximate OBE: tau on the product models, drill-down (eq. 28-30), mode resolution and tau tuning."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import krypton
from krypton import approx, tuning
from nets import rand_image
from oracle import assert_matches_oracle, occlusion_oracle, occlusion_oracle_origins


@pytest.fixture
def branchy(net):
    return net("branchy")


# ---- tau ---------------------------------------------------------------------------------------------------
def test_tau_one_is_exact_bit_for_bit(net):
    model = net("strided")
    image = rand_image(3, 29, 31, seed=1)
    plain = krypton.Explainer(model).explain(image, patch_size=5, stride=3)
    for options in ({"tau": 1.0}, {"mode": "exact"}, {"tau": 1}):
        other = krypton.Explainer(model).explain(image, patch_size=5, stride=3, **options)
        assert torch.equal(plain.heatmap, other.heatmap), options
    assert_matches_oracle(plain, occlusion_oracle(model, image, 5, 3, 0.0), 1e-4, "tau=1")


# (model, input size, patch, stride): small inputs and a coarse grid keep this fast.
MODELS = [("vgg16", 40, 8, 8), ("resnet18", 48, 8, 8), ("inception_v3", 83, 16, 16), ("efficientnet_lite0", 48, 8, 8)]


@pytest.mark.parametrize("name, size, patch, stride", MODELS, ids=[m[0] for m in MODELS])
def test_tau_below_one_on_every_product_model(product_model, name, size, patch, stride):
    model = product_model(name)
    explainer = krypton.Explainer(model)
    image = rand_image(3, size, size, seed=2)
    exact = explainer.explain(image, patch_size=patch, stride=stride)
    approximate = explainer.explain(image, patch_size=patch, stride=stride, tau=0.4)
    assert approximate.heatmap.shape == exact.heatmap.shape and approximate.tau == 0.4
    assert torch.isfinite(approximate.heatmap).all()
    assert ((approximate.heatmap >= 0) & (approximate.heatmap <= 1)).all()
    assert approximate.theoretical_speedup > exact.theoretical_speedup  # the cap really applied

    # Occluding a constant image with its own value changes nothing, whatever tau drops: every capped
    # window must still be read from, and written back to, the right place of the clean activations.
    flat = torch.full((3, size, size), 0.7)
    same = explainer.explain(flat, patch_size=patch, stride=stride, fill=0.7, tau=0.4)
    with torch.no_grad():
        clean = torch.softmax(model(flat[None]).double(), dim=1)[0]
    assert same.label == int(clean.argmax()) and abs(same.probability - clean.max().item()) <= 1e-4
    assert (same.heatmap.double() - clean.max().item()).abs().max().item() <= 1e-4

    # The cap is round(tau * extent) cells (eq. 22). Every map here is under 100 cells wide, so at
    # tau = 0.995 it equals the extent and caps nothing: the exact computation, bit for bit.
    uncapped = explainer.explain(image, patch_size=patch, stride=stride, tau=0.995)
    assert torch.equal(uncapped.heatmap, exact.heatmap)
    assert uncapped.theoretical_speedup == exact.theoretical_speedup

    # tau = 0.9 keeps most of each change: against the oracle it is far closer than the map of "no
    # change" (the clean probability everywhere), which is what dropping the changes would give.
    ref = occlusion_oracle(model, image, patch, stride, 0.0)
    assert_matches_oracle(exact, ref, 1e-4, f"{name} exact")
    variation = (ref.heatmap - ref.probability).abs().mean().item()
    if variation < 1e-9:
        assert name == "inception_v3"  # random init saturates its softmax at 1.0 on every position
        return
    mild = explainer.explain(image, patch_size=patch, stride=stride, tau=0.9)
    assert mild.theoretical_speedup > exact.theoretical_speedup
    error = (mild.heatmap.double() - ref.heatmap).abs().mean().item()
    assert error <= 0.5 * variation, (error, variation)


def test_estimate_speedup_rises_as_tau_falls(product_model):
    model = product_model("resnet18")
    speedups = [krypton.estimate_speedup(model, (1, 3, 96, 96), 16, 4, tau).speedup
                for tau in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)]
    assert all(b >= a - 1e-9 for a, b in zip(speedups, speedups[1:])), speedups
    assert speedups[-1] > 2 * speedups[0]


# ---- drill-down: eq. 28-30 ----------------------------------------------------------------------------------
def test_eq29_defaults_and_eq28_estimate():
    dd = approx.resolve_drilldown({}, 224, 224, 16, 4)
    # S1 = sqrt(3 / (1 - 0.25 * 3)) * 4 = 13.86 -> 16 (up to a multiple of S2); eq. 28: 256 / (16 + 64) = 3.2
    assert (dd.r, dd.s1, dd.s2, dd.target_speedup, dd.s1_source) == (0.25, 16, 4, 3.0, "eq29")
    assert dd.estimated_speedup == pytest.approx(3.2)
    # S2 = 8: 27.7 -> 32, capped at P = 16 so that stage 1 still occludes every pixel (no blind strips).
    assert approx.resolve_drilldown({}, 224, 224, 16, 8).s1 == 16
    assert approx.resolve_drilldown({"target_speedup": 1.5}, 224, 224, 32, 8).s1 == 16  # exactly 2 S2 stays
    assert approx.resolve_drilldown({"target_speedup": 3.0}, 224, 224, 64, 8).s1 == 32  # 27.7 -> 32 <= P
    # Past the image side: the largest multiple of S2 that fits (eq. 28 then falls short of the target).
    assert approx.resolve_drilldown({"target_speedup": 3.4}, 24, 30, 24, 5).s1 == 20  # 23.8 -> 25 > 24
    # P < S2: stage 1 at S2 itself (the full grid already leaves strips)
    assert approx.resolve_drilldown({}, 64, 64, 4, 8).s1 == 8
    assert approx.s1_for_speedup(0.25, 3.0, 4) == pytest.approx(math.sqrt(12) * 4)
    assert approx.resolve_drilldown({"r": 0.5, "s1": 8}, 64, 64, 8, 4).estimated_speedup == pytest.approx(64 / 48)
    assert approx.resolve_drilldown(None, 64, 64, 8, 4) is None
    assert approx.resolve_drilldown(False, 64, 64, 8, 4) is None
    assert approx.resolve_drilldown(True, 224, 224, 16, 4) == dd


@pytest.mark.parametrize("spec, message", [
    ({"r": 0.25, "target_speedup": 4.0}, r"target_speedup=4 is out of range: allowed \[0.8, 3.9"),
    ({"r": 0.5, "target_speedup": 0.5}, r"target_speedup=0.5 is out of range: allowed \[0.6667, 1.99"),
    ({"r": 0.0}, r"r=0.0 is out of range: allowed \(0, 1\]"),
    ({"r": 1.5}, r"r=1.5 is out of range"),
    ({"r": "a lot"}, r"r='a lot' must be a finite number"),
    ({"s1": 2}, r"s1=2 is out of range: allowed integers 4..224"),
    ({"s1": 300}, r"s1=300 is out of range"),
    ({"s1": 8.0}, r"s1=8.0 is out of range"),
    ({"s1": 8, "target_speedup": 2}, "not both"),
    ({"speedup": 2}, r"unknown key\(s\) \['speedup'\]"),
    ("fast", "must be a dict"),
])
def test_drilldown_errors_name_parameter_value_and_range(spec, message):
    with pytest.raises(ValueError, match=message):
        approx.resolve_drilldown(spec, 224, 224, 16, 4)


def test_eq30_bound_uses_the_image_size():
    # W = 24, S2 = 4, r = 0.25: W^2 / (S2^2 + r W^2) = 576 / 160 = 3.6 < 1 / r = 4.
    assert approx.max_drilldown_speedup(24, 4, 0.25) == pytest.approx(3.6)
    approx.resolve_drilldown({"target_speedup": 3.5}, 24, 30, 8, 4)
    with pytest.raises(ValueError, match=r"target_speedup=3.7 is out of range: allowed \[0.8, 3.6\)"):
        approx.resolve_drilldown({"target_speedup": 3.7}, 24, 30, 8, 4)


# ---- drill-down: mapping, selection, merge -------------------------------------------------------------------
def test_coarse_to_fine_is_bilinear_in_corner_coordinates():
    coarse = np.arange(12, dtype=np.float64).reshape(3, 4)
    fine = approx.coarse_to_fine(coarse, 4, (7, 9), 2)  # stage-2 corner i*2 = stage-1 index i/2
    for i in range(7):
        for j in range(9):
            u, v = min(i * 2 / 4, 2), min(j * 2 / 4, 3)
            a, b = int(math.floor(u)), int(math.floor(v))
            a1, b1 = min(a + 1, 2), min(b + 1, 3)
            fu, fv = u - a, v - b
            want = ((1 - fu) * (1 - fv) * coarse[a, b] + (1 - fu) * fv * coarse[a, b1]
                    + fu * (1 - fv) * coarse[a1, b] + fu * fv * coarse[a1, b1])
            assert fine[i, j] == pytest.approx(want)
    assert np.array_equal(fine[::2, ::2][:3, :4], coarse)  # coinciding corners keep the stage-1 value
    assert np.array_equal(approx.coarse_to_fine(coarse, 3, (3, 4), 3), coarse)


def test_select_refined_takes_the_largest_drops_with_stable_ties():
    values = np.array([[0.9, 0.1, 0.5], [0.1, 0.7, 0.3]])
    mask = approx.select_refined(values, 0.95, 0.5)  # 3 of 6 cells: 0.1, 0.1 (row-major order), 0.3
    assert mask.tolist() == [[False, True, False], [True, False, True]]
    mask = approx.select_refined(values, 0.95, 0.2)  # ceil(1.2) = 2
    assert mask.sum() == 2 and mask[0, 1] and mask[1, 0]
    assert approx.select_refined(values, 0.95, 1.0).all()
    known = np.array([[False, True, False], [False, False, False]])  # 0.1 at (0, 1) is already exact
    mask = approx.select_refined(values, 0.95, 0.5, known)
    assert mask.tolist() == [[False, False, True], [True, False, True]]  # 0.1, 0.3, then 0.5 < 0.7
    assert approx.select_refined(values, 0.95, 1.0, known).sum() == 5


def test_stage1_cells_are_the_coinciding_corners_inside_the_stage1_grid():
    cells = approx.stage1_cells((7, 5), 4, 2, (3, 2))  # corners 0, 4, 8 (rows) and 0, 4 (cols) of stage 1
    want = np.zeros((7, 5), dtype=bool)
    want[np.ix_([0, 2, 4], [0, 2])] = True
    assert np.array_equal(cells, want)
    assert approx.stage1_cells((4, 4), 3, 2, (3, 3))[np.ix_([0, 3], [0, 3])].all()  # lcm(2, 3) = 6
    assert approx.stage1_cells((4, 4), 3, 2, (3, 3)).sum() == 4


def test_drilldown_with_r_one_equals_the_full_map_bit_for_bit(branchy):
    model = branchy
    image = torch.randn(3, 32, 30, generator=torch.Generator().manual_seed(3))
    explainer = krypton.Explainer(model)
    full = explainer.explain(image, patch_size=4, stride=2)
    for tau in (1.0, 0.5):
        full_tau = explainer.explain(image, patch_size=4, stride=2, tau=tau)
        dd = explainer.explain(image, patch_size=4, stride=2, tau=tau, drilldown={"r": 1.0, "s1": 6})
        assert torch.equal(dd.heatmap, full_tau.heatmap), tau
        assert krypton.refined_mask(dd, with_stage1=True).all()
        positions = dd.extra["drilldown"]["positions"]
        # stage-1 corners (every third stage-2 corner on each axis) are not run again
        assert positions["exact_from_stage1"] == math.ceil(full.heatmap.shape[0] / 3) * math.ceil(full.heatmap.shape[1] / 3)
        assert positions["stage2"] == full.heatmap.numel() - positions["exact_from_stage1"]


def test_drilldown_refines_exactly_the_top_r_cells_and_merges(net):
    model = net("strided")
    image = torch.randn(3, 40, 36, generator=torch.Generator().manual_seed(4))
    explainer = krypton.Explainer(model)
    events = []
    dd = explainer.explain(image, patch_size=6, stride=2, drilldown={"r": 0.2, "s1": 5},
                           progress=lambda stage, e: events.append((stage, e)))
    fine_shape = krypton.grid_shape(40, 36, 6, 2)
    assert dd.heatmap.shape == fine_shape and dd.stride == 2

    stage1 = explainer.explain(image, patch_size=6, stride=5)
    coarse = approx.coarse_to_fine(stage1.heatmap.double().numpy(), 5, fine_shape, 2)
    k = math.ceil(0.2 * coarse.size)
    drops = stage1.probability - coarse.ravel()
    # stage-2 corners 2i that are stage-1 corners 5a (0, 10, 20, ...) hold exact values: never re-run
    corner = [(2 * i) % 5 == 0 and 2 * i // 5 < stage1.heatmap.shape[0] for i in range(fine_shape[0])]
    corner_x = [(2 * j) % 5 == 0 and 2 * j // 5 < stage1.heatmap.shape[1] for j in range(fine_shape[1])]
    candidates = [i for i in range(coarse.size) if not (corner[i // fine_shape[1]] and corner_x[i % fine_shape[1]])]
    order = sorted(candidates, key=lambda i: (-drops[i], i))
    want = np.zeros(coarse.size, dtype=bool)
    want[order[:k]] = True
    mask = krypton.refined_mask(dd).numpy()
    assert mask.sum() == k and np.array_equal(mask.ravel(), want)

    info = dd.extra["drilldown"]
    assert info["positions"] == {"stage1": stage1.positions, "stage2": k, "full": coarse.size,
                                 "exact_from_stage1": coarse.size - len(candidates)}
    assert info["stage2_cache"] == "hit" and info["s1"] == 5 and info["s1_source"] == "given"
    refined = np.array(info["refined"])
    exact = explainer.explain(image, patch_size=6, stride=2, origins=refined * 2)
    merged = dd.heatmap.double().numpy()
    assert np.allclose(merged[mask], exact.heatmap.double().numpy().ravel(), atol=1e-6)
    assert np.allclose(merged[~mask], coarse[~mask], atol=1e-6)
    truth = occlusion_oracle_origins(model, image, 6, refined * 2, 0.0, target=dd.label)
    assert np.allclose(merged[mask], truth.heatmap.numpy().ravel(), rtol=0, atol=1e-5)
    # The coarse map went out first, on the stage-2 grid.
    assert [s for s, _ in events] == ["coarse"]
    assert events[0][1].heatmap.shape == fine_shape
    assert np.allclose(events[0][1].heatmap.double().numpy(), coarse, atol=1e-6)


def test_simulated_drilldown_equals_the_engine(branchy):
    """Tuning scores drill-down settings from full maps (approx.simulate): it must be what the engine returns."""
    image = torch.randn(3, 36, 34, generator=torch.Generator().manual_seed(6))
    explainer = krypton.Explainer(branchy)
    for tau in (1.0, 0.6):
        full = explainer.explain(image, patch_size=6, stride=2, tau=tau)
        for s1, r in ((4, 0.1), (6, 0.3), (2, 0.5)):
            dd = explainer.explain(image, patch_size=6, stride=2, tau=tau, drilldown={"r": r, "s1": s1})
            merged, refined, exact = approx.simulate(full.heatmap.numpy(), full.probability, s1, 2, r)
            assert np.array_equal(refined, krypton.refined_mask(dd).numpy()), (tau, s1, r)
            assert np.array_equal(exact, krypton.refined_mask(dd, with_stage1=True).numpy())
            assert np.allclose(merged, dd.heatmap.double().numpy(), rtol=0, atol=1e-6), (tau, s1, r)
            # the paper's rule ranks the corners too: never more exact cells at the same cost
            _, _, paper = approx.simulate(full.heatmap.numpy(), full.probability, s1, 2, r, paper_rule=True)
            assert paper.sum() <= exact.sum()
    with pytest.raises(ValueError, match="multiple"):
        approx.simulate(full.heatmap.numpy(), full.probability, 5, 2, 0.2)


def test_default_drilldown_leaves_no_blind_strips(branchy):
    """At the defaults stage 1 occludes every pixel (S1 <= P), also where eq. 29 alone would pick S1 > P."""
    image = torch.randn(3, 40, 40, generator=torch.Generator().manual_seed(8))
    exp = krypton.Explainer(branchy).explain(image, patch_size=4, stride=2, drilldown=True)
    info = exp.extra["drilldown"]
    assert info["s1"] == 4 and info["stage1_covers_image"]  # eq. 29: 6.9 -> 8 > P = 4
    covered = np.zeros((40, 40), dtype=bool)
    for a in range(len(info["stage1_heatmap"])):
        for b in range(len(info["stage1_heatmap"][0])):
            covered[a * info["s1"]:a * info["s1"] + 4, b * info["s1"]:b * info["s1"] + 4] = True
    assert covered.all()


def test_drilldown_response_is_json_and_reports_what_was_used(branchy):
    model = branchy
    image = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(5))
    exp = krypton.Explainer(model).explain(image, patch_size=4, stride=2, drilldown={"r": 0.3, "target_speedup": 2.0})
    body = json.loads(json.dumps(exp.to_dict()))
    dd = body["drilldown"]
    assert dd["r"] == 0.3 and dd["target_speedup"] == 2.0 and dd["s1_source"] == "eq29"
    assert dd["s1"] == 4  # eq. 29: 4.47 -> 6, a multiple of S2 = 2, capped at P = 4 (no blind strips)
    assert dd["estimated_speedup"] == pytest.approx(approx.drilldown_speedup(dd["s1"], 2, 0.3))
    assert len(dd["refined"]) == dd["positions"]["stage2"] == math.ceil(0.3 * exp.heatmap.numel())
    assert body["approximation"]["tau"] == 1.0 and body["approximation"]["estimated_speedup"] > 1
    assert set(body["timings_ms"]) >= {"stage1", "stage2", "total"}


def test_drilldown_rejects_explicit_origins(branchy):
    with pytest.raises(ValueError, match="origins"):
        krypton.Explainer(branchy).explain(torch.randn(3, 16, 16), patch_size=4, stride=2, drilldown=True,
                                          origins=[[0, 0]])


# ---- mode / target_ssim resolution ------------------------------------------------------------------------------
class _Named(torch.nn.Module):
    def __init__(self, name, inner):
        super().__init__()
        self.inner = inner
        self.krypton_name = name
        self.eval()

    def forward(self, x):
        return self.inner(x)


def test_approximate_mode_uses_paper_taus_for_untuned_architectures_and_promises_nothing(net):
    image = torch.randn(3, 24, 24, generator=torch.Generator().manual_seed(6))
    for name, tau, source in (("vgg16", 0.5, "paper"), ("resnet18", 0.7, "paper"), ("inception_v3", 0.9, "paper"),
                              ("mystery", 0.9, "default")):
        exp = krypton.Explainer(_Named(name, net("strided"))).explain(image, patch_size=4, stride=2, mode="approximate")
        report = exp.extra["approximation"]
        assert (exp.tau, report["tau_source"], report["mode"]) == (tau, source, "approximate"), name
        assert report["expected_ssim"] is None and "no tuning on real weights" in report["quality"]
        assert "drilldown" not in exp.extra and exp.precision == "float32"
    exp = krypton.Explainer(_Named("vgg16", net("strided"))).explain(image, patch_size=4, stride=2, target_ssim=0.95)
    assert exp.tau == 1.0 and "drilldown" not in exp.extra  # no data above the paper's 0.9: exact


def test_mode_conflicts_are_value_errors(branchy):
    explainer = krypton.Explainer(branchy)
    image = torch.randn(3, 16, 16)
    for options, message in (({"mode": "exact", "tau": 0.5}, "tau=0.5 contradicts mode='exact'"),
                             ({"mode": "exact", "drilldown": True}, "drilldown=True contradicts"),
                             ({"mode": "fast"}, "mode='fast' is not allowed"),
                             ({"tau": 0.5, "target_ssim": 0.9}, "not both"),
                             ({"drilldown": True, "target_ssim": 0.9}, "conflicts with drilldown=True"),
                             ({"precision": "bf16", "target_ssim": 0.9}, "conflicts with precision='bf16'"),
                             ({"precision": "bf16", "mode": "exact"}, "precision='bf16' contradicts"),
                             ({"precision": "int8"}, "precision='int8' is not allowed"),
                             ({"target_ssim": 1.5}, r"target_ssim=1.5 is out of range: allowed \(0, 1\]"),
                             ({"target_ssim": 0.0}, "target_ssim=0.0")):
        with pytest.raises(ValueError, match=message):
            explainer.explain(image, patch_size=4, stride=2, **options)


def test_explicit_tau_wins_in_approximate_mode(net):
    exp = krypton.Explainer(_Named("vgg16", net("strided"))).explain(torch.randn(3, 24, 24), patch_size=4, stride=2,
                                                     mode="approximate", tau=0.6, drilldown=False)
    assert exp.tau == 0.6 and exp.extra["approximation"]["tau_source"] == "given" and "drilldown" not in exp.extra


# ---- SSIM and tuning --------------------------------------------------------------------------------------------
def test_ssim_is_skimage_with_the_documented_settings():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    a = rng.random((27, 27))
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    rng_ab = max(a.max(), b.max()) - min(a.min(), b.min())
    assert krypton.heatmap_ssim(a, b) == pytest.approx(structural_similarity(a, b, data_range=rng_ab, win_size=7))
    assert krypton.heatmap_ssim(torch.from_numpy(a), torch.from_numpy(a)) == 1.0
    assert krypton.heatmap_ssim(np.full((5, 5), 0.3), np.full((5, 5), 0.3)) == 1.0
    assert tuning.ssim_win_size((5, 9)) == 5 and tuning.ssim_win_size((4, 9)) == 3 and tuning.ssim_win_size((52, 52)) == 7
    with pytest.raises(ValueError, match="too small for SSIM"):
        krypton.heatmap_ssim(np.zeros((2, 5)), np.zeros((2, 5)))


def _result(config, ssims, speedups):
    return tuning.Result(config, {f"img{i}": v for i, v in enumerate(ssims)},
                         {f"img{i}": v for i, v in enumerate(speedups)})


def _synthetic():
    bf16, tau8 = tuning.Config("bf16"), tuning.Config(tau=0.8)
    dd = tuning.Config("bf16", 1.0, (2, 0.1))
    return tuning.Tuning("m", "tuned", {4: [
        _result(bf16, [0.97, 0.96, 0.98], [1.9, 2.0, 2.1]),
        _result(tau8, [0.93, 0.95, 0.92], [1.2, 1.2, 1.3]),
        _result(dd, [0.91, 0.90, 0.86], [4.0, 4.2, 3.9]),          # mean 0.89: below 0.9
        _result(tuning.Config("bf16", 1.0, (4, 0.1)), [0.81, 0.81, 0.81], [9.0, 9.0, 9.0]),
        _result(tuning.Config("bf16", 0.8), [0.95, 0.95, 0.80], [2.5, 2.5, 2.5]),  # one photo 0.15 below
    ], 8: [_result(bf16, [0.99, 0.99, 0.99], [2.0, 2.0, 2.0])]}, {"patch_size": 16, "photos": ["img0", "img1", "img2"]})


def test_choose_takes_the_fastest_configuration_that_meets_the_target_on_every_photo():
    t = _synthetic()
    assert t.choose(0.9, 4, 16).config == tuning.Config("bf16")  # 0.89 mean, or a photo at 0.80: out
    assert t.choose(0.88, 4, 16).config == tuning.Config("bf16", 1.0, (2, 0.1))
    assert t.choose(0.8, 4, 16).config.drilldown == (4, 0.1)  # 9x: mean 0.81, min 0.81
    assert t.choose(0.8, 4, 8).config.drilldown == (2, 0.1)  # S1 = 16 > P = 8 would leave blind strips
    assert t.choose(0.8, 4, 16, drilldown=False).config == tuning.Config("bf16", 0.8)  # drilldown=False
    assert t.choose(0.99, 4, 16) is None  # only the exact map meets it
    assert t.choose(0.9, 6, 16).config == tuning.Config("bf16") and t.tuned_stride(6) == 4  # tie: the smaller
    report = t.describe(0.9, 16, 16)
    assert report["tuning"]["stride"] == 8 and "nearest" in report["tuning"]["note"]
    assert report["configuration"] == {"precision": "bf16", "tau": 1.0, "drilldown": None}
    assert report["expected_ssim"] == 0.99 and report["expected_speedup"] == 2.0 and report["tau_source"] == "tuned"
    assert t.describe(0.99, 4, 16)["configuration"] == tuning.EXACT.to_dict()
    back = tuning.Tuning.from_json(json.loads(json.dumps(t.to_json())))
    assert back.choose(0.88, 4, 16).config == t.choose(0.88, 4, 16).config
    assert back.to_json()["choices"]["4"]["0.9"] == "bf16"
    with pytest.raises(ValueError, match="target_ssim"):
        t.choose(2, 4, 16)
    front = tuning.pareto_front(t.results[4])
    assert [r.config for r in front] == [tuning.Config("bf16", 1.0, (4, 0.1)), tuning.Config("bf16", 1.0, (2, 0.1)),
                                         tuning.Config("bf16", 0.8), tuning.Config("bf16")]


def test_tuning_files_are_found_by_name_and_malformed_ones_rejected(tmp_path):
    _synthetic().save(tmp_path / "mine.json")
    found = tuning.tuning_for("mine", directory=tmp_path)
    assert found.source == "tuned" and found.path.endswith("mine.json")
    assert tuning.tuning_for("vgg16", directory=tmp_path).source == "paper"
    (tmp_path / "bad.json").write_text('{"version": 2, "strides": {"4": [{"config": {}, "ssim": {"a": 1}, '
                                       '"speedup": {}}]}}')
    with pytest.raises(ValueError, match="malformed"):
        tuning.tuning_for("bad", directory=tmp_path)
    (tmp_path / "old.json").write_text('{"taus": [1.0], "ssim": {}}')
    with pytest.raises(ValueError, match="rerun scripts/tune.py"):
        tuning.tuning_for("old", directory=tmp_path)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_shipped_tuning_is_real_and_meets_its_targets_on_its_photos(name):
    t = tuning.tuning_for(name)
    assert t.source == "tuned", f"krypton/tuned/{name}.json is missing"
    assert t.meta["patch_size"] == 16 and len(t.meta["photos"]) >= 5 and set(t.results) == set(tuning.STRIDES)
    assert t.meta["weights"] == "packaged"
    for stride in tuning.STRIDES:
        for target in (0.8, 0.9, 0.95):
            res = t.choose(target, stride, 16)
            if res is not None:
                assert res.mean_ssim >= target and res.min_ssim >= target - tuning.MARGIN


def test_tuned_configuration_meets_the_target_when_rerun(product_model, monkeypatch):
    """Tune EfficientNet-Lite0 (real weights) on two small real photos, then run the chosen configuration
    through the engine and re-measure its SSIM: the simulation behind the tuning is what the engine does."""
    model = product_model("efficientnet_lite0")
    pre = krypton.models.PREPROCESS["efficientnet_lite0"]
    images = {name: tuning.preprocess(tuning.load_photo(name), 72, 64, pre["mean"], pre["std"])
              for name in ("chelsea", "coffee")}
    normalize = (pre["mean"], pre["std"])
    result = tuning.tune(krypton.Explainer(model), "efficientnet_lite0", images, 16, strides=(4, 8), fill="gray",
                         normalize=normalize, taus=(1.0, 0.8))
    target = 0.8
    # a model can carry its tuning; target_ssim then uses it (undone after: the model is shared)
    monkeypatch.setattr(model, "krypton_tuning", result, raising=False)
    fresh = krypton.Explainer(model)
    chosen = result.choose(target, 4, 16)
    assert chosen is not None, [(r.config.label(), r.mean_ssim) for r in result.results[4]]
    for name, image in images.items():
        exact = fresh.explain(image, patch_size=16, stride=4, fill="gray", normalize=normalize).heatmap
        exp = fresh.explain(image, patch_size=16, stride=4, fill="gray", normalize=normalize, target_ssim=target)
        report = exp.extra["approximation"]
        assert report["configuration"] == chosen.config.to_dict() and report["tau_source"] == "tuned"
        assert exp.tau == chosen.config.tau and exp.precision == chosen.config.precision
        assert krypton.heatmap_ssim(exact, exp.heatmap) == pytest.approx(chosen.ssim[name], abs=2e-3)
