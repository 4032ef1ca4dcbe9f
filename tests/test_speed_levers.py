"""The engine's speed levers keep results exact and report what they claim: the true-change bound (checked
against the changed cells of real activations), even batch sizes, the oneDNN classifier head."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import krypton
from krypton import geometry as geo
from krypton.obe import even_batch
from krypton.rules import LinearRule

from oracle import max_error, occlusion_oracle


class LinearConvs(nn.Module):
    """Convs only up to the pool (no activation): with generic weights every cell in a patch's projective
    field changes, so the changed cells of real activations are the true change the planner should count."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 5, 3, stride=2, padding=1),
                                    nn.Conv2d(5, 4, 5, padding=2), nn.Conv2d(4, 6, 3, stride=2)])
        self.fc = nn.Linear(6, 7)

    def forward(self, x):
        for conv in self.convs:
            x = conv(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _changed_cells_macs(model, image, patch, origins, fill, incremental):
    """Conv multiply-adds over the output cells whose value really changed, summed over positions, and
    those of full inference: from the activations of each occluded image against the clean one. A conv that
    the position's plan runs in full (`incremental[i][k]` False) counts in full, as the bound says."""
    def outputs(x):
        outs = []
        for conv in model.convs:
            x = conv(x)
            outs.append(x)
        return outs

    per_cell = [c.in_channels // c.groups * c.kernel_size[0] * c.kernel_size[1] * c.out_channels for c in model.convs]
    with torch.no_grad():
        clean = outputs(image)
        cells = [o.shape[2] * o.shape[3] for o in clean]
        changed = 0.0
        for i, (y, x) in enumerate(origins):
            occluded = image.clone()
            occluded[..., y:y + patch, x:x + patch] = fill
            for k, (a, b) in enumerate(zip(clean, outputs(occluded))):
                moved = int(((a - b).abs().amax(dim=1) > 0).sum())
                changed += per_cell[k] * (moved if incremental[i][k] else cells[k])
        full = sum(pc * n for pc, n in zip(per_cell, cells)) * len(origins)
    return full, changed


@pytest.mark.parametrize("size,patch,stride", [(20, 4, 2), (23, 5, 3), (17, 7, 5), (40, 6, 2)])
def test_true_change_bound_counts_the_cells_that_really_change(size, patch, stride):
    torch.manual_seed(size)
    model = LinearConvs().double().eval()
    image = torch.randn(1, 3, size, size, dtype=torch.float64)
    explainer = krypton.Explainer(model)
    exp = explainer.explain(image, patch_size=patch, stride=stride, fill=5.0)
    origins = geo.grid_origins(size, size, patch, stride)
    incremental = [None] * len(origins)
    for indices, plan in explainer.grid_plans(tuple(image.shape), patch, stride):
        states = {n.target: plan.states[n] for n in plan.states if n.op == "call_module"}
        for i in indices:
            incremental[i] = [states[f"convs.{k}"] == "inc" for k in range(len(model.convs))]
    assert any(any(flags) for flags in incremental)
    full, changed = _changed_cells_macs(model, image, patch, origins.tolist(), 5.0, incremental)
    assert exp.true_change_speedup == pytest.approx(full / changed, rel=1e-12)
    assert exp.true_change_speedup >= exp.executed_speedup - 1e-12  # shared windows never beat each own change


def test_even_batch_sizes():
    assert even_batch(196, 191) == 98
    assert even_batch(729, 256) == 243
    assert even_batch(10, 256) == 10
    assert even_batch(0, 16) == 1
    for n in range(1, 80):
        for b in range(1, 40):
            step = even_batch(n, b)
            assert step <= b and -(-n // step) == -(-n // b)  # no more batches than at `b`, none larger


def test_classifier_head_runs_on_onednn_and_stays_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 12 * 12, 64),
                          nn.ReLU(inplace=True), nn.Linear(64, 10)).eval()
    image = torch.randn(1, 3, 12, 12)
    explainer = krypton.Explainer(model)
    exp = explainer.explain(image, patch_size=4, stride=2, fill=0.0)
    ref = occlusion_oracle(model, image, 4, 2, [0.0])
    assert max_error(exp.heatmap, ref.heatmap) < 1e-4
    plan = explainer.grid_plans((1, 3, 12, 12), 4, 2)[0][1]
    heads = [s for s in plan.steps if isinstance(s.spec.rule if s.spec else None, LinearRule)]
    assert len(heads) == 2
    if torch.backends.mkldnn.is_available():
        assert {s.kind for s in heads} == {"full_linear"}


class Residuals(nn.Module):
    """A residual add (`out += x` on a batch-norm-folded conv), a subtraction whose first operand is read
    twice and a product with a spatial parameter: on small images they run in the global part."""

    def __init__(self, hw):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.spatial = nn.Parameter(torch.randn(1, 1, hw, hw))
        self.fc = nn.Linear(8, 5)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.uniform_(0.5, 2)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(x))
        out += x
        x = F.relu(out)
        y = x - self.conv3(x)
        y = y * self.spatial
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


@pytest.mark.parametrize("size,patch,stride", [(8, 4, 2), (12, 5, 3), (16, 6, 3), (20, 3, 2)])
def test_global_binary_ops_write_into_fresh_operands_and_stay_exact(size, patch, stride):
    torch.manual_seed(size)
    model = Residuals((size + 1) // 2).eval().double()
    image = torch.randn(1, 3, size, size, dtype=torch.float64)
    explainer = krypton.Explainer(model)
    exp = explainer.explain(image, patch_size=patch, stride=stride, fill=0.0, batch_size=7)
    ref = occlusion_oracle(model, image, patch, stride, [0.0])
    assert max_error(exp.heatmap, ref.heatmap) < 1e-9
    kinds = {s.kind for _, plan in explainer.grid_plans((1, 3, size, size), patch, stride) for s in plan.steps}
    assert "full_binary_into" in kinds  # the residual add, into the folded conv's own output
    if size <= 12:  # the whole tail is global: the subtraction and the product too, and the ReLU in place
        assert {"full_binary", "full_inplace"} <= kinds


class SizeArithmetic(nn.Module):
    """Arithmetic of sizes (h * w from x.size()) beside tensor arithmetic in the global part."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = self.conv(x)
        b, c, h, w = x.size()
        rows = x.reshape(b * c, h * w)  # b is the batch's size: b * c is computed per batch
        return self.fc(rows.sum(1).reshape(b, c) / (h * w) * 2.0)


def test_size_arithmetic_in_the_global_part_runs_the_stock_op():
    torch.manual_seed(1)
    model = SizeArithmetic().eval().double()
    image = torch.randn(1, 3, 10, 10, dtype=torch.float64)
    explainer = krypton.Explainer(model)
    exp = explainer.explain(image, patch_size=4, stride=3, fill=0.0, batch_size=5)
    assert max_error(exp.heatmap, occlusion_oracle(model, image, 4, 3, [0.0]).heatmap) < 1e-9
    steps = {s.node.name: s.kind for s in explainer.grid_plans((1, 3, 10, 10), 4, 3)[0][1].steps}
    assert steps["mul"] == steps["mul_1"] == "full"  # b * c and h * w: ints, never written in place
