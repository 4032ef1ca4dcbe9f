"""precision="bf16" / "fp16": the occluded positions run in a low precision, the clean image in float32."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import krypton
from krypton.budget import MemoryModel
from krypton.obe import _image_key
from nets import Head, rand_image
from oracle import max_error, occlusion_oracle

BF16 = torch.bfloat16


def _sparse_sign_weights(conv: nn.Conv2d, nonzeros: int, g: torch.Generator) -> None:
    """`nonzeros` entries of +-1 per output channel, the rest 0: |output| <= nonzeros * max |input|."""
    w = torch.zeros(conv.weight.shape[0], conv.weight[0].numel())
    for o in range(w.shape[0]):
        taps = torch.randperm(w.shape[1], generator=g)[:nonzeros]
        w[o, taps] = torch.randint(0, 2, (nonzeros,), generator=g).float() * 2 - 1
    with torch.no_grad():
        conv.weight.copy_(w.view_as(conv.weight))


class IntegerNet(nn.Module):
    """On a 0/1 image every activation before the head is an integer below 256, so bf16 holds it exactly:
    incremental and naive bf16 runs see the same values and must agree bit for bit. Covers padded and
    strided convs, a depthwise conv, max pooling with padding (the -inf pad in bf16), a residual add,
    a channel concat and F.pad, then a global head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)  # |.| <= 3
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)  # <= 9
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2, bias=False)  # <= 8 * 12 = 96
        self.conv3 = nn.Conv2d(6, 6, 3, padding=1, bias=False)  # <= 2 * 96
        self.head = Head(6)
        g = torch.Generator().manual_seed(3)
        for conv, k in ((self.conv1, 3), (self.dw, 3), (self.conv2, 8), (self.conv3, 2)):
            _sparse_sign_weights(conv, k, g)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = torch.cat([x + F.relu(self.dw(x)), x], dim=1)
        x = F.relu(self.conv2(F.pad(x, (0, 1, 0, 1))))
        return self.head(F.relu(self.conv3(x)))


class Float32Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = copy.deepcopy(linear)

    def forward(self, x):
        return self.linear(x.float())


def bf16_model(model: nn.Module) -> nn.Module:
    """What precision="bf16" computes, built by hand: the model in bf16, its classifier (head.fc, which
    gives the logits) in float32."""
    low = copy.deepcopy(model).to(BF16)
    low.head.fc = Float32Linear(model.head.fc)
    return low


def integer_case():
    torch.manual_seed(0)
    model = IntegerNet().eval()
    image = torch.randint(0, 2, (3, 57, 59), generator=torch.Generator().manual_seed(4)).float()
    return model, image


