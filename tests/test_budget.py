"""The memory budget: batches fitted to the memory model, explicit sizes clamped, calibration measured."""
from __future__ import annotations

import pytest
import torch

import krypton
from krypton.budget import SAFETY, MemoryModel, fit_batch
from nets import rand_image


def test_fit_batch_is_the_largest_batch_within_the_budget():
    model = MemoryModel(factor=2.0, fixed_bytes=1000)
    budget = int(SAFETY * (1000 + 2.0 * 100 * 37)) + 1
    assert fit_batch(model, 100, 500, budget, 0, None) == 37
    assert model.peak(100, 37, 0) * SAFETY <= budget < model.peak(100, 38, 0) * SAFETY
    assert fit_batch(model, 100, 20, budget, 0, None) == 20  # never more than the positions
    assert fit_batch(model, 100, 500, budget, 0, 10) == 10  # an explicit batch that fits is kept
    assert fit_batch(model, 100, 500, budget, 0, 64) == 37  # one that does not is clamped
    assert fit_batch(MemoryModel(), 100, 10_000, 1 << 40, 0, None) == 256  # automatic batches stop at 256
    assert MemoryModel().peak(100, 2, 50) == 2 * 50 + 3 * 100 * 2  # uncalibrated: 2 x materialized + 3 x planned


def test_a_budget_too_small_for_one_position_names_itself():
    with pytest.raises(krypton.OptionError) as info:
        fit_batch(MemoryModel(factor=2.0, fixed_bytes=1000), 100, 50, 1100, 0, None)
    assert info.value.parameter == "memory_budget" and "at least" in str(info.value)


def test_explicit_batch_sizes_are_clamped_and_reported(net):
    model = net("strided", torch.float32)
    image = rand_image(3, 32, 32, seed=2)
    explainer = krypton.Explainer(model)
    roomy = explainer.explain(image, patch_size=4, stride=2, batch_size=64)
    per_position = roomy.memory["peak_working_bytes"] // roomy.batch_size
    mats = roomy.memory["materialized_bytes"]
    budget = int(SAFETY * (2 * mats + 3 * per_position * 10)) + 1  # room for 10 positions
    tight = explainer.explain(image, patch_size=4, stride=2, batch_size=64, memory_budget=budget)
    assert tight.batch_size == 10 and tight.memory["batch_size_requested"] == 64
    assert tight.memory["estimated_peak_bytes"] * SAFETY <= budget == tight.memory["budget_bytes"]
    assert torch.equal(tight.heatmap, roomy.heatmap)  # the batch size never changes the result
    assert "batch_size_requested" not in roomy.memory


def test_calibration_measures_both_methods(net):
    model = net("branchy", torch.float32)
    explainer = krypton.Explainer(model)
    models = explainer.calibrate_memory((1, 3, 40, 40), 8, 4, 1 << 30)
    assert set(models) == {"incremental", "naive"}
    for m in models.values():
        assert m.source == "calibrated" and m.factor >= 1.0 and m.fixed_bytes >= 0
    assert len(explainer._mats.items) == 0  # the probes leave no activations behind
    exp = explainer.explain(rand_image(3, 40, 40, seed=3), patch_size=8, stride=4)
    assert exp.memory["memory_model"] == "calibrated"
