"""The engine's extension points and contracts: one rule per op kind, options validated once, caches.

The exactness reference is tests/oracle.py, which shares no code with the engine.
"""
from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import krypton
from krypton.nodes import OpSpec, Step
from krypton.obe import _ONE_SHOT
from oracle import occlusion_oracle


class LayerNorm2d(nn.Module):
    """ConvNeXt's LayerNorm over channels: per pixel, so it can run incrementally."""

    def __init__(self, channels):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class LayerNorm2dRule(krypton.Rule):
    """The worked example of the README: teaching the engine a new layer is this one class."""

    kind = "layernorm2d"
    leaf_modules = (LayerNorm2d,)  # keep it one node: fx would trace into the permutes otherwise

    def match(self, capture, node):
        if node.op == "call_module" and isinstance(capture.module(node), LayerNorm2d):
            return OpSpec(self, [node.args[0]], apply=capture.module(node))
        return None

    def rect(self, walk, node, spec):
        return walk.rects[spec.inputs[0]]  # per pixel: the changed region stays where it is

    def plan(self, builder, node, spec, rect):
        return Step(self, node, [spec.inputs[0]], spec)

    def run(self, runner, step, state):
        return step.spec.apply(state.patches[step.inputs[0]])


class NormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = LayerNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x):
        return self.head(self.conv2(torch.nn.functional.gelu(self.norm(self.conv1(x)))))


def _normnet():
    torch.manual_seed(0)
    return NormNet().double().eval()