class CloseCallNet(nn.Module):
    """Two logits 2^-9 apart near 1.0: float32 tells them apart, bf16 (8 significant bits) rounds both to
    1.0, so a bf16 run of the clean image predicts class 0 where float32 predicts class 1."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.head = Head(2, classes=2)
        with torch.no_grad():
            self.conv.weight.mul_(1e-3)
            self.head.fc.weight.mul_(1e-3)
            self.head.fc.bias.copy_(torch.tensor([1.0, 1.0 + 2.0 ** -9]))

    def forward(self, x):
        return self.head(F.relu(self.conv(x)))


# ---- the engine --------------------------------------------------------------------------------------------
def test_bf16_incremental_equals_bf16_naive_where_bf16_is_exact():
    model, image = integer_case()
    explainer = krypton.Explainer(model)
    inc = explainer.explain(image, patch_size=5, stride=3, precision="bf16", batch_size=16)
    naive = explainer.explain(image, patch_size=5, stride=3, precision="bf16", batch_size=16, method="naive")
    assert inc.incremental and inc.groups > 1 and inc.theoretical_speedup > 5  # windows, grouped plans
    assert torch.equal(inc.heatmap, naive.heatmap)
    # and both are what the bf16 model gives on each occluded image (the oracle, at the float32 label)
    exact = explainer.explain(image, patch_size=5, stride=3)
    oracle = occlusion_oracle(bf16_model(model), image.to(BF16), 5, 3, 0.0, target=exact.label)
    assert max_error(inc.heatmap, oracle.heatmap) <= 1e-6
    assert max_error(inc.heatmap, exact.heatmap) > 0  # it really ran in bf16 (the pooled features round)


@pytest.mark.parametrize("name", ["strided", "branchy", "pooling", "unknown"])
def test_bf16_on_every_op_stays_close_to_float32_and_to_bf16_naive(net, name):
    model = net(name)
    image = rand_image(3, 29, 31, seed=1)
    explainer = krypton.Explainer(model)
    exact = explainer.explain(image, patch_size=5, stride=3)
    inc = explainer.explain(image, patch_size=5, stride=3, precision="bf16")
    naive = explainer.explain(image, patch_size=5, stride=3, precision="bf16", method="naive")
    for exp in (inc, naive):
        assert exp.heatmap.shape == exact.heatmap.shape and exp.heatmap.dtype == torch.float32
        assert (exp.label, exp.probability, exp.predicted) == (exact.label, exact.probability, exact.predicted)
        assert exp.precision == "bf16" and exp.to_dict()["precision"] == "bf16"
        assert 0 < max_error(exp.heatmap, exact.heatmap) <= 2e-3  # bf16 keeps ~3 significant digits
    assert max_error(inc.heatmap, naive.heatmap) <= 2e-3
    assert next(model.parameters()).dtype == torch.float32  # the user's model is never converted


def test_label_and_probability_come_from_the_float32_clean_run():
    torch.manual_seed(0)
    model = CloseCallNet().eval()
    image = rand_image(3, 16, 16, seed=5)
    with torch.no_grad():
        assert int(model(image[None]).argmax()) == 1
        assert int(copy.deepcopy(model).to(BF16)(image[None].to(BF16)).argmax()) == 0  # bf16 would switch class
    exact = krypton.Explainer(model).explain(image, patch_size=4, stride=4)
    for method in ("incremental", "naive"):
        exp = krypton.Explainer(model).explain(image, patch_size=4, stride=4, precision="bf16", method=method)
        assert (exp.label, exp.predicted, exp.probability) == (1, 1, exact.probability)
        assert exp.heatmap.shape == exact.heatmap.shape == (4, 4)
        assert (exp.heatmap - 0.5).abs().max() <= 0.01  # the bf16 logits (a tie) at the float32 label


def test_bf16_composes_with_tau_and_drilldown():
    model, image = integer_case()
    explainer = krypton.Explainer(model)
    f32 = explainer.explain(image, patch_size=5, stride=3, tau=0.5)
    bf16 = explainer.explain(image, patch_size=5, stride=3, tau=0.5, precision="bf16")
    assert bf16.tau == 0.5 and bf16.theoretical_speedup == f32.theoretical_speedup
    assert 0 < max_error(bf16.heatmap, f32.heatmap) <= 2e-3
    assert bf16.extra["approximation"] == {**f32.extra["approximation"], "precision": "bf16"}

    full = explainer.explain(image, patch_size=5, stride=2, precision="bf16", batch_size=16)
    dd = explainer.explain(image, patch_size=5, stride=2, precision="bf16", batch_size=16,
                           drilldown={"r": 0.25, "s1": 4})
    mask = krypton.refined_mask(dd)
    assert dd.heatmap.shape == full.heatmap.shape and dd.precision == "bf16" and 0 < int(mask.sum()) < mask.numel()
    assert max_error(dd.heatmap[mask], full.heatmap[mask]) <= 1e-6  # stage 2 ran in bf16 too
    report = dd.extra["approximation"]
    assert (report["mode"], report["precision"], report["tau"]) == ("approximate", "bf16", 1.0)
    assert dd.label == full.label and dd.probability == full.probability


def test_activations_are_cached_per_dtype_and_dropped_when_the_weights_change():
    model, image = integer_case()
    explainer = krypton.Explainer(model)
    first = explainer.explain(image, patch_size=5, stride=3, precision="bf16")
    again = explainer.explain(image, patch_size=5, stride=3, precision="bf16")
    assert (first.cache, again.cache) == ("miss", "hit") and torch.equal(first.heatmap, again.heatmap)
    assert sorted(str(key[1]) for key in explainer._mats.items) == ["torch.bfloat16", "torch.float32"]
    assert explainer.explain(image, patch_size=5, stride=3).cache == "hit"  # the float32 ones: shared
    with torch.no_grad():
        model.conv3.weight.mul_(-1)  # in place: the converted copy must follow
    changed = explainer.explain(image, patch_size=5, stride=3, precision="bf16")
    fresh = krypton.Explainer(model).explain(image, patch_size=5, stride=3, precision="bf16")
    assert changed.cache == "miss" and torch.equal(changed.heatmap, fresh.heatmap)
    assert not torch.equal(changed.heatmap, first.heatmap)


def test_memory_estimates_use_the_element_size_of_the_dtype_that_runs(net):
    model = net("branchy")
    image = rand_image(3, 29, 31, seed=1)
    shape = (1, 3, 29, 31)
    explainer = krypton.Explainer(model)
    first = explainer.explain(image, patch_size=5, stride=3, precision="bf16", batch_size=8)
    second = explainer.explain(image, patch_size=5, stride=3, precision="bf16", batch_size=8)
    mats = explainer.materialized(image[None], needed=frozenset())[0].nbytes  # the cached, pruned copy
    classifier = {id(t) for t in model.head.fc.parameters()}  # stays float32

    def converted_size(t):
        dtype = (torch.float32 if id(t) in classifier else BF16) if t.is_floating_point() else t.dtype
        return t.numel() * torch.empty((), dtype=dtype).element_size()

    weights = sum(converted_size(t) for t in (*model.parameters(), *model.buffers()))
    assert first.memory["converted_weights_bytes"] == weights and "converted_weights_bytes" not in second.memory
    per_position = max(p.peak_bytes_per_position for _, p in explainer.grid_plans(shape, 5, 3, dtype=BF16))
    for exp, built in ((first, weights), (second, 0)):
        assert (exp.memory["materialized_bytes"], exp.memory["cast_materialized_bytes"]) == (mats, mats // 2)
        run = exp.memory["largest_batch_run"]
        assert exp.batch_size == 8 and run <= 8
        assert exp.memory["estimated_peak_bytes"] == MemoryModel().peak(per_position, run, mats, mats + built)
        assert exp.memory["peak_working_bytes"] == per_position * run
    f32_plan, bf16_plan = explainer.plan(shape, 5, 3), explainer.plan(shape, 5, 3, dtype=BF16)
    assert f32_plan is not bf16_plan and bf16_plan.peak_bytes_per_position * 2 == f32_plan.peak_bytes_per_position
    assert explainer._naive_bytes(bf16_plan, BF16) * 2 == explainer._naive_bytes(f32_plan)


def test_torch_export_and_torchscript_models_run_in_bf16():
    model, image = integer_case()
    eager = krypton.Explainer(model).explain(image, patch_size=5, stride=3, precision="bf16")
    exported = krypton.Explainer(torch.export.export(model, (image[None],)))
    exp = exported.explain(image, patch_size=5, stride=3, precision="bf16")
    assert exp.incremental and exp.label == eager.label and max_error(exp.heatmap, eager.heatmap) <= 1e-6
    # a TorchScript module is one opaque node: all of it runs in bf16, its classifier too
    scripted = krypton.Explainer(torch.jit.script(model)).explain(image, patch_size=5, stride=3, precision="bf16")
    oracle = occlusion_oracle(copy.deepcopy(model).to(BF16), image.to(BF16), 5, 3, 0.0, target=eager.label)
    assert not scripted.incremental and scripted.label == eager.label
    assert max_error(scripted.heatmap, oracle.heatmap) <= 1e-6 and max_error(scripted.heatmap, eager.heatmap) > 1e-5


def test_the_classifier_keeps_float32_in_eager_and_exported_graphs():
    model, image = integer_case()
    for source in (model, torch.export.export(model, (image[None],))):
        explainer = krypton.Explainer(source)
        low = explainer.capture_in(BF16)
        with torch.no_grad():
            logits = low.gm(image[None].to(BF16))
        assert logits.dtype == torch.float32
        assert {p.dtype for p in low.gm.parameters()} == {BF16, torch.float32}
        assert sum(p.dtype == torch.float32 for p in low.gm.parameters()) == 2  # the classifier's weight and bias


class HardwiredFloat32Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.head = Head(4)

    def forward(self, x):
        return self.head(self.conv2(self.conv1(x).float()))


def test_a_model_that_cannot_run_in_bf16_is_refused_naming_precision():
    model = HardwiredFloat32Net().eval()
    explainer = krypton.Explainer(model)
    with pytest.raises(krypton.OptionError) as ei:
        explainer.explain(rand_image(3, 16, 16), patch_size=4, stride=4, precision="bf16")
    assert ei.value.parameter == "precision" and "float32 for this model" in str(ei.value)
    assert explainer.explain(rand_image(3, 16, 16), patch_size=4, stride=4).precision == "float32"


# ---- options -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, needle", [
    ({"precision": "half"}, "float32 | bf16 | fp16"),
    ({"precision": ["bf16"]}, "float32 | bf16 | fp16"),
    ({"precision": "fp16"}, "CUDA-only"),
    ({"precision": "bf16", "mode": "exact"}, "contradicts mode='exact'"),
])
def test_precision_option_errors_name_the_parameter(net, options, needle):
    with pytest.raises(krypton.OptionError) as ei:
        krypton.explain(net("strided"), rand_image(3, 29, 31), patch_size=5, stride=3, **options)
    assert ei.value.parameter == "precision" and needle in str(ei.value)


def test_precision_reports_and_combinations(net):
    model, image = net("strided"), rand_image(3, 29, 31)
    plain = krypton.explain(model, image, patch_size=5, stride=9)
    assert plain.precision == "float32" and "approximation" not in plain.extra
    bf16 = krypton.explain(model, image, patch_size=5, stride=9, precision="bf16")
    assert bf16.extra["approximation"] == {"mode": "approximate", "tau": 1.0, "tau_source": "exact",
                                           "precision": "bf16", "estimated_speedup": 1.0,
                                           "configuration_source": "given", "expected_ssim": None}
    exact = krypton.explain(model, image, patch_size=5, stride=9, mode="exact")
    assert exact.extra["approximation"]["precision"] == "float32"
    assert krypton.explain(model, image, patch_size=5, stride=9, precision="bf16", method="naive").method == "naive"
    with pytest.raises(krypton.OptionError) as ei:  # naive still has no tau, whatever the precision
        krypton.explain(model, image, patch_size=5, stride=9, precision="bf16", method="naive", tau=0.5)
    assert ei.value.parameter == "tau"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_image_key_handles_every_dtype(dtype):
    image = rand_image(1, 3, 6, 5).to(dtype)
    key = _image_key(image)
    assert key == _image_key(image.clone()) == _image_key(image.contiguous(memory_format=torch.channels_last))
    assert key != _image_key(image.to(torch.float32 if dtype != torch.float32 else torch.float64))
    changed = image.clone()
    changed[0, 0, 0, 0] += 1
    assert key != _image_key(changed) and key != _image_key(image.reshape(1, 3, 5, 6))  # same bytes, other shape
