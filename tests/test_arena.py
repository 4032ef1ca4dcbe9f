"""krypton's batch arena (ext/arena.cpp via krypton.memory.batch_arena): large tensors allocated in a scope
come from it, keep their values after the scope, reuse and coalesce freed blocks, go back on free, and a
run's peak no longer depends on what the process did before."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import krypton
from krypton import ops
from krypton.memory import ARENA_MIN_BYTES, arena_stats, batch_arena

from oracle import max_error, occlusion_oracle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not ops.compiled_available(), reason="the arena is part of the compiled extension")
MB = 1 << 20


def big(mb: int) -> torch.Tensor:
    return torch.empty(mb * MB, dtype=torch.uint8)


def test_tensors_from_a_scope_keep_their_values_and_go_back_when_freed():
    with batch_arena() as on:
        assert on
        before = arena_stats()["in_use"]
        kept = torch.arange(2 * MB // 4, dtype=torch.float32)  # 2 MB: from the arena
        assert arena_stats()["in_use"] == before + 2 * MB
        small = torch.ones(ARENA_MIN_BYTES // 8, dtype=torch.uint8)  # below the threshold: malloc's
        assert arena_stats()["in_use"] == before + 2 * MB
    extra = big(4)  # outside a scope: torch's own allocator
    assert arena_stats()["in_use"] == before + 2 * MB
    assert torch.equal(kept, torch.arange(2 * MB // 4, dtype=torch.float32)) and small.sum() == small.numel()
    del kept, extra
    assert arena_stats()["in_use"] == before


def test_freed_blocks_are_reused_and_coalesce():
    with batch_arena():
        a, b, guard = big(3), big(5), big(1)
        top = arena_stats()["high_water"]
        del b, a  # b merges into the block that a then frees before it: one free block of 8 MB below guard
        c = big(8)  # fits it exactly
        assert arena_stats()["high_water"] == top
        for _ in range(5):  # a batch's allocations again and again: the same pages
            d, e = big(2), big(4)
            del d, e
        assert arena_stats()["high_water"] == top + 6 * MB
        del c, guard


def test_scopes_nest_and_only_the_outermost_gives_pages_back():
    with batch_arena():
        with batch_arena():
            pass
        before = arena_stats()["in_use"]
        t = big(2)  # still in the outer scope: from the arena
        assert arena_stats()["in_use"] == before + 2 * MB
        del t


def test_identical_runs_use_identical_arena_peaks():
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5)).eval()
    image = torch.randn(1, 3, 48, 48)
    explainer = krypton.Explainer(model, cache_bytes=0)
    peaks, heatmaps = [], []
    for method in ("incremental", "naive", "incremental", "naive"):
        exp = explainer.explain(image, patch_size=8, stride=4, batch_size=64, method=method)
        peaks.append(arena_stats()["high_water"])
        heatmaps.append(exp.heatmap)
        with batch_arena():  # history between requests: holes, freed in another order, must not move the next peak
            held = [big(3), big(7), big(2), big(5)]
            del held[1], held[2]
            del held
    assert peaks[0] == peaks[2] and peaks[1] == peaks[3] and peaks[0] >= MB
    ref = occlusion_oracle(model, image, 8, 4, [0.0])
    assert all(max_error(h, ref.heatmap) < 1e-4 for h in heatmaps)


def test_arena_can_be_declined():
    code = "from krypton.memory import batch_arena\nwith batch_arena() as on:\n    print(on)"
    env = dict(os.environ, PYTHONPATH=ROOT)
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    off = subprocess.run([sys.executable, "-c", code], env={**env, "KRYPTON_ARENA": "off"},
                         capture_output=True, text=True, check=True)
    assert on.stdout.strip() == "True" and off.stdout.strip() == "False"


_KEEP_CODE = """
import torch
from krypton.memory import PeakMemory, batch_arena
def rss_mb():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) >> 10
base = rss_mb()
with batch_arena():
    block = torch.ones(192 << 20, dtype=torch.uint8)  # every page touched
    during = rss_mb()
    del block
after = rss_mb()
with PeakMemory() as pm, batch_arena():  # reuses the kept pages: they must count as the run's
    block = torch.ones(48 << 20, dtype=torch.uint8)
    del block
print(during - base, after - base, pm.peak_bytes >> 20)
"""


@pytest.mark.parametrize("keep_mb", [0, 64])
def test_free_pages_below_the_keep_size_stay_resident_and_count_in_measured_peaks(keep_mb):
    env = dict(os.environ, PYTHONPATH=ROOT, KRYPTON_ARENA_KEEP_MB=str(keep_mb))
    out = subprocess.run([sys.executable, "-c", _KEEP_CODE], env=env, capture_output=True, text=True, check=True)
    during, after, peak = map(int, out.stdout.split())
    assert during >= 180
    assert abs(after - keep_mb) <= 16  # the first keep_mb MiB of the range stay, the rest went back
    assert 44 <= peak <= 64  # the 48 MiB block, whether its pages were kept or faulted in afresh


def test_a_bad_keep_size_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("KRYPTON_ARENA_KEEP_MB", "-5")
    with pytest.raises(ValueError, match=r"KRYPTON_ARENA_KEEP_MB='-5'.*\[0, 999999999\]"):
        with batch_arena():
            pass
