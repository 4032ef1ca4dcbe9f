"""Model formats: torch.export programs run incrementally (aten rules), TorchScript runs naive and says so.

The reference is tests/oracle.py (clone, assign the patch by slicing, run the stock
eager model): it shares no code with the engine.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import krypton
from krypton import formats
from krypton.budget import SAFETY
from nets import BranchyNet, randomize_batchnorm
from oracle import occlusion_oracle


class VGGish(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(), nn.Linear(8 * 6 * 6, 5))

    def forward(self, x):
        return self.classifier(self.features(x))


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 5, stride=2, padding=2, bias=False), nn.BatchNorm2d(8)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(12)
        self.down = nn.Sequential(nn.Conv2d(8, 12, 1, stride=2, bias=False), nn.BatchNorm2d(12))
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = F.relu(x + self.b1(self.c1(x)))
        x = F.relu(self.down(x) + self.b2(self.c2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class MobileNetish(nn.Module):
    """Inverted residual (ReLU6, depthwise), hardswish, and a channel scale by a constant."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.Hardswish())
        self.expand = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(inplace=True))
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8).view(8, 1, 1))
        self.head = nn.Sequential(nn.Conv2d(8, 10, 1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(10, 5))

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x))) * self.scale
        return self.head(F.pad(x, (0, 1, 0, 1)))


NETS = {"vggish": (VGGish, 24), "resnetish": (ResNetish, 29), "mobilenetish": (MobileNetish, 26),
        "branchy": (BranchyNet, 21)}


def _model(cls):
    torch.manual_seed(0)
    return randomize_batchnorm(cls()).double().eval()


def _image(size):
    return torch.randn(3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("name", NETS)
def test_exported_programs_are_incremental_and_exact(name, tmp_path):
    cls, size = NETS[name]
    model, image = _model(cls), _image(size)
    program = torch.export.export(model, (image[None],))
    torch.export.save(program, tmp_path / "m.pt2")
    programs = {"export": program, "pt2": torch.export.load(tmp_path / "m.pt2"),
                "core-aten": program.run_decompositions()}
    eager = krypton.estimate_speedup(model, (1, 3, size, size), 16, 4)
    for form, prog in programs.items():
        explainer = krypton.Explainer(prog)
        est = krypton.estimate_speedup(prog, (1, 3, size, size), 16, 4)
        assert est.incremental and est.speedup == pytest.approx(eager.speedup, rel=1e-12), form
        assert est.full_macs == eager.full_macs
        kinds = {s.kind for s in explainer.plan((1, 3, size, size), 5, 3).steps}
        assert {"window", "input"} <= kinds, form  # convs run on windows, not on full copies
        for patch, stride, fill in ((5, 3, 0.0), (1, 7, 0.3), (size - 3, 2, -0.5)):
            exp = explainer.explain(image, patch_size=patch, stride=stride, fill=fill)
            ref = occlusion_oracle(model, image, patch, stride, fill, exp.label).heatmap
            assert exp.incremental and exp.to_dict()["incremental"] is True
            err = (exp.heatmap - ref).abs().max().item()
            assert err <= 1e-9, f"{name} {form} patch={patch} stride={stride}: {err:g}"


def test_export_with_folded_batchnorm_and_constant_scale_stays_incremental():
    model, image = _model(MobileNetish), _image(26)
    plan = krypton.Explainer(torch.export.export(model, (image[None],))).plan((1, 3, 26, 26), 4, 4)
    by_target = {str(s.node.target): s.kind for s in plan.steps if not s.full}
    assert by_target["aten.batch_norm.default"] == "alias"  # folded into the conv before it
    assert by_target["aten.mul.Tensor"] == "unary"  # x * scale (a get_attr per channel)
    assert "stops at node adaptive_avg_pool2d" in plan.fallback


def test_exported_training_mode_batchnorm_is_refused():
    model = _model(ResNetish).train()
    program = torch.export.export(model, (_image(29)[None],))
    with pytest.raises(krypton.ModelError, match="training mode"):
        krypton.Explainer(program)


def test_torchscript_runs_naive_and_says_so():
    model, image = _model(BranchyNet), _image(21)
    scripted = torch.jit.script(model).eval()
    exp = krypton.Explainer(scripted).explain(image, patch_size=5, stride=4)
    assert not exp.incremental and exp.fallback_reason == formats.TORCHSCRIPT_REASON
    d = exp.to_dict()
    assert d["incremental"] is False and d["fallback_reason"] == "TorchScript model: not traceable by torch.fx"
    ref = occlusion_oracle(model, image, 5, 4, 0.0, exp.label).heatmap
    assert (exp.heatmap - ref).abs().max().item() <= 1e-9
    est = krypton.estimate_speedup(scripted, (1, 3, 21, 21), 5, 4)
    assert not est.incremental and est.fallback_reason == formats.TORCHSCRIPT_REASON and est.speedup == 1.0
    naive = krypton.explain(scripted, image, patch_size=5, stride=4, method="naive")
    assert naive.fallback_reason == formats.TORCHSCRIPT_REASON
    assert (naive.heatmap - exp.heatmap).abs().max().item() <= 1e-12


@pytest.mark.parametrize("opaque", ["torchscript", "untraceable"])
def test_opaque_models_memory_estimate_and_batch_size(opaque):
    """A one-node graph knows only input and output shapes: the working set is measured instead, and it
    is of the size the traced model's estimate gives (not ~10x lower), so the budget picks a like batch."""

    class Untraceable(BranchyNet):
        def forward(self, x):
            if x.sum() > 1e9:  # data-dependent control flow
                x = -x
            return super().forward(x)

    model = _model(BranchyNet if opaque == "torchscript" else Untraceable)
    opaque_model = torch.jit.script(model).eval() if opaque == "torchscript" else model
    shape = (1, 3, 48, 48)
    traced = krypton.Explainer(_model(BranchyNet))
    explainer = krypton.Explainer(opaque_model)
    assert explainer.capture.trace_failure
    traced_bytes = traced._naive_bytes(traced.plan(shape, 8, 8))
    measured = explainer._naive_bytes(explainer.plan(shape, 8, 8))
    one_node = 2 * 3 * 48 * 48 * 8  # what the one-node plan's shapes would give: input + output, about
    assert 0.5 * traced_bytes <= measured <= 2.5 * traced_bytes and measured > 4 * one_node
    image = _image(48)
    mats = explainer.explain(image, patch_size=8, stride=8).memory["materialized_bytes"]
    budget = int(SAFETY * (2 * mats + 3 * 30 * measured)) + 1  # the default memory model: room for 30 positions
    for method in ("incremental", "naive"):
        exp = explainer.explain(image, patch_size=8, stride=8, memory_budget=budget, method=method)
        assert exp.batch_size == 30
        assert exp.memory["peak_working_bytes"] == exp.memory["largest_batch_run"] * measured
