"""Smoke test of the benchmark machinery (scripts/bench.py + bench/) on a tiny CNN and 32x32 inputs.

Checks that every contender runs, that the outputs are written and consistent, and that the
measurements are sane (naive and Captum agree with krypton's exact heatmap). It never asserts a
timing or a speedup: those belong to the benchmark's results, not to pass/fail tests.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

pytest.importorskip("captum")
pytest.importorskip("skimage")
pytest.importorskip("matplotlib")

import importlib.util  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_script", os.path.join(ROOT, "scripts", "bench.py"))
bench_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_script)

from bench import contenders as C  # noqa: E402
from bench.measure import Meter, hwm_reset_works  # noqa: E402


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


PRE = {"resize": 40, "crop": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _args(tmp_path, *extra):
    return bench_script.parse_args([
        "--quick", "--patch", "8", "--stride", "4", "--images", "1", "--batch-sizes", "8,16",
        "--ppe", "8", "--taus", "0.6", "--ig-steps", "4", "--ig-batch", "4", "--sample-batches", "1",
        "--name", "smoke", "--out-dir", str(tmp_path), *extra])


def test_end_to_end_on_a_tiny_model(tmp_path):
    torch.manual_seed(0)
    model = Tiny().eval()
    args = _args(tmp_path, "--full-baselines")
    bench_script.run_benchmark(args, models=[("tiny", model, PRE, False)])

    for ext in ("json", "md", "png"):
        assert (tmp_path / f"smoke.{ext}").stat().st_size > 0
    saved = json.loads((tmp_path / "smoke.json").read_text())
    for key in ("cpu_model", "cpu_count", "torch_threads", "torch_version", "git_commit", "command", "date_utc"):
        assert key in saved["machine"]
    runs = {r["label"]: r for r in saved["runs"]}
    grid = 4 * 4 + 0  # (32 - 8) // 4 + 1 = 7 -> 49 positions; checked below
    assert saved["models"]["tiny"]["positions"] == 49 != grid

    exact = runs["krypton exact"]
    assert exact["ssim"] == 1.0 and exact["timing"] == "full" and exact["seconds"] > 0
    assert exact["theoretical_executed"] >= 1.0 and exact["theoretical_centre"] >= 1.0
    naive = [r for r in saved["runs"] if r["contender"] == "naive"]
    assert len(naive) == 2 * 2 + 1  # 2 batch sizes x 2 layouts + the full run of the best
    for r in naive:
        assert r["max_abs_diff"] < 1e-5  # same probabilities as krypton's exact heatmap
        assert r["peak_bytes"] is not None and r["peak_bytes"] >= 0
    sampled = [r for r in naive if r["extrapolated"]]
    assert sampled and all("extrapolated from" in r["timing"] and r["positions_total"] == 49 for r in sampled)
    captum = [r for r in saved["runs"] if r["contender"] == "captum-occlusion"]
    full_captum = [r for r in captum if not r["extrapolated"]]
    assert full_captum and full_captum[0]["ssim"] > 0.999 and full_captum[0]["max_abs_diff"] < 1e-5
    approx = [r for r in saved["runs"] if r["contender"] == "krypton-approx"]
    assert any(r["config"]["tau"] == 0.6 and r["ssim"] is not None for r in approx if not r["skipped"])
    assert any(r["contender"] == "captum-ig" and r["seconds"] > 0 for r in saved["runs"])

    # the drop-ins (same call as Captum's) and edited frames vs stock: present, and the same answers
    for ours, ref in (("krypton-captum-occlusion", None), ("krypton-captum-feature-ablation", "captum-feature-ablation"),
                      ("krypton-edits", "edits-stock")):
        rows = [r for r in saved["runs"] if r["contender"] == ours]
        assert [r["config"]["call"] for r in rows] == ["cold", "warm"], rows
        assert all(r["seconds"] > 0 and r["max_abs_diff"] is not None and r["max_abs_diff"] < 1e-5 for r in rows), rows
        if ref is not None:
            assert [r["seconds"] > 0 for r in saved["runs"] if r["contender"] == ref] == [True]
    seg = next(r for r in saved["runs"] if r["contender"] == "captum-feature-ablation")
    assert seg["config"]["n_segments"] == 50 and seg["config"]["segments"] >= 2

    summary = saved["summary"]
    assert sum(r["best_naive"] for r in summary) == 1
    best = next(r for r in summary if r["best_naive"])
    assert best["speedup_vs_naive"] == pytest.approx(1.0)
    ex = next(r for r in summary if r["label"] == "krypton exact")
    assert ex["speedup_vs_naive"] > 0 and ex["realized_over_theoretical_executed"] is not None
    mem = saved["memory_same_batch"]
    assert [m["batch"] for m in mem] == [8, 16] and all(m["incremental"] is not None for m in mem)
    md = (tmp_path / "smoke.md").read_text()
    assert "| krypton exact |" in md and "QUICK PRESET" in md and "RANDOM-INIT" in md
    assert "krypton.captum Occlusion" in md and "IncrementalModel" in md


def test_new_rows_are_skippable(tmp_path):
    torch.manual_seed(0)
    args = _args(tmp_path, "--skip", "naive,captum,approx,drilldown,ig,memprobe,dropin,segments,edits")
    saved = bench_script.run_benchmark(args, models=[("tiny", Tiny().eval(), PRE, False)])
    assert {r["contender"] for r in saved["runs"]} == {"krypton-exact"}


def test_memory_meter_sees_a_known_allocation():
    meter = Meter("cpu")
    if not hwm_reset_works():
        pytest.skip("/proc/self/clear_refs cannot reset VmHWM here")
    with meter.measure() as m:
        a = np.ones(64 << 17)  # 64 MiB, touched
        del a
    assert 48 << 20 <= m.peak_bytes <= 256 << 20
    with meter.measure() as m2:  # the high-water mark was reset: the next block starts from zero
        b = np.ones(1 << 17)  # 1 MiB
        del b
    assert m2.peak_bytes < 32 << 20


def test_captum_sampling_extrapolates_from_whole_batches():
    torch.manual_seed(0)
    model = Tiny().eval()
    img = torch.randn(1, 3, 32, 32)
    meter = Meter("cpu")
    label, _, clean = C.clean_forward(model, img, meter)
    case = C.Case("tiny", model, "rand", img, 8, 4, [0.0, 0.0, 0.0], label, meter, np.random.default_rng(0),
                  clean_seconds=clean)
    res = C.run_captum_occlusion(case, ppe=4, sample_batches=2)
    assert res.extrapolated and res.positions_timed == 8 and res.positions_total == 49
    assert res.seconds > 0 and "extrapolated from 8 of 49 windows" in res.timing


def test_tuned_tau_lookup():
    assert C.tuned_tau("vgg16", 4, 16) == (0.5, "paper tau")  # the paper's taus for SSIM 0.9 (random weights)
    assert C.tuned_tau("resnet18", 4, 16)[0] == 0.7
    assert C.tuned_tau("inception_v3", 4, 16)[0] == 0.9
    tau, source = C.tuned_tau("efficientnet_lite0", 8, 16)  # the tau of the configuration tuned for 0.9
    assert source == "tuned tau" and tau == C.krypton.tuning_for("efficientnet_lite0").choose(0.9, 8, 16).config.tau
