"""The memory budget: the measured memory model, batches fitted to it, explicit sizes clamped, calibration."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import krypton
from krypton import budget
from krypton import geometry as geo
from krypton.budget import PEAK_MARGIN, SAFETY, MemoryModel, fit_batch, probe_batches
from nets import rand_image

CONCAVE = MemoryModel(((10, 100), (20, 180), (40, 220)), 2.0, "calibrated")  # per-position cost falls
CONVEX = MemoryModel(((10, 100), (20, 120), (40, 220)), 2.0, "calibrated")


def test_the_model_holds_the_first_point_below_it_and_grows_by_its_factor_past_the_last():
    for model in (CONCAVE, CONVEX):
        assert [model.peak(1, x, 0) for x in (0, 5, 10)] == [100, 100, 100]
        assert model.peak(1, 40, 0) == 220 and model.peak(1, 50, 0) == 220 + 2 * 10
        assert model.peak(5, 10, 0) == model.peak(1, 50, 0)  # it reads planned bytes: per position x batch
        assert model.peak(1, 30, 0, extra_bytes=7) == model.peak(1, 30, 0) + 7


def test_between_points_the_model_bounds_the_curve_whichever_way_it_bends():
    assert CONVEX.peak(1, 30, 0) == 170  # the chord of (20, 120) and (40, 220)
    # bending down: the previous segment continued (slope 8 from (20, 180)) up to the next point's peak
    assert CONCAVE.peak(1, 22, 0) == 180 + 8 * 2 and CONCAVE.peak(1, 30, 0) == 220
    assert CONCAVE.peak(1, 15, 0) == 140  # no segment before the first: the chord
    for model in (CONCAVE, CONVEX):
        peaks = [model.peak(1, x, 0) for x in range(60)]
        assert peaks == sorted(peaks)  # never lower for more planned bytes: fit_batch bisects it
        for x, y in model.points:
            assert model.peak(1, x, 0) == y


def test_measured_models_take_the_largest_repeat_with_a_margin_and_never_fall():
    model = MemoryModel.measured([(10, 100), (40, 300), (20, 90), (40, 260), (10, 80)])
    assert model.source == "calibrated"
    assert model.points == ((10, int(PEAK_MARGIN * 100)), (20, int(PEAK_MARGIN * 100)), (40, int(PEAK_MARGIN * 300)))
    assert model.factor == pytest.approx(PEAK_MARGIN * 200 / 20)  # the last segment, steeper than the chord
    flat = MemoryModel.measured([(10, 100), (20, 101)])
    assert flat.factor == 1.0  # at least one peak byte per planned byte past the last point
    assert MemoryModel.measured([(10, 100)]).points == ((10, int(PEAK_MARGIN * 100)),)
    assert MemoryModel.measured([(10, 100)], clean_bytes=300).clean_bytes == int(PEAK_MARGIN * 300)


def test_a_run_that_makes_its_clean_pass_peaks_at_that_pass_or_its_activations_plus_the_batches():
    model = MemoryModel(((10, 100), (40, 220)), 2.0, "calibrated", clean_bytes=300)
    assert model.peak(1, 20, 50, clean_pass=False) == 140  # a cache hit: the batches' own peak (the chord)
    assert model.peak(1, 20, 50) == 300  # a miss whose clean pass peaks above its activations + batches
    assert model.peak(1, 40, 150) == 150 + 220 and model.peak(1, 40, 150, extra_bytes=5) == 375
    assert MemoryModel().peak(1, 20, 50, clean_pass=False) == MemoryModel().peak(1, 20, 50)  # uncalibrated: one line
    assert fit_batch(model, 1, 1000, int(SAFETY * 300), 0, None) == 80  # the batches may grow to the pass's peak
    assert fit_batch(model, 1, 1000, int(SAFETY * 300), 0, None, clean_pass=False) == 80
    assert fit_batch(model, 1, 1000, int(SAFETY * 300), 100, None) == 35  # the activations it keeps count


def test_fit_batch_is_the_largest_batch_within_the_budget():
    model = MemoryModel(((100, 1000), (1000, 4000), (4000, 7000)), 1.5, "calibrated")
    for peak in (1000, 1800, 4500, 7000, 17000):
        budget_bytes = int(SAFETY * peak)
        best = fit_batch(model, 100, 500, budget_bytes, 0, None)
        assert SAFETY * model.peak(100, best, 0) <= budget_bytes < SAFETY * model.peak(100, best + 1, 0)
    roomy = int(SAFETY * 7000)  # 40 positions
    assert fit_batch(model, 100, 20, 1 << 30, 0, None) == 20  # never more than the positions
    assert fit_batch(model, 100, 500, roomy, 0, 10) == 10  # an explicit batch that fits is kept
    assert fit_batch(model, 100, 500, roomy, 0, 64) == fit_batch(model, 100, 500, roomy, 0, None) == 40  # else clamped
    assert fit_batch(MemoryModel(), 100, 10_000, 1 << 40, 0, None) == 256  # automatic batches stop at 256
    assert fit_batch(MemoryModel(), 100, 10_000, 1 << 40, 0, 1000) == 1000  # explicit ones may go past it
    assert MemoryModel().peak(100, 2, 50) == 2 * 50 + 3 * 100 * 2  # uncalibrated: 2 x materialized + 3 x planned


def test_a_budget_too_small_for_one_position_names_itself():
    with pytest.raises(krypton.OptionError) as info:
        fit_batch(MemoryModel(((100, 1000),), 2.0, "calibrated"), 100, 50, int(SAFETY * 1000) - 1, 0, None)
    assert info.value.parameter == "memory_budget" and "at least" in str(info.value)


def test_probe_batches_span_the_largest():
    assert probe_batches(256) == [1, 16, 64]
    assert probe_batches(40) == [1, 2, 10]
    assert probe_batches(3) == [1] and probe_batches(1) == []


def test_explicit_batch_sizes_are_clamped_and_reported(net):
    model = net("strided", torch.float32)
    image = rand_image(3, 32, 32, seed=2)
    explainer = krypton.Explainer(model)
    roomy = explainer.explain(image, patch_size=4, stride=2, batch_size=64)
    per_position = roomy.memory["peak_working_bytes"] // roomy.memory["largest_batch_run"]
    mats = roomy.memory["materialized_bytes"]
    budget_bytes = int(SAFETY * (2 * mats + 3 * per_position * 10)) + 1  # room for 10 positions
    tight = explainer.explain(image, patch_size=4, stride=2, batch_size=64, memory_budget=budget_bytes)
    assert tight.batch_size == 10 and tight.memory["batch_size_requested"] == 64
    assert tight.memory["estimated_peak_bytes"] * SAFETY <= budget_bytes == tight.memory["budget_bytes"]
    assert torch.equal(tight.heatmap, roomy.heatmap)  # the batch size never changes the result
    assert "batch_size_requested" not in roomy.memory


def test_a_probe_runs_the_requests_position_groups_in_part(net, monkeypatch):
    model = net("strided", torch.float32)
    image = rand_image(3, 64, 64, seed=3)
    explainer = krypton.Explainer(model)
    groups = explainer.groups((1, 3, 64, 64), 8, 4)
    assert len(groups) > 1  # else this test would not see the groups
    full = explainer.explain(image, patch_size=8, stride=4)
    batches = []
    runner = explainer._incremental_runner

    def recording(*args):
        run = runner(*args)
        return lambda start, stop: batches.append(stop - start) or run(start, stop)

    monkeypatch.setattr(explainer, "_incremental_runner", recording)
    probe = explainer._probe(image[None], "incremental", 2, 8, 4, positions_per_group=3)
    ran = np.concatenate([g[:3] for g in groups])
    assert probe.groups == full.groups and probe.batch_size == 2 and batches == [2, 1] * len(groups)
    assert torch.allclose(probe.heatmap.flatten()[ran], full.heatmap.flatten()[ran])


def test_calibration_probes_the_grid_at_batches_up_to_what_the_budget_holds(net, monkeypatch):
    model = net("branchy", torch.float32)
    explainer = krypton.Explainer(model)
    calls = []
    probe = explainer._probe

    def recording(image, method, batch, patch_size, stride, positions_per_group, held=None):
        assert held is not None  # measured against activations made before: a hit (a miss adds the clean pass)
        calls.append((method, batch, positions_per_group // batch))
        return probe(image, method, batch, patch_size, stride, positions_per_group, held)

    monkeypatch.setattr(explainer, "_probe", recording)
    models = explainer.calibrate_memory((1, 3, 40, 40), 8, 4, 1 << 30)
    assert set(models) == {"incremental", "naive"}
    positions = len(geo.grid_origins(40, 40, 8, 4))
    largest = min(positions, budget.MAX_AUTO_BATCH)  # a roomy budget: the whole grid of a tiny net
    k = budget.BATCHES_PER_PROBE
    # per method one position (one-time costs), then two batches at each probe batch and at the largest the
    # measured model lets the budget hold
    measured = [(b, k) for b in probe_batches(largest)] + [(largest, k)]
    assert calls == [(m, b, n) for m in models for b, n in [(1, 1)] + measured]
    for m in models.values():
        assert m.source == "calibrated" and m.factor >= 1.0 and len(m.points) >= 2
        xs, ys = zip(*m.points)
        assert list(xs) == sorted(set(xs)) and list(ys) == sorted(ys)
    assert len(explainer._mats.items) == 0  # the probes leave no activations behind
    exp = explainer.explain(rand_image(3, 40, 40, seed=3), patch_size=8, stride=4)
    assert exp.memory["memory_model"] == "calibrated"