def test_a_new_rule_makes_a_layer_incremental_and_stays_exact():
    model = _normnet()
    image = torch.randn(3, 18, 17, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    class Opaque(LayerNorm2dRule):  # LayerNorm2d kept one node that no rule claims (the engine's own
        match = staticmethod(lambda capture, node: None)  # per-pixel chain fusion would claim its permutes)

    plain = krypton.Explainer(model, rules=[Opaque()])
    taught = krypton.Explainer(model, rules=[LayerNorm2dRule()])
    plan = taught.plan((1, 3, 18, 17), 5, 3)
    assert [s.kind for s in plan.steps if s.node.target == "norm"] == ["layernorm2d"]
    assert all(s.kind in ("full", "project") for s in plain.plan((1, 3, 18, 17), 5, 3).steps
               if s.node.name.startswith(("permute", "norm")))  # without the rule: global
    exp = taught.explain(image, patch_size=5, stride=3)
    assert exp.incremental and "norm" not in (exp.fallback_reason or "")
    ref = occlusion_oracle(model, image, 5, 3, 0.0, exp.label).heatmap
    assert (exp.heatmap - ref).abs().max().item() <= 1e-9
    assert exp.theoretical_speedup > plain.explain(image, patch_size=5, stride=3).theoretical_speedup


def test_a_rule_that_cannot_run_fails_loudly():
    class Half(LayerNorm2dRule):
        run = krypton.Rule.run  # planned, but no execution: must raise, never run as something else

    with pytest.raises(NotImplementedError):
        krypton.Explainer(_normnet(), rules=[Half()]).explain(torch.randn(3, 12, 12, dtype=torch.float64),
                                                               patch_size=4, stride=4)
    with pytest.raises(TypeError):
        krypton.Explainer(_normnet(), rules=["not a rule"])


def test_every_built_in_kind_is_a_rule_object():
    from krypton.rules import DEFAULT_RULES

    capture = krypton.Explainer(_normnet()).capture
    for spec in capture.specs.values():
        assert spec is None or isinstance(spec.rule, krypton.Rule)
    assert len({type(r) for r in DEFAULT_RULES}) == len(DEFAULT_RULES)


@pytest.mark.parametrize("options, parameter", [
    ({"patch_size": 0}, "patch_size"), ({"stride": 2.5}, "stride"), ({"method": "fast"}, "method"),
    ({"target": 5}, "target"), ({"batch_size": 0}, "batch_size"), ({"memory_budget": -1}, "memory_budget"),
    ({"fill": "purple"}, "fill"), ({"fill": "gray"}, "normalize"), ({"tau": 0}, "tau"),
    ({"tau": 0.5, "method": "naive"}, "tau"), ({"drilldown": True, "method": "naive"}, "method"),
    ({"mode": "exact", "tau": 0.5}, "tau"), ({"target_ssim": 2}, "target_ssim"),
    ({"drilldown": {"r": 2}}, "drilldown.r"), ({"origins": [[0, 99]]}, "origins"),
    ({"origins": [[0, 0]], "drilldown": True}, "origins"),
])
def test_option_errors_name_parameter_value_and_range(options, parameter):
    explainer = krypton.Explainer(_normnet())
    with pytest.raises(krypton.OptionError) as info:
        explainer.explain(torch.randn(3, 12, 12, dtype=torch.float64), **{"patch_size": 4, "stride": 4, **options})
    e = info.value
    assert e.parameter == parameter and e.allowed and parameter.split(".")[-1] in str(e)


def test_option_errors_cut_long_values_short():
    with pytest.raises(krypton.OptionError) as info:
        krypton.Explainer(_normnet()).explain(torch.randn(3, 12, 12, dtype=torch.float64), method="x" * 10_000)
    assert len(str(info.value)) < 300


def test_model_problems_are_model_errors_not_option_errors():
    model = _normnet().train()
    with pytest.raises(krypton.ModelError):
        krypton.Explainer(model)
    model.eval()
    with pytest.raises(krypton.ModelError, match="cannot run on an input"):  # 1x1 after the stride-2 conv is fine,
        krypton.Explainer(nn.Sequential(nn.Conv2d(3, 4, 5), nn.Flatten(), nn.Linear(4 * 4, 2)).double().eval()) \
            .explain(torch.randn(3, 12, 12, dtype=torch.float64), patch_size=4, stride=4)


def test_one_shot_explain_reuses_the_plans_and_lets_the_model_go():
    model = _normnet()
    image = torch.randn(3, 12, 12, dtype=torch.float64)
    first = krypton.explain(model, image, patch_size=4, stride=4)
    explainer = _ONE_SHOT[model]
    builds = explainer.plan_builds
    second = krypton.explain(model, image, patch_size=4, stride=4)
    assert _ONE_SHOT[model] is explainer and explainer.plan_builds == builds
    assert torch.equal(first.heatmap, second.heatmap)
    ref = weakref.ref(model)
    del model, explainer
    gc.collect()
    assert ref() is None


def test_weights_changed_in_place_drop_the_caches():
    model = _normnet()
    image = torch.randn(3, 12, 12, dtype=torch.float64)
    explainer = krypton.Explainer(model)
    before = explainer.explain(image, patch_size=4, stride=4)
    with torch.no_grad():
        model.conv1.weight.mul_(-2.0)
    after = explainer.explain(image, patch_size=4, stride=4)
    assert after.cache == "miss"
    ref = occlusion_oracle(model, image, 4, 4, 0.0, after.label).heatmap
    assert (after.heatmap - ref).abs().max().item() <= 1e-9
    assert not torch.equal(before.heatmap, after.heatmap)


def test_drilldown_executed_speedup_counts_both_stages():
    model = _normnet()
    image = torch.randn(3, 20, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    explainer = krypton.Explainer(model, rules=[LayerNorm2dRule()])
    dd = explainer.explain(image, patch_size=4, stride=2, drilldown={"r": 0.3, "s1": 4})
    stage1 = explainer.explain(image, patch_size=4, stride=4)
    cells = np.array(dd.extra["drilldown"]["refined"])
    stage2 = explainer.explain(image, patch_size=4, stride=2, origins=cells * 2, target=stage1.label)
    n2, n1, k = dd.positions, stage1.positions, len(cells)
    expected = n2 / (n1 / stage1.executed_speedup + k / stage2.executed_speedup)
    assert dd.executed_speedup == pytest.approx(expected, rel=1e-9)
    assert dd.executed_speedup < explainer.explain(image, patch_size=4, stride=2).executed_speedup * n2 / (n1 + k) * 1.01


def test_grouping_prices_candidates_without_building_plans():
    model = _normnet()
    explainer = krypton.Explainer(model)
    groups = explainer.groups((1, 3, 64, 64), 4, 2)
    assert explainer.plan_builds == 0 and len(groups) >= 1
    explainer.prepare((1, 3, 64, 64), 4, 2)
    assert explainer.plan_builds == len(groups)
    krypton.estimate_speedup(model, (1, 3, 64, 64), 4, 2)
    assert explainer.plan_builds == len(groups)


def test_estimate_and_explanation_say_where_the_incremental_part_ends():
    model = _normnet()
    est = krypton.estimate_speedup(model, (1, 3, 32, 32), 4, 2)
    assert est.incremental and "stops at node" in est.fallback_reason
    exp = krypton.explain(model, torch.randn(3, 16, 16, dtype=torch.float64), patch_size=4, stride=4, method="naive")
    assert not exp.incremental and "naive" in exp.fallback_reason
    d = exp.to_dict()
    assert d["incremental"] is False and isinstance(d["heatmap"], list)


def test_untraceable_models_say_so():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            y = self.conv(x)
            if y.sum() > 0:  # data-dependent control flow: fx cannot trace it
                y = -y
            return self.fc(y.mean((2, 3)))

    model = Dynamic().double().eval()
    image = torch.randn(3, 10, 10, dtype=torch.float64)
    exp = krypton.explain(model, image, patch_size=4, stride=3)
    assert not exp.incremental and "not traceable by torch.fx" in exp.fallback_reason
    ref = occlusion_oracle(model, image, 4, 3, 0.0, exp.label).heatmap
    assert (exp.heatmap - ref).abs().max().item() <= 1e-9
    assert model not in _ONE_SHOT  # its fallback graph holds the model: not cached
    assert isinstance(krypton.Explainer(model).capture.gm.graph, fx.Graph)


class InplaceNet(nn.Module):
    """In-place ops whose mutation later nodes rely on (fx records `head(y)` after `y.add_(z)`)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 5, padding=2)
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x):
        y = self.a(x)
        y.add_(self.b(x))  # y's clean value is stitched from (its region is smaller than the sum's)
        z = self.c(y)
        z.mul_(0.5)
        self.relu(z)  # result unused: only the mutation of z matters
        return self.head(torch.cat([y, z], 1))


def test_in_place_ops_keep_their_semantics_and_the_stored_values():
    torch.manual_seed(0)
    model = InplaceNet().double().eval()
    image = torch.randn(3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    exp = krypton.Explainer(model).explain(image, patch_size=3, stride=2)
    ref = occlusion_oracle(model, image, 3, 2, 0.0, exp.label)
    assert exp.probability == pytest.approx(ref.probability, abs=1e-12)
    assert (exp.heatmap - ref.heatmap).abs().max().item() <= 1e-9
